"""TLS settings shared by the Redis and PostgreSQL adapters."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """Where to find the CA, client certificate and key. Verification is on unless
    ``allow_insecure`` is set explicitly (which logs a warning at every start)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    allow_insecure: bool = False
    min_version: str = "TLSv1.2"
