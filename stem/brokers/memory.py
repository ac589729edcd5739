"""In-process broker for tests, demos and embedded workers.

``memory://`` and ``memory://name``: every instance opened with the same name in one process
shares one store, so an app and an embedded worker see the same queues. Nothing survives the
process. Thread-safe: one :class:`threading.Condition` per store guards everything, and
``reserve(wait_s=...)`` sleeps on it until a publish, a nack, a replay, a due delay or a lapsed
lease makes something available.

Layout per queue: a ready heap keyed ``(-priority, available_ms, seq)``, a delayed heap keyed
``available_ms`` and a lease heap keyed by lease expiry. Heap items carry the entry's
``version`` at push time; any change to an entry bumps the version, so stale heap items are
skipped when popped instead of being searched for and removed.
"""

from __future__ import annotations

import heapq
import itertools
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from stem.brokers.base import Claim, DeadLetter, Delivery, Message, QueueStats
from stem.envelope import new_id, now_ms
from stem.security.tls import TLSSettings

__all__ = ["MemoryBroker"]


@dataclass(slots=True)
class _Entry:
    seq: int
    message_id: str
    queue: str
    body: bytes
    priority: int
    available_ms: int
    delivery_count: int = 0
    token: str | None = None  # the current lease; kept after a lapse until redelivery
    lease_expires_ms: int = 0
    version: int = 0


@dataclass(slots=True)
class _Queue:
    entries: dict[int, _Entry] = field(default_factory=dict)
    ready: list[tuple[int, int, int, int]] = field(default_factory=list)
    delayed: list[tuple[int, int, int]] = field(default_factory=list)
    leases: list[tuple[int, int, int]] = field(default_factory=list)

    def push(self, entry: _Entry, now: int) -> None:
        """File a waiting (not leased) entry under ready or delayed."""
        if entry.available_ms <= now:
            heapq.heappush(
                self.ready, (-entry.priority, entry.available_ms, entry.seq, entry.version)
            )
        else:
            heapq.heappush(self.delayed, (entry.available_ms, entry.seq, entry.version))

    def _live(self, seq: int, version: int) -> _Entry | None:
        entry = self.entries.get(seq)
        return entry if entry is not None and entry.version == version else None

    def promote(self, now: int) -> None:
        """Move due delays and lapsed leases onto the ready heap."""
        while self.delayed and self.delayed[0][0] <= now:
            _, seq, version = heapq.heappop(self.delayed)
            entry = self._live(seq, version)
            if entry is not None:
                self.push(entry, now)
        while self.leases and self.leases[0][0] <= now:
            _, seq, version = heapq.heappop(self.leases)
            entry = self._live(seq, version)
            if entry is not None:
                # A lapsed lease makes the message available from the moment it lapsed.
                entry.available_ms = entry.lease_expires_ms
                self.push(entry, now)

    def head(self) -> tuple[int, int, int, int] | None:
        while self.ready:
            item = self.ready[0]
            if self._live(item[2], item[3]) is not None:
                return item
            heapq.heappop(self.ready)
        return None

    def next_due_ms(self) -> int | None:
        tops = [h[0][0] for h in (self.delayed, self.leases) if h]
        return min(tops) if tops else None


@dataclass(slots=True)
class _Dead:
    letter: DeadLetter
    priority: int


class _Store:
    def __init__(self) -> None:
        self.cond = threading.Condition(threading.Lock())
        self.queues: dict[str, _Queue] = {}
        self.by_seq: dict[int, _Entry] = {}
        self.dead: dict[str, _Dead] = {}  # insertion order is oldest first
        self.claims: dict[str, tuple[str, int | None]] = {}  # value, expiry
        self.known: set[str] = set()  # every queue published to, for stats()
        self.claim_ops = 0
        self.seq = itertools.count(1)

    def clear(self) -> None:
        with self.cond:
            self.queues.clear()
            self.by_seq.clear()
            self.dead.clear()
            self.claims.clear()
            self.known.clear()
            self.cond.notify_all()

    def queue(self, name: str) -> _Queue:
        q = self.queues.get(name)
        if q is None:
            q = self.queues[name] = _Queue()
        return q

    def held(self, receipt: str) -> _Entry | None:
        """The entry a receipt still names (its lease was not superseded), or None."""
        seq_text, _, token = receipt.partition(":")
        try:
            entry = self.by_seq.get(int(seq_text))
        except ValueError:
            return None
        return entry if entry is not None and entry.token == token else None

    def remove(self, entry: _Entry) -> None:
        del self.by_seq[entry.seq]
        q = self.queues[entry.queue]
        del q.entries[entry.seq]
        if not q.entries:  # its heaps hold only stale items now
            del self.queues[entry.queue]

    def add(self, entry: _Entry, now: int) -> None:
        self.by_seq[entry.seq] = entry
        q = self.queue(entry.queue)
        q.entries[entry.seq] = entry
        q.push(entry, now)


_REGISTRY: dict[str, _Store] = {}
_REGISTRY_LOCK = threading.Lock()


def _store_for(name: str) -> _Store:
    with _REGISTRY_LOCK:
        store = _REGISTRY.get(name)
        if store is None:
            store = _REGISTRY[name] = _Store()
        return store


def _name_of(url: str) -> str:
    parts = urlsplit(url)
    return parts.netloc + parts.path


class MemoryBroker:
    """The in-process broker (see module docstring). ``tls`` is accepted and ignored."""

    def __init__(self, url: str = "memory://", *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self.name = _name_of(url)
        self._store = _store_for(self.name)

    @classmethod
    def reset_all(cls) -> None:
        """Empty every named store in this process (for tests)."""
        with _REGISTRY_LOCK:
            stores = list(_REGISTRY.values())
            _REGISTRY.clear()
        for store in stores:
            store.clear()

    def __repr__(self) -> str:
        return f"<MemoryBroker {self.url}>"

    # -- messages ------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> None:
        s = self._store
        with s.cond:
            now = now_ms()
            for m in messages:
                available = m.not_before_ms if m.not_before_ms is not None else now
                entry = _Entry(next(s.seq), m.id, m.queue, m.body, m.priority, available)
                s.add(entry, now)
                s.known.add(m.queue)
            s.cond.notify_all()

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        if max_n <= 0 or not queues:
            return []
        s = self._store
        deadline = time.monotonic() + max(0.0, wait_s)
        with s.cond:
            while True:
                got = self._take(queues, max_n, lease_s)
                remaining = deadline - time.monotonic()
                if got or remaining <= 0:
                    return got
                s.cond.wait(self._sleep_s(queues, remaining))

    def _sleep_s(self, queues: Sequence[str], remaining_s: float) -> float:
        dues = [q.next_due_ms() for q in map(self._store.queues.get, queues) if q is not None]
        due = min((d for d in dues if d is not None), default=None)
        if due is None:
            return remaining_s
        return max(0.001, min(remaining_s, (due - now_ms()) / 1000 + 0.001))

    def _take(self, queues: Sequence[str], max_n: int, lease_s: float) -> list[Delivery]:
        s = self._store
        now = now_ms()
        live = [q for q in map(s.queues.get, dict.fromkeys(queues)) if q is not None]
        for q in live:
            q.promote(now)
        token = secrets.token_hex(8)
        expires = now + int(lease_s * 1000)
        out: list[Delivery] = []
        while len(out) < max_n:
            best: tuple[tuple[int, int, int, int], _Queue] | None = None
            for q in live:
                head = q.head()
                if head is not None and (best is None or head < best[0]):
                    best = (head, q)
            if best is None:
                break
            heapq.heappop(best[1].ready)
            entry = best[1].entries[best[0][2]]
            entry.token = token
            entry.delivery_count += 1
            entry.lease_expires_ms = expires
            entry.version += 1
            heapq.heappush(best[1].leases, (expires, entry.seq, entry.version))
            out.append(
                Delivery(
                    f"{entry.seq}:{token}",
                    entry.message_id,
                    entry.queue,
                    entry.body,
                    entry.delivery_count,
                    expires,
                )
            )
        return out

    def ack(self, deliveries: Sequence[Delivery], claims: Sequence[Claim] = ()) -> int:
        s = self._store
        n = 0
        with s.cond:
            for key, value, ttl_s in claims:
                self._claim_locked(key, value, ttl_s)
            for d in deliveries:
                entry = s.held(d.receipt)
                if entry is not None:
                    s.remove(entry)
                    n += 1
        return n

    def nack(self, delivery: Delivery, *, delay_s: float = 0.0, body: bytes | None = None) -> bool:
        s = self._store
        with s.cond:
            entry = s.held(delivery.receipt)
            if entry is None:
                return False
            now = now_ms()
            entry.token = None
            entry.version += 1
            entry.available_ms = now + max(0, int(delay_s * 1000))
            if body is not None:
                entry.body = body
                entry.delivery_count = 0
            else:
                entry.delivery_count = max(0, entry.delivery_count - 1)
            s.queues[entry.queue].push(entry, now)
            s.cond.notify_all()
            return True

    def extend(self, deliveries: Sequence[Delivery], lease_s: float) -> list[bool]:
        s = self._store
        out: list[bool] = []
        with s.cond:
            expires = now_ms() + int(lease_s * 1000)
            for d in deliveries:
                entry = s.held(d.receipt)
                if entry is None:
                    out.append(False)
                    continue
                entry.lease_expires_ms = expires
                entry.version += 1
                heapq.heappush(s.queues[entry.queue].leases, (expires, entry.seq, entry.version))
                out.append(True)
        return out

    # -- dead letters --------------------------------------------------------------------

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> bool:
        s = self._store
        with s.cond:
            entry = s.held(delivery.receipt)
            if entry is None:
                return False
            s.remove(entry)
            letter = DeadLetter(
                id=new_id(),
                message_id=entry.message_id,
                queue=entry.queue,
                body=entry.body,
                reason=reason,
                detail=detail,
                dead_ms=now_ms(),
                delivery_count=entry.delivery_count,
            )
            s.dead[letter.id] = _Dead(letter, entry.priority)
            return True

    def _selected(self, ids: Sequence[str] | None, queue: str | None) -> list[_Dead]:
        dead = self._store.dead
        chosen = (
            dead.values() if ids is None else [dead[i] for i in dict.fromkeys(ids) if i in dead]
        )
        return [d for d in chosen if queue is None or d.letter.queue == queue]

    def dlq_list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        with self._store.cond:
            return [d.letter for d in self._selected(None, queue)[: max(0, limit)]]

    def dlq_get(self, dead_id: str) -> DeadLetter | None:
        with self._store.cond:
            found = self._store.dead.get(dead_id)
            return found.letter if found is not None else None

    def dlq_replay(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        s = self._store
        with s.cond:
            chosen = self._selected(ids, queue)
            now = now_ms()
            for d in chosen:
                del s.dead[d.letter.id]
                letter = d.letter
                entry = _Entry(
                    next(s.seq), letter.message_id, letter.queue, letter.body, d.priority, now
                )
                s.add(entry, now)
            if chosen:
                s.cond.notify_all()
            return len(chosen)

    def dlq_purge(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        s = self._store
        with s.cond:
            chosen = self._selected(ids, queue)
            for d in chosen:
                del s.dead[d.letter.id]
            return len(chosen)

    # -- depths --------------------------------------------------------------------------

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        s = self._store
        with s.cond:
            now = now_ms()
            dead: dict[str, int] = {}
            for d in s.dead.values():
                dead[d.letter.queue] = dead.get(d.letter.queue, 0) + 1
            names = (
                list(dict.fromkeys(queues))
                if queues is not None
                else sorted(s.known | s.queues.keys() | dead.keys())
            )
            out = []
            for name in names:
                ready = delayed = reserved = 0
                q = s.queues.get(name)
                for e in q.entries.values() if q is not None else ():
                    if e.token is not None and e.lease_expires_ms > now:
                        reserved += 1
                    elif e.token is not None or e.available_ms <= now:
                        ready += 1  # waiting, or its lease lapsed
                    else:
                        delayed += 1
                out.append(QueueStats(name, ready, delayed, reserved, dead.get(name, 0)))
            return out

    def purge(self, queue: str) -> int:
        s = self._store
        with s.cond:
            q = s.queues.get(queue)
            if q is None:
                return 0
            now = now_ms()
            doomed = [e for e in q.entries.values() if e.token is None or e.lease_expires_ms <= now]
            for e in doomed:
                s.remove(e)
            return len(doomed)

    def drop(self, queue: str) -> int:
        s = self._store
        with s.cond:
            s.known.discard(queue)
            q = s.queues.get(queue)
            if q is None:
                return 0
            doomed = list(q.entries.values())
            for e in doomed:
                s.remove(e)
            return len(doomed)

    # -- claims --------------------------------------------------------------------------

    def _held_claim(self, key: str, now: int) -> str | None:
        held = self._store.claims.get(key)
        return held[0] if held is not None and (held[1] is None or held[1] > now) else None

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        with self._store.cond:
            return self._claim_locked(key, value, ttl_s)

    def _claim_locked(self, key: str, value: str, ttl_s: float) -> str:
        s = self._store
        now = now_ms()
        held = self._held_claim(key, now)
        if held is not None:
            return held
        s.claims[key] = (value, now + int(ttl_s * 1000))
        s.claim_ops += 1
        if s.claim_ops % 1024 == 0:  # drop expired claims now and then, not per call
            for k in [k for k, (_, exp) in s.claims.items() if exp is not None and exp <= now]:
                del s.claims[k]
        return value

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        return [self.claim(key, value, ttl_s) for key, value, ttl_s in items]

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        now = now_ms()
        with self._store.cond:
            return [self._held_claim(key, now) for key in keys]

    def release(self, key: str, value: str | None = None) -> bool:
        s = self._store
        with s.cond:
            held = self._held_claim(key, now_ms())
            if held is None or (value is not None and held != value):
                return False
            del s.claims[key]
            return True

    def peek(self, key: str) -> str | None:
        with self._store.cond:
            return self._held_claim(key, now_ms())

    def swap(self, key: str, expected: str | None, new: str | None, ttl_s: float | None) -> bool:
        s = self._store
        with s.cond:
            now = now_ms()
            if self._held_claim(key, now) != expected:
                return False
            if new is None:
                s.claims.pop(key, None)
            else:
                s.claims[key] = (new, None if ttl_s is None else now + int(ttl_s * 1000))
            return True

    def scan(self, prefix: str) -> dict[str, str]:
        s = self._store
        with s.cond:
            now = now_ms()
            return {
                k: v
                for k, (v, exp) in s.claims.items()
                if k.startswith(prefix) and (exp is None or exp > now)
            }

    def ping(self) -> None:
        return None

    def close(self) -> None:
        """Nothing to release: the store outlives instances (see module docstring)."""
