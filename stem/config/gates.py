"""Quality gates: configurations Stem refuses to run in production.

Every long-running command calls :func:`enforce_gates` at startup, and
``stem config check`` runs them on demand. A failing gate is an error in every profile
except ``development``, where it is a warning (a laptop may run plaintext on
``memory://`` as root; a server may not). There is no switch to turn a gate off.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit

from stem.config.model import Settings
from stem.config.secrets import hmac_key_sizes, mode_problem
from stem.errors import ConfigError
from stem.observability.redact import redact_url

log = logging.getLogger("stem.config")

MIN_HMAC_KEY_BYTES = 32
LENIENT_PROFILES = frozenset({"development"})


@dataclass(frozen=True, slots=True)
class GateResult:
    """``severity`` is what a failure means in this profile (``error`` stops startup)."""

    id: str
    ok: bool
    severity: str
    message: str
    hint: str

    def as_dict(self) -> dict[str, object]:
        return {
            "id": self.id,
            "ok": self.ok,
            "severity": self.severity,
            "message": self.message,
            "hint": self.hint,
        }


@dataclass(frozen=True, slots=True)
class Gate:
    id: str
    message: str  # what the gate demands
    hint: str  # how to fix a failure
    check: Callable[[Settings, int | None], list[str]]  # problems found; empty = pass


class GatesFailed(ConfigError):
    """The configuration failed quality gates; ``results`` holds the failures."""

    def __init__(self, results: list[GateResult], profile: str) -> None:
        self.results = results
        lines = "\n".join(f"  - {r.id}: {r.message} (fix: {r.hint})" for r in results)
        ids = ", ".join(r.id for r in results)
        super().__init__(f"profile {profile!r} refuses this configuration ({ids}):\n{lines}")


# -- URL inspection -------------------------------------------------------------------------


def _urls(settings: Settings) -> list[tuple[str, str]]:
    urls = [("broker.url", settings.broker.url)]
    if settings.backend.url != settings.broker.url:
        urls.append(("backend.url", settings.backend.url))
    return urls


def _query(url: str) -> dict[str, str]:
    return {k.lower(): v for k, v in parse_qsl(urlsplit(url).query, keep_blank_values=True)}


def _tls_state(url: str, settings: Settings) -> str:
    """``local``, ``verified``, ``unverified`` or ``plaintext`` for one URL (a URL that
    cannot be read counts as ``plaintext``: never as safe)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "plaintext"
    scheme = parts.scheme.lower()
    query = _query(url)
    if scheme in ("sqlite", "memory"):
        return "local"
    if scheme == "redis":
        return "plaintext"
    if scheme == "rediss":
        # Stem reads "optional" as "required" (stem/redis_conn.py): only "none" is unverified.
        if query.get("ssl_cert_reqs", "required").lower() == "none":
            return "unverified"
        return "unverified" if settings.tls.allow_insecure else "verified"
    # PostgreSQL, read as libpq reads it: only Unix sockets (no host, or hosts that are
    # directories, and no hostaddr) never leave the box. Any TCP host in a list counts.
    from psycopg import Error as PgError
    from psycopg.conninfo import conninfo_to_dict

    from stem.pg.conninfo import split_stem_options

    try:
        given = conninfo_to_dict(split_stem_options(url)[0])
    except PgError:
        return "plaintext"
    hosts = str(given.get("host") or "").split(",")
    if not given.get("hostaddr") and all(not h or h.startswith("/") for h in hosts):
        return "local"
    mode = given.get("sslmode")
    if mode is None:
        # stem.pg.conninfo uses verify-full whenever TLS settings are given.
        mode = "verify-full" if settings.tls.configured else "prefer"
    if mode in ("disable", "allow", "prefer"):
        return "plaintext"
    if mode != "verify-full" or settings.tls.allow_insecure:
        return "unverified"
    return "verified"


def _who(settings: Settings, key: str) -> str:
    try:
        return str(settings.provenance(key))
    except KeyError:  # settings built by hand carry no provenance
        return "origin unknown"


# -- the checks -----------------------------------------------------------------------------


def _signing_off(s: Settings, euid: int | None) -> list[str]:
    problems = []
    if not s.signing.enabled:
        problems.append(
            "no signing keys are configured (signing.keys, signing.keys_file, "
            "signing.public_keys are all empty)"
        )
    if s.signing.required is False:
        problems.append(f"signing.required is false (set by {_who(s, 'signing.required')})")
    return problems


def _weak_keys(s: Settings, euid: int | None) -> list[str]:
    if s.signing.algorithm != "hmac-sha256":
        return []
    return [
        f"HMAC key {kid!r} ({where}) is {size} bytes; at least {MIN_HMAC_KEY_BYTES} are needed"
        for kid, size, where in hmac_key_sizes(s.signing.key_entries)
        if size < MIN_HMAC_KEY_BYTES
    ]


def _transport(state: str) -> Callable[[Settings, int | None], list[str]]:
    def check(s: Settings, euid: int | None) -> list[str]:
        return [
            f"{key} {redact_url(url)} ({_who(s, key)}) is {state}"
            for key, url in _urls(s)
            if _tls_state(url, s) == state
        ]

    return check


def _allow_insecure(s: Settings, euid: int | None) -> list[str]:
    problems = _transport("unverified")(s, euid)
    networked = any(_tls_state(url, s) not in ("local",) for _, url in _urls(s))
    if s.tls.allow_insecure and networked and not problems:
        problems.append(f"tls.allow_insecure is true ({_who(s, 'tls.allow_insecure')})")
    return problems


def _memory(s: Settings, euid: int | None) -> list[str]:
    return [
        f"{key} is {url} ({_who(s, key)}): nothing survives a restart"
        for key, url in _urls(s)
        if urlsplit(url).scheme.lower() == "memory"
    ]


def _dev_cert_checker() -> Callable[[str], bool] | None:
    try:
        from stem.security.devcerts import is_dev_certificate
    except ImportError:
        return None
    checker: Callable[[str], bool] = is_dev_certificate
    return checker


def is_dev_path(path: str) -> bool:
    parts = os.path.normpath(path).split(os.sep)
    return any(a == "certs" and b == "dev" for a, b in itertools.pairwise(parts))


def _tls_paths(s: Settings) -> list[tuple[str, str]]:
    found = [(f"tls.{k}", getattr(s.tls, k)) for k in ("ca_file", "cert_file", "key_file")]
    for key, url in _urls(s):
        for name, value in _query(url).items():
            if name in (
                "sslrootcert",
                "sslcert",
                "sslkey",
                "ssl_ca_certs",
                "ssl_certfile",
                "ssl_keyfile",
            ):
                found.append((f"{key} ?{name}", value))
    return [(key, path) for key, path in found if path]


def _dev_certs(s: Settings, euid: int | None) -> list[str]:
    checker = _dev_cert_checker()
    problems = []
    for key, path in _tls_paths(s):
        dev = is_dev_path(path)
        if not dev and checker is not None and "key" not in key.rpartition(".")[2]:
            try:
                dev = bool(checker(path))
            except (ConfigError, OSError, ValueError):
                dev = False  # unreadable: connecting will say so
        if dev:
            problems.append(f"{key} {path} is a development certificate")
    return problems


def _secret_modes(s: Settings, euid: int | None) -> list[str]:
    # Client keys named in a URL (?sslkey=, ?ssl_keyfile=) are secret files too.
    url_keys = [(k, p) for k, p in _tls_paths(s) if k.endswith(("?sslkey", "?ssl_keyfile"))]
    files = s.secret_files() + url_keys
    return [f"{key}: {p}" for key, path in files if (p := mode_problem(path))]


def _result_expiry(s: Settings, euid: int | None) -> list[str]:
    if s.backend.result_ttl_s is None:
        return [
            f"backend.result_ttl_s is null ({_who(s, 'backend.result_ttl_s')}): "
            "results are kept forever"
        ]
    return []


def current_euid() -> int | None:
    """The effective uid (None where the platform has none). Tests replace this."""
    return os.geteuid() if hasattr(os, "geteuid") else None


def _root(s: Settings, euid: int | None) -> list[str]:
    uid = euid if euid is not None else current_euid()
    return ["running as root (effective uid 0)"] if uid == 0 else []


GATES: tuple[Gate, ...] = (
    Gate(
        "G001-signing-off",
        "messages are signed and verification is required",
        "create keys with `stem keys generate`, name them in signing.keys or in a chmod-600 "
        "file given as signing.keys_file, and leave signing.required unset or true",
        _signing_off,
    ),
    Gate(
        "G002-signing-weak-key",
        f"HMAC keys have at least {MIN_HMAC_KEY_BYTES} bytes",
        "replace it with a key of 32 random bytes (`stem keys generate`) and retire the short one",
        _weak_keys,
    ),
    Gate(
        "G003-tls-off",
        "networked brokers and backends use TLS",
        "use rediss:// for Redis and sslmode=verify-full (or tls.ca_file) for PostgreSQL",
        _transport("plaintext"),
    ),
    Gate(
        "G004-tls-unverified",
        "TLS certificates and host names are verified",
        "remove tls.allow_insecure, ssl_cert_reqs=none and sslmode=require/verify-ca; "
        "set tls.ca_file to the CA that signed the server certificate",
        _allow_insecure,
    ),
    Gate(
        "G005-memory-transport",
        "the broker and backend are durable (no memory://)",
        "use sqlite:///path for one machine, or redis(s):// / postgresql://",
        _memory,
    ),
    Gate(
        "G006-dev-certificate",
        "no development certificates (certs/dev) are in use",
        "issue certificates from your own CA and point tls.* at them",
        _dev_certs,
    ),
    Gate(
        "G007-secret-file-mode",
        "secret files are readable by their owner only",
        "chmod 600 the file (and chown it to the service user)",
        _secret_modes,
    ),
    Gate(
        "G008-result-expiry",
        "results expire (backend.result_ttl_s is set)",
        "set backend.result_ttl_s, e.g. 86400 for one day",
        _result_expiry,
    ),
    Gate(
        "G009-run-as-root",
        "Stem does not run as root",
        "run as a dedicated unprivileged user (User=stem in the systemd unit)",
        _root,
    ),
)


def list_gates() -> tuple[Gate, ...]:
    """Every gate, in the order they run."""
    return GATES


def run_gates(
    settings: Settings, *, profile: str | None = None, euid: int | None = None
) -> list[GateResult]:
    """The result of every gate. ``euid`` defaults to the process's effective uid."""
    name = profile or settings.profile
    severity = "warning" if name in LENIENT_PROFILES else "error"
    results = []
    for gate in GATES:
        problems = gate.check(settings, euid)
        message = "; ".join(problems) if problems else gate.message
        results.append(GateResult(gate.id, not problems, severity, message, gate.hint))
    return results


def enforce_gates(
    settings: Settings, *, profile: str | None = None, euid: int | None = None
) -> list[GateResult]:
    """Raise :class:`GatesFailed` (a ``ConfigError``) listing failing gates whose
    severity is ``error``; otherwise log and return the failing ones as warnings."""
    failing = [r for r in run_gates(settings, profile=profile, euid=euid) if not r.ok]
    errors = [r for r in failing if r.severity == "error"]
    if errors:
        raise GatesFailed(errors, profile or settings.profile)
    for result in failing:
        log.warning(
            "config gate %s: %s (fix: %s)",
            result.id,
            result.message,
            result.hint,
            extra={"event": "config.gate_warning", "gate": result.id},
        )
    return failing
