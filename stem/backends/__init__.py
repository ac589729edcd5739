"""Result backends. Code outside this package talks to
:class:`~stem.backends.base.ResultBackend` only."""

from __future__ import annotations

from stem.backends.base import ResultBackend
from stem.security.tls import TLSSettings
from stem.urls import open_by_scheme

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
    backend: ResultBackend = open_by_scheme(url, _SCHEMES, "result backend", tls)
    return backend
