"""Cluster-wide rate limits, concurrency caps and unique-task keys.

All state lives in the broker's store through its compare-and-set primitive (``swap``), so
every worker on every host sees the same limit. Rate limits are GCRA (the generic cell rate
algorithm): one stored number per limit, the theoretical arrival time of the next request.
A worker that takes a slot in the near future (within ``horizon_s``) hands the message back
to the broker until that slot, so rate-limited tasks wait in the broker, not in a worker's
slot; beyond the horizon it hands it back without taking a slot.
"""

from __future__ import annotations

import hashlib
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from stem.brokers.base import Broker
from stem.envelope import dumps, now_ms
from stem.errors import ConfigError, EncodeError

_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|sec|second|m|min|minute|h|hour)\s*$")
_UNITS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600}
_CAS_TRIES = 20


def parse_rate(text: str) -> float:
    """``"100/s"``, ``"30/m"``, ``"5/h"`` -> requests per second."""
    m = _RATE.match(text)
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"rate limit {text!r} is not like '100/s', '30/m' or '5/h'")
    return float(m.group(1)) / _UNITS[m.group(2)]


@dataclass(frozen=True, slots=True)
class Slot:
    """``run_at_ms`` is when the request may run; None means no slot was taken and the
    caller should try again after ``retry_after_s``."""

    run_at_ms: int | None
    retry_after_s: float = 0.0


class RateLimiter:
    def __init__(self, broker: Broker, *, horizon_s: float = 1.0) -> None:
        self.broker = broker
        self.horizon_ms = horizon_s * 1000

    def take(self, key: str, rate_per_s: float, *, at_ms: int | None = None) -> Slot:
        interval = 1000.0 / rate_per_s
        for _ in range(_CAS_TRIES):
            now = at_ms if at_ms is not None else now_ms()
            current = self.broker.peek(key)
            tat = max(float(current) if current else 0.0, float(now))
            if tat - now > self.horizon_ms:
                wait = (tat - now - self.horizon_ms) / 1000
                return Slot(None, wait + random.uniform(0, self.horizon_ms / 1000))
            new_tat = tat + interval
            ttl = (new_tat - now) / 1000 + 60
            if self.broker.swap(key, current, repr(new_tat), ttl):
                return Slot(int(tat))
        return Slot(None, interval / 1000 + random.uniform(0, 0.05))


class ConcurrencyCap:
    """At most ``limit`` holders at once across the cluster; a holder that dies is
    forgotten when its entry expires."""

    def __init__(self, broker: Broker) -> None:
        self.broker = broker

    def _update(self, key: str, change: Callable[[dict[str, int]], dict[str, int] | None]) -> bool:
        for _ in range(_CAS_TRIES):
            raw = self.broker.peek(key)
            holders: dict[str, int] = {}
            if raw:
                from stem.envelope import loads

                holders = {k: int(v) for k, v in loads(raw).items()}
            now = now_ms()
            live = {k: v for k, v in holders.items() if v > now}
            new = change(live)
            if new is None:
                return False
            if self.broker.swap(key, raw, dumps(new).decode() if new else None, 86400.0):
                return True
        return False

    def acquire(self, key: str, holder: str, limit: int, hold_s: float) -> bool:
        def change(live: dict[str, int]) -> dict[str, int] | None:
            if holder in live:
                return live
            if len(live) >= limit:
                return None
            return {**live, holder: now_ms() + int(hold_s * 1000)}

        return self._update(key, change)

    def release(self, key: str, holder: str) -> None:
        self._update(key, lambda live: {k: v for k, v in live.items() if k != holder})


def unique_key(
    task_name: str,
    spec: str | Callable[..., str] | None,
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    names: Callable[[Sequence[Any], Mapping[str, Any]], Mapping[str, Any] | None] | None = None,
) -> str:
    """The key two enqueues share when they are "the same task". ``spec`` may be a callable
    (given the task's args and kwargs), a template formatted with them
    (``"order:{order_id}"``: ``names`` maps the arguments, positional ones included, to the
    task's parameter names; None if they do not bind), or None for the task name and all
    arguments: by parameter name where they bind, so ``f(8)``, ``f(x=8)`` and ``f(8, s=1)``
    with ``s=1`` the default are one task."""
    if spec is None:
        named = names(args, kwargs) if names is not None else None
        try:
            data = dumps([list(args), dict(kwargs)] if named is None else {"named": named})
        except EncodeError:  # a default value JSON cannot hold: the arguments as sent
            data = dumps([list(args), dict(kwargs)])
        part = hashlib.sha256(data).hexdigest()
    else:
        part = key_part("unique_key", spec, args, kwargs, names)
    return f"unique:{task_name}:{part}"


def key_part(
    what: str,
    spec: str | Callable[..., str],
    args: Sequence[Any],
    kwargs: Mapping[str, Any],
    names: Callable[[Sequence[Any], Mapping[str, Any]], Mapping[str, Any] | None] | None = None,
) -> str:
    """A key template (``"order:{order_id}"``, filled with the arguments by parameter name
    via ``names``, positional ones included) or a callable given the arguments."""
    if callable(spec):
        return str(spec(*args, **kwargs))
    named = (names(args, kwargs) if names is not None else None) or kwargs
    try:
        return spec.format(*args, **named)
    except (IndexError, KeyError) as exc:
        raise ConfigError(f"{what} {spec!r} names a missing argument: {exc}") from None
