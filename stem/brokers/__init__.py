"""Brokers. Code outside this package talks to :class:`~stem.brokers.base.Broker` only."""

from __future__ import annotations

import importlib
from urllib.parse import urlsplit

from stem.brokers.base import Broker, DeadLetter, Delivery, Message, QueueStats
from stem.errors import UnsupportedURL
from stem.observability.redact import redact_url
from stem.security.tls import TLSSettings

__all__ = ["Broker", "DeadLetter", "Delivery", "Message", "QueueStats", "broker_from_url"]

# scheme -> (module, class). Fixed table: URLs never name code to import.
_SCHEMES: dict[str, tuple[str, str]] = {
    "memory": ("stem.brokers.memory", "MemoryBroker"),
    "sqlite": ("stem.brokers.sqlite", "SQLiteBroker"),
    "redis": ("stem.brokers.redis", "RedisBroker"),
    "rediss": ("stem.brokers.redis", "RedisBroker"),
    "postgresql": ("stem.brokers.postgres", "PostgresBroker"),
    "postgres": ("stem.brokers.postgres", "PostgresBroker"),
}


def _scheme(url: str) -> str:
    return urlsplit(url).scheme.lower()


def broker_from_url(url: str, *, tls: TLSSettings | None = None) -> Broker:
    """Open the broker a URL names (``memory://``, ``sqlite:///path``, ``redis://``,
    ``rediss://``, ``postgresql://``)."""
    scheme = _scheme(url)
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in _SCHEMES)
        raise UnsupportedURL(
            f"unsupported broker URL scheme {scheme!r} in {redact_url(url)}; use one of {known}"
        )
    module_name, cls_name = _SCHEMES[scheme]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            raise UnsupportedURL(f"the {scheme}:// broker is not available yet") from None
        raise
    cls = getattr(module, cls_name)
    broker: Broker = cls(url, tls=tls)
    return broker
