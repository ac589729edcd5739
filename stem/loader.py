"""Find the application object an operator names on the command line or in config.

The spec comes from the operator (``--app pkg.module:app``), never from a message.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import traceback
from typing import TYPE_CHECKING

from stem.errors import ConfigError, StemError

if TYPE_CHECKING:
    from stem.app import Stem

log = logging.getLogger("stem.loader")


def _import_failed(spec: str, module_name: str, exc: BaseException) -> ConfigError:
    """A one-line error naming the module, the exception and where it was raised (the
    traceback is printed with --log-level debug); exit 78, so units do not restart."""
    where = ""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if not f.filename.startswith("<")]
    if frames and not isinstance(exc, SyntaxError):  # a SyntaxError names its place itself
        where = f" (at {frames[-1].filename}:{frames[-1].lineno})"
    log.debug("importing %s failed", module_name, exc_info=exc)
    return ConfigError(
        f"--app {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}{where}"
    )


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
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigError(
                f"--app {spec!r}: module {module_name!r} not found (is it on PYTHONPATH?)"
            ) from None
        raise _import_failed(spec, module_name, exc) from exc
    except StemError:
        raise  # the app's own construction said what is wrong (a bad URL, say)
    except Exception as exc:  # a syntax error, a missing dependency, its own bug
        raise _import_failed(spec, module_name, exc) from exc
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
