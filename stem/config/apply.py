"""Apply the layered configuration to an app (what every CLI command does first)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from stem.config.gates import enforce_gates
from stem.config.loader import load_settings
from stem.observability.logs import setup_logging

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.config.model import Settings


def apply_layers(
    app: Stem,
    *,
    profile: str | None = None,
    config_file: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    gates: bool = False,
) -> Settings:
    """Load the settings (code defaults < files < env < ``overrides``), check the gates if
    asked, and configure ``app`` with them. A keyring given in code stays when the
    configuration names no keys."""
    flags = dict(overrides or {})
    settings = load_settings(
        profile=profile,
        config_file=config_file,
        overrides=flags,
        code_defaults=app.code_settings(),
    )
    # Logging from the files/env applies now (flags are part of the settings, so this
    # never undoes them).
    setup_logging(settings.logging.level, settings.logging.format)
    if gates:
        enforce_gates(settings)
    ring = settings.signing.to_keyring()
    # Options set only when the configuration has something to say about them.
    extra: dict[str, Any] = (
        {"keyring": ring} if ring is not None or not app.has_explicit_keyring else {}
    )
    broker_from_code = settings.provenance("broker.url").layer in ("default",)
    backend_from_code = settings.provenance("backend.url").layer in ("default",)
    # A TTL the code chose that the configuration cannot hold (a fraction of a second)
    # stays unless a layer sets one.
    ttl_from_code = settings.provenance("backend.result_ttl_s").layer == "default"
    if not (ttl_from_code and app.has_explicit_result_ttl):
        extra["result_ttl_s"] = settings.backend.result_ttl_s
    app.configure(
        broker=None if broker_from_code and app.has_explicit_broker else settings.broker.url,
        backend=None if backend_from_code and app.has_explicit_backend else settings.backend.url,
        routes=dict(settings.routes),
        tls=settings.tls.to_tls_settings(),
        publish_retries=settings.broker.publish_retries,
        **extra,
    )
    return settings
