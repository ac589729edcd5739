"""Apply the layered configuration to an app: code defaults < files < env < flags.

Only flags the user typed count as the command-line layer (typer tells a typed value from
a default or an environment variable); environment variables reach the settings through
the config loader's own ``STEM_<SECTION>_<KEY>`` layer, so provenance names them right.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import typer

from stem.config import enforce_gates, load_settings
from stem.observability.logs import setup_logging

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
    overrides = dict(st.overrides)
    settings = load_settings(
        profile=st.profile,
        config_file=st.config_file,
        overrides=overrides,
        code_defaults=app.code_settings(),
    )
    # Logging from the files/env applies now (flags were applied at start-up already and
    # are part of the settings, so this never undoes them).
    setup_logging(settings.logging.level, settings.logging.format)
    if gates:
        enforce_gates(settings)
    broker_from_code = settings.provenance("broker.url").layer in ("default",)
    backend_from_code = settings.provenance("backend.url").layer in ("default",)
    app.configure(
        broker=None if broker_from_code and app.has_explicit_broker else settings.broker.url,
        backend=None if backend_from_code and app.has_explicit_backend else settings.backend.url,
        routes=dict(settings.routes),
        result_ttl_s=settings.backend.result_ttl_s,
        tls=settings.tls.to_tls_settings(),
        keyring=settings.signing.to_keyring(),
        publish_retries=settings.broker.publish_retries,
    )
    return settings
