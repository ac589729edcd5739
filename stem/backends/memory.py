"""In-process result backend for tests, demos and embedded workers.

``memory://`` and ``memory://name``: instances with the same name in one process share one
store (as :mod:`stem.brokers.memory` does). Waiters sleep on a condition that every store
wakes, so ``wait`` returns as soon as a ready state lands. Expiry uses the monotonic clock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from stem.security.tls import TLSSettings
from stem.states import READY_STATES

__all__ = ["MemoryBackend"]


def _deadline(ttl_s: float | None) -> float | None:
    """Monotonic expiry time; ``None`` or a non-positive ttl keeps the record forever."""
    return None if ttl_s is None or ttl_s <= 0 else time.monotonic() + ttl_s


def _live(expires: float | None) -> bool:
    return expires is None or expires > time.monotonic()


@dataclass(slots=True)
class _Set:
    members: set[str] = field(default_factory=set)
    expires: float | None = None


class _Store:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.records: dict[str, tuple[str, bytes, float | None]] = {}
        self.sets: dict[str, _Set] = {}

    def get(self, task_id: str) -> tuple[str, bytes] | None:
        rec = self.records.get(task_id)
        if rec is None:
            return None
        if not _live(rec[2]):
            del self.records[task_id]
            return None
        return rec[0], rec[1]


_REGISTRY: dict[str, _Store] = {}
_REGISTRY_LOCK = threading.Lock()


class MemoryBackend:
    """The in-process result backend (see module docstring). ``tls`` is ignored."""

    def __init__(self, url: str = "memory://", *, tls: TLSSettings | None = None) -> None:
        self.url = url
        parts = urlsplit(url)
        self.name = parts.netloc + parts.path
        with _REGISTRY_LOCK:
            store = _REGISTRY.get(self.name)
            if store is None:
                store = _REGISTRY[self.name] = _Store()
        self._store = store

    @classmethod
    def reset_all(cls) -> None:
        """Empty every named store in this process (for tests)."""
        with _REGISTRY_LOCK:
            stores = list(_REGISTRY.values())
            _REGISTRY.clear()
        for store in stores:
            with store.cond:
                store.records.clear()
                store.sets.clear()
                store.cond.notify_all()

    def __repr__(self) -> str:
        return f"<MemoryBackend {self.url}>"

    def store(self, task_id: str, state: str, body: bytes, ttl_s: float | None) -> None:
        s = self._store
        with s.cond:
            s.records[task_id] = (state, body, _deadline(ttl_s))
            s.cond.notify_all()

    def fetch(self, task_id: str) -> bytes | None:
        with self._store.cond:
            rec = self._store.get(task_id)
        return None if rec is None else rec[1]

    def fetch_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        with self._store.cond:
            recs = [self._store.get(t) for t in task_ids]
        return [None if r is None else r[1] for r in recs]

    def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        s = self._store
        deadline = time.monotonic() + max(0.0, timeout_s)
        with s.cond:
            while True:
                rec = s.get(task_id)
                remaining = deadline - time.monotonic()
                if (rec is not None and rec[0] in READY_STATES) or remaining <= 0:
                    return None if rec is None else rec[1]
                s.cond.wait(remaining)

    def add_member(self, key: str, member: str, ttl_s: float | None) -> int:
        s = self._store
        with s.cond:
            found = s.sets.get(key)
            if found is None or not _live(found.expires):
                found = s.sets[key] = _Set()
            found.members.add(member)
            if ttl_s is not None:
                found.expires = _deadline(ttl_s)
            return len(found.members)

    def delete(self, task_id: str) -> None:
        with self._store.cond:
            self._store.records.pop(task_id, None)

    def cleanup(self) -> int:
        s = self._store
        with s.cond:
            dead = [t for t, rec in s.records.items() if not _live(rec[2])]
            for t in dead:
                del s.records[t]
            dead_sets = [k for k, v in s.sets.items() if not _live(v.expires)]
            for k in dead_sets:
                del s.sets[k]
            return len(dead) + len(dead_sets)

    def ping(self) -> None:
        return None

    def close(self) -> None:
        """Nothing to release: the store outlives instances."""
