"""Apply the layered configuration to an app: code defaults < files < env < flags.

Only flags the user typed count as the command-line layer (typer tells a typed value from
a default or an environment variable); environment variables reach the settings through
the config loader's own ``STEM_<SECTION>_<KEY>`` layer, so provenance names them right.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import typer

from stem.config.apply import apply_layers

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.cli.context import CLIState
    from stem.config import Settings


def typed_flags(ctx: typer.Context, mapping: Mapping[str, str]) -> dict[str, Any]:
    """``{settings key: value}`` for the parameters in ``mapping`` (param name -> settings
    key) that were given on the command line."""
    out: dict[str, Any] = {}
    for param, key in mapping.items():
        source = ctx.get_parameter_source(param)
        if source is not None and source.name == "COMMANDLINE":
            out[key] = ctx.params[param]
    return out


def apply_settings(app: Stem, st: CLIState, *, gates: bool = False) -> Settings:
    return apply_layers(
        app,
        profile=st.profile,
        config_file=st.config_file,
        overrides=st.overrides,
        gates=gates,
    )
