"""Turn a Stem PostgreSQL URL (plus optional :class:`TLSSettings`) into libpq parameters.

A URL is an ordinary libpq URI (``postgresql://user:pw@host:port/db?sslmode=...``) that may
carry a few Stem options in its query string. Those are removed before the URL reaches libpq
(which rejects keys it does not know):

``migrate``          ``true`` (default): apply pending migrations on first connect.
``listen``           ``true`` (default): wait with LISTEN/NOTIFY; ``false`` polls only, for
                     transaction poolers (PgBouncer ``pool_mode=transaction``) that drop
                     notifications.
``poll_interval_s``  longest sleep between two checks while waiting (default 0.5).
``pool_size``        idle connections kept per broker or backend (default 16; a worker's
                     threads each hold one while they settle, and fewer means reconnects).
``call_timeout_s``   a statement still waiting for the server after this long (default 15)
                     has its socket shut down and is retried on a fresh connection: a
                     connection that went silent (NAT entry dropped, host gone) never
                     hangs a worker.
``prepare``          ``true`` (default): psycopg prepares statements used often; ``false``
                     for poolers that cannot keep prepared statements (PgBouncer < 1.21 in
                     transaction mode). Behind such a pooler use ``listen=false&prepare=false``.

TLS: libpq's own ``sslmode``/``sslrootcert``/``sslcert``/``sslkey`` in the URL win. A
:class:`TLSSettings` fills in what the URL leaves out. Whenever a CA is known (or TLS settings
are given at all) and the URL names no ``sslmode``, the mode is ``verify-full``: the chain
and the host name are both checked. ``allow_insecure`` means ``sslmode=require`` without
verification, and every client built that way logs a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

import psycopg
from psycopg.conninfo import conninfo_to_dict

from stem.errors import ConfigError
from stem.observability.redact import redact_error, redact_url
from stem.security.tls import TLSSettings, check_tls_files
from stem.urls import bool_option, check_url, number_option

log = logging.getLogger("stem.postgres")

_STEM_OPTIONS = frozenset(
    {"migrate", "listen", "poll_interval_s", "pool_size", "prepare", "call_timeout_s"}
)
_DEFAULT_CONNECT_TIMEOUT_S = "10"
_UNVERIFIED_MODES = frozenset({"disable", "allow", "prefer", "require"})
_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


@dataclass(frozen=True, slots=True)
class PgOptions:
    """Everything a client needs to open connections, with secrets kept out of ``target``."""

    # Neither is in repr: both may hold the password.
    conninfo: str = field(repr=False)
    params: Mapping[str, str] = field(default_factory=dict, repr=False)
    target: str = "localhost:5432"
    migrate: bool = True
    listen: bool = True
    poll_interval_s: float = 0.5
    pool_size: int = 16
    prepare: bool = True
    call_timeout_s: float = 15.0
    sslmode: str = "prefer"


def split_stem_options(url: str) -> tuple[str, dict[str, str]]:
    """The URL without Stem's own query options, and those options. The rest of the query
    is kept byte for byte: libpq decodes it itself (and, unlike forms, not ``+``)."""
    parts = urlsplit(url)
    kept: list[str] = []
    ours: dict[str, str] = {}
    for pair in parts.query.split("&") if parts.query else []:
        name, _, value = pair.partition("=")
        if unquote(name) in _STEM_OPTIONS:
            ours[unquote(name)] = unquote(value)
        else:
            kept.append(pair)
    if not ours:
        return url, ours
    # Cut by hand: urlunsplit would turn "postgresql:///db" (a Unix socket) into
    # "postgresql:/db", which libpq does not read.
    base, hash_, fragment = url.partition("#")
    base = base.partition("?")[0]
    stripped = base + ("?" + "&".join(kept) if kept else "") + hash_ + fragment
    return stripped, ours


def tls_params(given: Mapping[str, str], tls: TLSSettings | None) -> dict[str, str]:
    """libpq TLS keywords to add to what the URL already says (the URL wins)."""
    out: dict[str, str] = {}
    insecure = tls is not None and tls.allow_insecure
    if tls is not None:
        if tls.ca_file and not insecure:
            out["sslrootcert"] = tls.ca_file
        if tls.cert_file:
            out["sslcert"] = tls.cert_file
        if tls.key_file:
            out["sslkey"] = tls.key_file
        if tls.min_version:
            out["ssl_min_protocol_version"] = tls.min_version
    out = {k: v for k, v in out.items() if k not in given}
    if "sslmode" not in given:
        if insecure:
            out["sslmode"] = "require"
        elif tls is not None or "sslrootcert" in given:
            out["sslmode"] = "verify-full"
            if "sslrootcert" not in given and "sslrootcert" not in out:
                # libpq >= 16: verify against the operating system's trust store.
                out["sslrootcert"] = "system"
    return out


def _check_files(effective: Mapping[str, str]) -> None:
    """The CA, certificate and key files libpq will load, loaded here first: one that is
    not what it should be is a configuration error naming it, not a failure to connect.
    (A key with an ``sslpassword`` is left to libpq; ``sslrootcert=system`` is the
    operating system's store.)"""
    if effective.get("sslmode") == "disable":
        return
    ca = effective.get("sslrootcert")
    cert = None if "sslpassword" in effective else effective.get("sslcert")
    key = effective.get("sslkey") if cert else None
    check_tls_files("PostgreSQL", None if ca == "system" else ca, cert, key)


def parse(url: str, tls: TLSSettings | None = None) -> PgOptions:
    """Validate a Stem PostgreSQL URL; raise :class:`ConfigError` naming what is wrong."""
    check_url(url, "PostgreSQL")
    scheme = urlsplit(url).scheme.lower()
    if scheme not in {"postgresql", "postgres"}:
        raise ConfigError(f"not a PostgreSQL URL: {redact_url(url)}")
    stripped, ours = split_stem_options(url)
    try:
        given = {k: str(v) for k, v in conninfo_to_dict(stripped).items() if v is not None}
    except psycopg.Error as exc:
        raise ConfigError(
            f"invalid PostgreSQL URL {redact_url(url)}: {redact_error(str(exc).strip(), url)}"
        ) from None
    if given.get("sslmode", "prefer") not in _SSLMODES:
        raise ConfigError(
            f"invalid PostgreSQL URL {redact_url(url)}: sslmode {given['sslmode'][:40]!r} is not "
            f"one of {', '.join(_SSLMODES)}"
        )
    params = tls_params(given, tls)
    _check_files({**given, **params})
    if "connect_timeout" not in given:
        params["connect_timeout"] = _DEFAULT_CONNECT_TIMEOUT_S
    sslmode = params.get("sslmode", given.get("sslmode", "prefer"))
    host = given.get("host") or given.get("hostaddr") or "localhost"
    target = f"{host}:{given.get('port') or '5432'}/{given.get('dbname') or given.get('user', '')}"
    options = PgOptions(
        conninfo=stripped,
        params=params,
        target=target,
        migrate=bool_option("migrate", ours["migrate"], url) if "migrate" in ours else True,
        listen=bool_option("listen", ours["listen"], url) if "listen" in ours else True,
        poll_interval_s=(
            number_option("poll_interval_s", ours["poll_interval_s"], url, low=0.01, high=60.0)
            if "poll_interval_s" in ours
            else 0.5
        ),
        pool_size=(
            int(number_option("pool_size", ours["pool_size"], url, low=1, high=64, kind=int))
            if "pool_size" in ours
            else 16
        ),
        prepare=bool_option("prepare", ours["prepare"], url) if "prepare" in ours else True,
        call_timeout_s=(
            number_option("call_timeout_s", ours["call_timeout_s"], url, low=0.5, high=3600.0)
            if "call_timeout_s" in ours
            else 15.0
        ),
        sslmode=sslmode,
    )
    if tls is not None and tls.allow_insecure:
        log.warning(
            "TLS certificate verification is OFF for PostgreSQL at %s (allow_insecure): "
            "the connection is encrypted but the server is not authenticated",
            target,
            extra={"event": "tls-insecure", "target": target},
        )
    return options


def is_verified(options: PgOptions) -> bool:
    """True when connections both encrypt and authenticate the server."""
    return options.sslmode not in _UNVERIFIED_MODES
