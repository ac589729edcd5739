"""TLS settings shared by the Redis and PostgreSQL adapters."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from stem.errors import ConfigError


@dataclass(frozen=True, slots=True)
class TLSSettings:
    """Where to find the CA, client certificate and key. Verification is on unless
    ``allow_insecure`` is set explicitly (which logs a warning at every start)."""

    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    allow_insecure: bool = False
    min_version: str = "TLSv1.2"


def check_tls_files(store: str, ca: str | None, cert: str | None, key: str | None) -> None:
    """Load the CA and the client certificate once, as the connection will: a file that
    holds no certificate, a key that is not the certificate's, an encrypted key or a file
    this user cannot read is a configuration error naming the file, not a failure to
    reach ``store`` (Redis, PostgreSQL) on every connect."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca:
        try:
            ctx.load_verify_locations(cafile=ca)
        except ssl.SSLError as exc:
            raise ConfigError(
                f"the {store} TLS CA file {ca!r} holds no certificate that can be read "
                f"({exc.reason or exc})"
            ) from None
        except OSError as exc:  # a file this user may not read
            raise ConfigError(
                f"the {store} TLS CA file {ca!r} cannot be read: {exc.strerror}"
            ) from None
    if cert:
        files = f"certificate file {cert!r}" + (f" and key file {key!r}" if key else "")
        try:
            ctx.load_cert_chain(cert, key, password=_no_password)
        except _EncryptedKey:
            raise ConfigError(
                f"the {store} TLS {files}: the private key is encrypted; Stem needs it "
                "unencrypted (readable by the service user only)"
            ) from None
        except ssl.SSLError as exc:
            raise ConfigError(
                f"the {store} TLS {files} do not hold a PEM certificate and its private key "
                f"({exc.reason or exc})"
            ) from None
        except OSError as exc:
            raise ConfigError(f"the {store} TLS {files} cannot be read: {exc.strerror}") from None


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    """Asked for a key's password: there is none to give (OpenSSL would prompt on the
    terminal, which a service has not got)."""
    raise _EncryptedKey
