"""Brokers. Code outside this package talks to :class:`~stem.brokers.base.Broker` only."""

from __future__ import annotations

from stem.brokers.base import Broker, DeadLetter, Delivery, Message, QueueStats
from stem.security.tls import TLSSettings
from stem.urls import open_by_scheme

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


def broker_from_url(url: str, *, tls: TLSSettings | None = None) -> Broker:
    """Open the broker a URL names (``memory://``, ``sqlite:///path``, ``redis://``,
    ``rediss://``, ``postgresql://``)."""
    broker: Broker = open_by_scheme(url, _SCHEMES, "broker", tls)
    return broker
