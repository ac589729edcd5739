"""Result backends. Code outside this package talks to
:class:`~stem.backends.base.ResultBackend` only."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from stem.backends.base import ResultBackend
from stem.errors import UnsupportedURL
from stem.observability.redact import redact_url
from stem.security.tls import TLSSettings

__all__ = ["ResultBackend", "backend_from_url"]

_SCHEMES: dict[str, tuple[str, str]] = {
    "memory": ("stem.backends.memory", "MemoryBackend"),
    "sqlite": ("stem.backends.sqlite", "SQLiteBackend"),
    "redis": ("stem.backends.redis", "RedisBackend"),
    "rediss": ("stem.backends.redis", "RedisBackend"),
    "postgresql": ("stem.backends.postgres", "PostgresBackend"),
    "postgres": ("stem.backends.postgres", "PostgresBackend"),
}


def backend_from_url(url: str, *, tls: TLSSettings | None = None) -> ResultBackend:
    """Open the result backend a URL names (same schemes as brokers)."""
    scheme = urlsplit(url).scheme.lower()
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise UnsupportedURL(
            f"unsupported result backend URL scheme {scheme!r} in {redact_url(url)}; "
            f"use one of {known}"
        )
    module_name, cls_name = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UnsupportedURL(f"the {scheme}:// result backend is not available yet") from None
        raise
    backend: ResultBackend = getattr(module, cls_name)(url, tls=tls)
    return backend
