"""Find the application object an operator names on the command line or in config.

The spec comes from the operator (``--app pkg.module:app``), never from a message.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import TYPE_CHECKING

from stem.errors import ConfigError

if TYPE_CHECKING:
    from stem.app import Stem


def load_app(spec: str) -> Stem:
    """Import ``module:attribute`` (attribute defaults to ``app``) and return the Stem app."""
    from stem.app import Stem

    module_name, _, attr = spec.partition(":")
    attr = attr or "app"
    if not module_name:
        raise ConfigError(f"--app {spec!r}: expected 'package.module:app'")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            raise ConfigError(
                f"--app {spec!r}: module {module_name!r} not found (is it on PYTHONPATH?)"
            ) from None
        raise
    obj = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigError(f"--app {spec!r}: {module_name} has no attribute {attr!r}") from None
    if not isinstance(obj, Stem):
        raise ConfigError(f"--app {spec!r}: {attr!r} is a {type(obj).__name__}, not a Stem app")
    obj.import_spec = f"{module_name}:{attr}"
    return obj
