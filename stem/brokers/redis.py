"""The Redis broker: Streams and a consumer group per queue and priority.

``redis://host:port/db?prefix=stem:`` (``rediss://`` for TLS; options in
:mod:`stem.redis_conn`). Every state change is one call of ``redis_queue.lua``, whose header
documents the key layout, so a crash at any moment leaves each message either ready, delayed,
leased (with a lease that will lapse) or dead, never lost and never read without a lease.

- Priority: one stream per priority level; reserve reads 9 down to 0, each oldest first.
- Leases: a sorted set of receipts by expiry, written in the same call that reads the entry.
  A lease lapses only by time, never by age: ``extend`` moves its expiry, and only lapsed
  leases are put back (by the next ``reserve``), with the delivery counted.
- Delays, retries and lapsed leases are promoted into their streams by ``reserve`` itself, so
  no sweeper process is needed.
- Waiting: ``reserve(wait_s=...)`` blocks with ``XREAD BLOCK`` on the queues' notify streams
  from the last mark seen by the check before it (no lost wake-up), and no longer than until
  the next delay is due or lease lapses. A connection lost while waiting is retried until
  ``wait_s`` runs out, so a blocked reserve survives a Redis restart.
- Claims are plain keys with ``PX`` (``redis_claims.lua``).

Run Redis with ``maxmemory-policy noeviction`` (the default) and an AOF for durability;
``ping`` warns if the server may evict keys.

Not for Redis Cluster: the scripts touch keys of several queues in one call.
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Iterator, Sequence
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any

import redis

from stem.brokers.base import Claim, DeadLetter, Delivery, Message, QueueStats, list_limit
from stem.errors import BrokerConnectionError, BrokerError, BrokerTimeoutError
from stem.observability.redact import redact_url
from stem.redis_conn import RedisConn
from stem.security.tls import TLSSettings

__all__ = ["RedisBroker"]

log = logging.getLogger("stem.redis")

_HERE = Path(__file__).parent
_PUBLISH_CHUNK = 500  # messages per script call: keeps each call well under a millisecond
_SETTLE_CHUNK = 1000
_DEAD_ID = re.compile(r"[0-9]{1,19}-[0-9]{1,19}")  # stream ids: two 64-bit numbers
_GLOB_SPECIAL = re.compile(r"([\\*?\[\]])")


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _str(value: Any) -> str:
    """Text read from Redis; what is not UTF-8 (written by something else than Stem) is
    escaped (``\\xff``), not a reason to fail the read it came in; escaped, not replaced,
    so two such ids do not read as one."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


def _int(value: Any) -> int:
    """A number field of a record written by hand may hold anything: 0 then."""
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def _xrange(c: redis.Redis, *, key: str, start: str, count: int) -> Any:
    """Stream entries from ``start`` (a plain id includes that id, "(" excludes it)."""
    return c.xrange(key, min=start, max="+", count=count)


def _peeked(key: Any, value: Any) -> tuple[str, str | None] | None:
    """A reserve's (claim key, value) pair; the script sends 0 for none."""
    if key == 0:
        return None
    try:  # read off an unverified body: bytes that are not UTF-8 mean nothing was read
        return key.decode(), None if value == 0 else value.decode()
    except (AttributeError, UnicodeDecodeError):
        return None


def _chunks(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


class RedisBroker:
    """A :class:`~stem.brokers.base.Broker` on Redis (see the module docstring)."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self._conn = RedisConn(
            url,
            tls,
            error=BrokerError,
            conn_error=BrokerConnectionError,
            timeout_error=BrokerTimeoutError,
        )
        self._prefix = self._conn.prefix
        self._queue = self._conn.load_script(_HERE / "redis_queue.lua")
        self._claims = self._conn.load_script(_HERE / "redis_claims.lua")
        self._peek = ""  # claim key prefix of the replay nonces reserve reads ("" for none)

    def __repr__(self) -> str:
        return f"<RedisBroker {redact_url(self.url)}>"

    def _call(self, doing: str, command: str, *args: Any) -> Any:
        """One atomic ``redis_queue.lua`` call."""
        call = [command, self._prefix, *args]
        return self._conn.run(doing, lambda c: self._conn.evalsha(self._queue, (), call))

    # -- messages ----------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        calls = []
        for chunk in _chunks(messages, _PUBLISH_CHUNK):
            args: list[Any] = ["publish", self._prefix, secrets.token_hex(6)]
            for m in chunk:
                nb = "" if m.not_before_ms is None else str(int(m.not_before_ms))
                args += [m.queue, min(9, max(0, int(m.priority))), nb, m.id, bytes(m.body)]
            calls.append(args)
        # Chunks keep each script short (Redis runs nothing else meanwhile); each is all or
        # nothing, a batch of several is not: the error says how many chunks went in.
        doing = f"publishing {len(messages)} messages in chunks of {_PUBLISH_CHUNK}"
        try:
            self._conn.eval_many(doing, self._queue, calls)
        except BrokerConnectionError as exc:
            if len(calls) == 1 or isinstance(exc, BrokerTimeoutError):
                raise
            # Some chunks may have gone in before the connection failed: not one to send
            # again whole (they would run twice).
            raise BrokerTimeoutError(f"{exc} (some chunks may have gone in)") from None

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        names = list(dict.fromkeys(queues))
        if max_n <= 0 or not names:
            return []
        deadline = time.monotonic() + max(0.0, wait_s)
        lease_ms = max(1, _ms(lease_s))
        backoff_s = 0.05
        while True:
            try:
                got, due_in_ms, marks = self._take(names, max_n, lease_ms)
                if got:
                    return got
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return []
                self._wait(names, marks, due_in_ms, remaining_s)
                backoff_s = 0.05
            except (redis.RedisError, OSError) as exc:
                remaining_s = deadline - time.monotonic()
                if not self._conn.is_connection_error(exc) or remaining_s <= 0:
                    raise self._conn.fail(exc, "reserving") from None
                # Redis is restarting or the network blinked: keep trying while we may wait.
                time.sleep(min(backoff_s, remaining_s))
                backoff_s = min(backoff_s * 2, 1.0)

    def _take(
        self, names: list[str], max_n: int, lease_ms: int
    ) -> tuple[list[Delivery], int, list[bytes]]:
        token = secrets.token_hex(6)
        peek = self._peek
        args = ["reserve", self._prefix, lease_ms, max_n, token, peek, *names]
        res = self._conn.evalsha(self._queue, (), args)
        expires = int(res[0])
        flat = res[1]
        step = 7 if peek else 5
        got = [
            Delivery(
                receipt=_str(flat[i + 1]),
                message_id=_str(flat[i + 2]),
                queue=_str(flat[i]),
                body=bytes(flat[i + 3]),
                delivery_count=int(flat[i + 4]),
                lease_expires_ms=expires,
                peeked=_peeked(flat[i + 5], flat[i + 6]) if step == 7 else None,
            )
            for i in range(0, len(flat), step)
        ]
        if got:
            return got, -1, []
        return got, int(res[2]), list(res[3])

    def _wait(
        self, names: list[str], marks: list[bytes], due_in_ms: int, remaining_s: float
    ) -> None:
        block_s = min(remaining_s, self._conn.max_block_s)
        if due_in_ms >= 0:
            block_s = min(block_s, due_in_ms / 1000)
        streams: dict[Any, Any] = {
            f"{self._prefix}q:{q}:notify": mark for q, mark in zip(names, marks, strict=True)
        }
        self._conn.client.xread(streams, count=1, block=max(1, _ms(block_s)))

    def peek_on_reserve(self, prefix: str) -> None:
        """See :class:`~stem.brokers.base.PeeksOnReserve`: the reserve script reads the
        nonce off the body and the claim in the same call."""
        if not prefix:
            raise ValueError("peek_on_reserve needs a non-empty claim key prefix")
        self._peek = prefix

    def ack(self, deliveries: Sequence[Delivery], claims: Sequence[Claim] = ()) -> int:
        if not deliveries and not claims:
            return 0
        # Claims and acks in one script call: one atomic step, never split between calls
        # (a script has no rollback, but this one's commands fail only on keys of the wrong
        # type, which Stem never writes). Without claims, a large batch is cut into calls
        # that each hold the server for a bounded time.
        # One ttl for the batch, the longest asked for: remembering a nonce longer than
        # needed costs only memory, and it spares a number per claim.
        ttl_ms = max(1, int(max(c[2] for c in claims) * 1000)) if claims else 0
        head: list[Any] = [len(claims), ttl_ms]
        for key, value, _ in claims:
            head += [key, value]
        calls = []
        chunks = [deliveries] if claims else _chunks(deliveries, _SETTLE_CHUNK)
        for chunk in chunks or [()]:
            args = ["ack", self._prefix, *head]  # claims make one chunk; else head is [0, 0]
            for d in chunk:
                args += [d.queue, d.receipt]
            calls.append(args)
        return sum(int(n) for n in self._conn.eval_many("acknowledging", self._queue, calls))

    def nack(self, delivery: Delivery, *, delay_s: float = 0.0, body: bytes | None = None) -> bool:
        has_body = "0" if body is None else "1"
        res = self._call(
            "handing a message back",
            "nack",
            delivery.queue,
            delivery.receipt,
            _ms(delay_s),
            has_body,
            b"" if body is None else bytes(body),
        )
        return bool(res)

    def extend(self, deliveries: Sequence[Delivery], lease_s: float) -> list[bool]:
        if not deliveries:
            return []
        args: list[Any] = [max(1, _ms(lease_s))]
        for d in deliveries:
            args += [d.queue, d.receipt]
        res = self._call("extending leases", "extend", *args)
        return [bool(int(flag)) for flag in res[1:]]

    # -- dead letters ------------------------------------------------------------------------

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> bool:
        res = self._call(
            "dead-lettering a message", "dead", delivery.queue, delivery.receipt, reason, detail
        )
        return bool(res)

    def _letter(self, entry_id: Any, raw: dict[bytes, bytes]) -> DeadLetter:
        """A dead letter from its stream entry; one written by hand may lack fields."""
        return DeadLetter(
            id=_str(entry_id),
            message_id=_str(raw.get(b"m", b"")),
            queue=_str(raw.get(b"q", b"")),
            body=bytes(raw.get(b"b", b"")),
            reason=_str(raw.get(b"r", b"")),
            detail=_str(raw.get(b"d", b"")),
            dead_ms=_int(raw.get(b"t")),
            delivery_count=_int(raw.get(b"n")),
        )

    def _iter_dead(self, queue: str | None, batch: int = 500) -> Iterator[DeadLetter]:
        key = f"{self._prefix}dead"
        wanted = None if queue is None else queue.encode()
        start = "-"
        while True:
            entries: Any = self._conn.run(
                "listing dead letters", partial(_xrange, key=key, start=start, count=batch)
            )
            for entry_id, raw in entries:
                if wanted is None or raw.get(b"q") == wanted:
                    yield self._letter(entry_id, raw)
            if len(entries) < batch:
                return
            start = "(" + _str(entries[-1][0])

    def dlq_list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        limit = list_limit(limit)
        if limit <= 0:
            return []
        return list(islice(self._iter_dead(queue, batch=min(max(limit, 100), 1000)), limit))

    def dlq_get(self, dead_id: str) -> DeadLetter | None:
        if not _DEAD_ID.fullmatch(dead_id):
            return None
        key = f"{self._prefix}dead"
        found: Any = self._conn.run(
            "reading a dead letter", lambda c: c.xrange(key, dead_id, dead_id)
        )
        return self._letter(*found[0]) if found else None

    def _dead_ids(self, ids: Sequence[str] | None, queue: str | None) -> list[str]:
        if ids is None:
            return [d.id for d in self._iter_dead(queue)]
        return [i for i in dict.fromkeys(ids) if _DEAD_ID.fullmatch(i)]

    def _move_dead(self, command: str, doing: str, ids: list[str], queue: str | None) -> int:
        if not ids:
            return 0
        calls = [[command, self._prefix, queue or "", *chunk] for chunk in _chunks(ids, 500)]
        return sum(int(n) for n in self._conn.eval_many(doing, self._queue, calls))

    def dlq_replay(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        chosen = self._dead_ids(ids, queue)
        return self._move_dead("replay", "replaying dead letters", chosen, queue)

    def dlq_purge(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        chosen = self._dead_ids(ids, queue)
        return self._move_dead("dlq_purge", "purging dead letters", chosen, queue)

    # -- depths ------------------------------------------------------------------------------

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        if queues is None:
            # Every queue published to and not dropped, and every queue with dead letters.
            def listing(c: Any) -> list[Any]:
                return [*c.smembers(f"{self._prefix}queues"), *c.hkeys(f"{self._prefix}dead:count")]

            names = sorted({_str(q) for q in self._conn.run("listing queues", listing)})
        else:
            names = list(dict.fromkeys(queues))
        if not names:
            return []
        rows = self._call("reading queue depths", "stats", *names)
        return [
            QueueStats(name, int(r[0]), int(r[1]), int(r[2]), int(r[3]))
            for name, r in zip(names, rows, strict=True)
        ]

    def purge(self, queue: str) -> int:
        return int(self._call("purging a queue", "purge", queue))

    def drop(self, queue: str) -> int:
        return int(self._call("dropping a queue", "drop", queue))

    # -- claims ------------------------------------------------------------------------------

    def _claim_key(self, key: str) -> str:
        return f"{self._prefix}claim:{key}"

    def _claim_call(self, doing: str, key: str, *args: Any) -> Any:
        return self._conn.run(
            doing, lambda c: self._conn.evalsha(self._claims, [self._claim_key(key)], args)
        )

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        return self.claim_many([(key, value, ttl_s)])[0]

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        held: list[str] = []
        for chunk in _chunks(items, _SETTLE_CHUNK):
            keys = [self._claim_key(key) for key, _, _ in chunk]
            args: list[Any] = ["claim_many"]
            for _, value, ttl_s in chunk:
                args += [value, max(1, _ms(ttl_s)) if ttl_s > 0 else 0]

            def call(c: Any, keys: list[str] = keys, args: list[Any] = args) -> Any:
                return self._conn.evalsha(self._claims, keys, args)

            held += [_str(v) for v in self._conn.run("claiming keys", call)]
        return held

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        full = [self._claim_key(key) for key in keys]
        values = self._conn.run("reading keys", lambda c: self._conn.command("MGET", *full))
        return [None if v is None else _str(v) for v in values]

    def release(self, key: str, value: str | None = None) -> bool:
        if value is None:
            full = self._claim_key(key)
            return bool(self._conn.run("releasing a key", lambda c: c.delete(full)))
        return bool(self._claim_call("releasing a key", key, "release", value))

    def peek(self, key: str) -> str | None:
        full = self._claim_key(key)
        value = self._conn.run("reading a key", lambda c: c.get(full))
        return None if value is None else _str(value)

    def swap(self, key: str, expected: str | None, new: str | None, ttl_s: float | None) -> bool:
        ttl = "" if ttl_s is None else str(max(1, _ms(ttl_s)) if ttl_s > 0 else 0)
        res = self._claim_call(
            "swapping a key",
            key,
            "swap",
            "0" if expected is None else "1",
            expected or "",
            "0" if new is None else "1",
            new or "",
            ttl,
        )
        return bool(res)

    def scan(self, prefix: str) -> dict[str, str]:
        base = self._claim_key("")
        pattern = _GLOB_SPECIAL.sub(r"\\\1", base + prefix) + "*"

        def go(c: redis.Redis) -> dict[str, str]:
            keys = list(c.scan_iter(match=pattern, count=1000))
            found: dict[str, str] = {}
            for chunk in _chunks(keys, 1000):
                for k, v in zip(chunk, c.mget(chunk), strict=True):
                    if v is not None:
                        found[_str(k)[len(base) :]] = _str(v)
            return found

        return self._conn.run("scanning keys", go)

    # -- lifecycle ---------------------------------------------------------------------------

    def ping(self) -> None:
        self._conn.ping()  # (warns once if the server evicts keys)

    def close(self) -> None:
        self._conn.close()
