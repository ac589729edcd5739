"""The PostgreSQL broker: ``FOR UPDATE SKIP LOCKED`` reserves, ``LISTEN/NOTIFY`` wake-ups.

Storage is described in ``stem/pg/migrations/0001_initial.sql`` and every statement lives in
``stem/pg/sql/broker.sql``. In short: one row per message; ``available_at`` is when the row
may next be reserved (its not-before time, or its lease deadline while leased), so a lapsed
lease makes a message available again without a sweeper; each reserve draws a fresh
``lease_token``, and the receipt ``"<row id>:<token>"`` only settles the lease it names.

``reserve(wait_s=...)`` waits on NOTIFY (one channel, the queue as payload), re-checking at
least every ``poll_interval_s`` and when the earliest delayed message of its queues is due,
so it also works with ``?listen=false`` behind a transaction pooler. URL options are
documented in :mod:`stem.pg.conninfo`.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

from stem.brokers.base import (
    Claim,
    DeadLetter,
    Delivery,
    Message,
    QueueStats,
    list_limit,
    row_id,
)
from stem.errors import BrokerConnectionError, BrokerError, BrokerTimeoutError
from stem.pg import conninfo, queries
from stem.pg.client import Conn, PgClient
from stem.pg.notify import Notifier
from stem.security.tls import TLSSettings

CHANNEL = "stem_messages"
_CLAIM_SWEEP_EVERY_S = 30.0
_SWEEP_BATCH = 1000  # rows per sweep_claims statement (its LIMIT)
_SWEEP_BATCHES = 200  # batches per sweep at most
_Q = queries.load("broker")


def _ms(seconds: float) -> int:
    return max(0, round(seconds * 1000))


def _receipt(row_id: int, token: uuid.UUID) -> str:
    return f"{row_id}:{token.hex}"


def _parse_receipt(receipt: str) -> tuple[int, uuid.UUID] | None:
    text, sep, token = receipt.partition(":")
    row = row_id(text)
    if not sep or row is None:
        return None
    try:
        return row, uuid.UUID(hex=token)
    except ValueError:
        return None


def _claim_params(items: Sequence[Claim]) -> dict[str, list[Any]]:
    """claim_many's arrays: keys distinct (a repeated key gets the first item's value) and
    sorted, so two batches never lock the same rows in opposite orders."""
    first: dict[str, tuple[str, float]] = {}
    for key, value, ttl_s in items:
        first.setdefault(key, (value, ttl_s))
    keys = sorted(first)
    return {
        "keys": keys,
        "values": [first[k][0] for k in keys],
        "ttls": [_ms(first[k][1]) for k in keys],
    }


def _leases(deliveries: Sequence[Delivery]) -> tuple[list[int], list[uuid.UUID]]:
    ids: list[int] = []
    tokens: list[uuid.UUID] = []
    for d in deliveries:
        parsed = _parse_receipt(d.receipt)
        if parsed is not None:
            ids.append(parsed[0])
            tokens.append(parsed[1])
    return ids, tokens


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string that starts with ``prefix`` (None: none)."""
    while prefix:
        last = ord(prefix[-1]) + 1
        if last <= 0x10FFFF and not 0xD800 <= last <= 0xDFFF:
            return prefix[:-1] + chr(last)
        prefix = prefix[:-1]
    return None


def _dead_ids(ids: Sequence[str] | None) -> list[int] | None:
    if ids is None:
        return None
    return [r for r in map(row_id, ids) if r is not None]


def _dead_letter(row: Any) -> DeadLetter:
    return DeadLetter(
        id=str(row[0]),
        message_id=row[1],
        queue=row[2],
        body=bytes(row[3]),
        reason=row[4],
        detail=row[5],
        dead_ms=int(row[6]),
        delivery_count=int(row[7]),
    )


class PostgresBroker:
    """A :class:`~stem.brokers.base.Broker` on PostgreSQL (see the module docstring)."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self.options = conninfo.parse(url, tls)
        self._client = PgClient(
            self.options,
            error=BrokerError,
            conn_error=BrokerConnectionError,
            timeout_error=BrokerTimeoutError,
            role="broker",
        )
        self._notifier = Notifier(self._client.new_connection, CHANNEL, enabled=self.options.listen)
        self._sweep_lock = threading.Lock()
        self._next_sweep = 0.0

    # -- messages ----------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> None:
        if not messages:
            return
        params = {
            "ids": [m.id for m in messages],
            "queues": [m.queue for m in messages],
            "priorities": [m.priority for m in messages],
            "not_before": [m.not_before_ms for m in messages],
            "bodies": [bytes(m.body) for m in messages],
            "channel": CHANNEL,
        }
        self._client.run("publishing", lambda c: c.execute(_Q["publish"], params), resend=False)

    def _reserve_now(self, queues: list[str], max_n: int, lease_s: float) -> list[Delivery]:
        params = {"queues": queues, "n": max_n, "lease_ms": _ms(lease_s)}
        rows = self._client.run("reserving", lambda c: c.execute(_Q["reserve"], params).fetchall())
        # RETURNING has no order: restore the reserve order (priority, then availability).
        rows.sort(key=lambda r: (-r[7], r[8], r[0]))
        return [
            Delivery(
                receipt=_receipt(r[0], r[1]),
                message_id=r[2],
                queue=r[3],
                body=bytes(r[4]),
                delivery_count=int(r[5]),
                lease_expires_ms=int(r[6]),
            )
            for r in rows
        ]

    def _next_due_s(self, queues: list[str]) -> float | None:
        row = self._client.run(
            "checking delayed messages",
            lambda c: c.execute(_Q["next_due"], {"queues": queues}).fetchone(),
        )
        if row is None or row[1] is None:
            return None
        return max(0.0, (int(row[1]) - int(row[0])) / 1000)

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        names = list(dict.fromkeys(queues))
        if max_n <= 0 or not names:
            return []
        deadline = time.monotonic() + max(0.0, wait_s)
        since = self._notifier.mark() if wait_s > 0 else 0
        while True:
            got = self._reserve_now(names, max_n, lease_s)
            remaining = deadline - time.monotonic()
            if got or remaining <= 0:
                return got
            sleep_s = min(remaining, self.options.poll_interval_s)
            due_s = self._next_due_s(names)
            if due_s is not None:
                sleep_s = min(sleep_s, due_s + 0.001)
            self._notifier.wait(names, since, sleep_s)
            since = self._notifier.mark()

    def ack(self, deliveries: Sequence[Delivery], claims: Sequence[Claim] = ()) -> int:
        ids, tokens = _leases(deliveries)
        params = {"ids": ids, "tokens": tokens}
        if claims:
            self._maybe_sweep_claims()
            claimed = _claim_params(claims)

            def both(c: Conn) -> int:
                # One round trip, one transaction: on an autocommit connection the two
                # statements of a pipeline share the implicit transaction that its one Sync
                # ends (committed if both succeed, rolled back if either fails; PostgreSQL's
                # protocol docs, "Pipelining"). c.transaction() would add a Sync at BEGIN
                # and another at COMMIT.
                if not c.autocommit:  # without it nothing would commit: refuse, lose nothing
                    raise BrokerError("acking with claims needs an autocommit connection")
                with c.pipeline():
                    c.execute(_Q["claim_many"], claimed)
                    cur = c.execute(_Q["ack"], params)
                return cur.rowcount

            return self._client.run("acking", both)
        if not ids:
            return 0
        return self._client.run("acking", lambda c: c.execute(_Q["ack"], params).rowcount)

    def nack(self, delivery: Delivery, *, delay_s: float = 0.0, body: bytes | None = None) -> bool:
        parsed = _parse_receipt(delivery.receipt)
        if parsed is None:
            return False
        params = {
            "id": parsed[0],
            "token": parsed[1],
            "delay_ms": _ms(delay_s),
            "body": None if body is None else bytes(body),
            "channel": CHANNEL,
        }
        return self._client.run("nacking", lambda c: c.execute(_Q["nack"], params).rowcount) > 0

    def extend(self, deliveries: Sequence[Delivery], lease_s: float) -> list[bool]:
        ids, tokens = _leases(deliveries)
        if not ids:
            return [False] * len(deliveries)
        params = {"ids": ids, "tokens": tokens, "lease_ms": _ms(lease_s)}
        rows = self._client.run(
            "extending leases", lambda c: c.execute(_Q["extend"], params).fetchall()
        )
        held = {int(r[0]) for r in rows}
        out: list[bool] = []
        for d in deliveries:
            parsed = _parse_receipt(d.receipt)
            out.append(parsed is not None and parsed[0] in held)
        return out

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> bool:
        parsed = _parse_receipt(delivery.receipt)
        if parsed is None:
            return False
        params = {"id": parsed[0], "token": parsed[1], "reason": reason, "detail": detail}
        return (
            self._client.run(
                "dead-lettering", lambda c: c.execute(_Q["dead_letter"], params).rowcount
            )
            > 0
        )

    # -- dead letters ------------------------------------------------------------------------

    def dlq_list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        params = {"queue": queue, "limit": list_limit(limit)}
        rows = self._client.run(
            "listing dead letters", lambda c: c.execute(_Q["dlq_list"], params).fetchall()
        )
        return [_dead_letter(r) for r in rows]

    def dlq_get(self, dead_id: str) -> DeadLetter | None:
        row_number = row_id(dead_id)
        if row_number is None:
            return None
        row = self._client.run(
            "reading a dead letter",
            lambda c: c.execute(_Q["dlq_get"], {"id": row_number}).fetchone(),
        )
        return None if row is None else _dead_letter(row)

    def dlq_replay(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        params = {"ids": _dead_ids(ids), "queue": queue, "channel": CHANNEL}
        rows = self._client.run(
            "replaying dead letters",
            lambda c: c.execute(_Q["dlq_replay"], params).fetchall(),
            resend=False,
        )
        return sum(int(r[0]) for r in rows)

    def dlq_purge(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        params = {"ids": _dead_ids(ids), "queue": queue}
        return self._client.run(
            "purging dead letters", lambda c: c.execute(_Q["dlq_purge"], params).rowcount
        )

    # -- queues ------------------------------------------------------------------------------

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        names = None if queues is None else list(dict.fromkeys(queues))

        def query(c: Conn) -> tuple[list[Any], list[Any], list[Any]]:
            params = {"queues": names}
            return (
                c.execute(_Q["stats_messages"], params).fetchall(),
                c.execute(_Q["stats_dead"], params).fetchall(),
                [] if names is not None else c.execute(_Q["stats_known"]).fetchall(),
            )

        counts, dead, known = self._client.run("reading queue stats", query)
        table: dict[str, list[int]] = {q: [0, 0, 0, 0] for q in names or ()}
        for (q,) in known:
            table.setdefault(q, [0, 0, 0, 0])
        for q, ready, delayed, reserved in counts:
            table.setdefault(q, [0, 0, 0, 0])[:3] = [int(ready), int(delayed), int(reserved)]
        for q, n in dead:
            table.setdefault(q, [0, 0, 0, 0])[3] = int(n)
        order = names if names is not None else sorted(table)
        return [QueueStats(q, *table[q]) for q in order]

    def purge(self, queue: str) -> int:
        return self._client.run(
            "purging a queue", lambda c: c.execute(_Q["purge"], {"queue": queue}).rowcount
        )

    def drop(self, queue: str) -> int:
        return self._client.run(
            "dropping a queue", lambda c: c.execute(_Q["drop"], {"queue": queue}).rowcount
        )

    # -- claims ------------------------------------------------------------------------------

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        self._maybe_sweep_claims()
        params = {"key": key, "value": value, "ttl_ms": _ms(ttl_s)}

        def attempt(c: Conn) -> str | None:
            row = c.execute(_Q["claim"], params).fetchone()
            if row is not None:
                return str(row[0])
            held = c.execute(_Q["peek"], {"key": key}).fetchone()
            return None if held is None else str(held[0])

        # The live holder may lapse or be released between our two statements: try again.
        for _ in range(5):
            held = self._client.run("claiming a key", attempt)
            if held is not None:
                return held
        raise BrokerError(f"could not claim key {key!r}: it kept changing hands")

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        if not items:
            return []
        self._maybe_sweep_claims()
        params = _claim_params(items)
        keys = params["keys"]

        def attempt(c: Conn) -> dict[str, str]:
            held = {str(k): str(v) for k, v in c.execute(_Q["claim_many"], params).fetchall()}
            missing = [k for k in keys if k not in held]
            if missing:
                rows = c.execute(_Q["peek_many"], {"keys": missing}).fetchall()
                held.update((str(k), str(v)) for k, v in rows)
            return held

        held = self._client.run("claiming keys", attempt)
        # A holder that lapsed or was released between the two statements: claim one by one.
        return [
            held[key] if key in held else self.claim(key, value, ttl_s)
            for key, value, ttl_s in items
        ]

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        if not keys:
            return []
        rows = self._client.run(
            "reading keys",
            lambda c: c.execute(_Q["peek_many"], {"keys": list(keys)}).fetchall(),
        )
        held = {str(k): str(v) for k, v in rows}
        return [held.get(key) for key in keys]

    def _maybe_sweep_claims(self) -> None:
        now = time.monotonic()
        with self._sweep_lock:
            if now < self._next_sweep:
                return
            self._next_sweep = now + _CLAIM_SWEEP_EVERY_S
        self.sweep()

    def sweep(self) -> int:
        """Delete expired claims, in bounded batches until none is left (or a cap is hit:
        the rest goes at the next sweep). One replay nonce is written per signed message,
        so one batch per sweep fell behind above about 33 messages a second."""
        total = 0
        for _ in range(_SWEEP_BATCHES):
            n = self._client.run(
                "sweeping expired claims", lambda c: c.execute(_Q["sweep_claims"]).rowcount
            )
            total += n
            if n < _SWEEP_BATCH:
                break
        return total

    def release(self, key: str, value: str | None = None) -> bool:
        params = {"key": key, "value": value}
        return (
            self._client.run("releasing a key", lambda c: c.execute(_Q["release"], params).rowcount)
            > 0
        )

    def swap(self, key: str, expected: str | None, new: str | None, ttl_s: float | None) -> bool:
        self._maybe_sweep_claims()  # (heartbeats, rate and concurrency limits write so)
        params = {
            "key": key,
            "expected": expected,
            "new": new,
            "ttl_ms": None if ttl_s is None else _ms(ttl_s),
        }
        if new is None:
            if expected is None:  # "absent -> absent" holds exactly when nothing is live
                return self.peek(key) is None
            return self.release(key, expected)
        name = "swap_from_absent" if expected is None else "swap_value"
        return (
            self._client.run("swapping a key", lambda c: c.execute(_Q[name], params).rowcount) > 0
        )

    def scan(self, prefix: str) -> dict[str, str]:
        params = {"lo": prefix, "hi": _prefix_end(prefix)}
        rows = self._client.run("scanning keys", lambda c: c.execute(_Q["scan"], params).fetchall())
        return {str(k): str(v) for k, v in rows}

    def peek(self, key: str) -> str | None:
        row = self._client.run(
            "reading a key", lambda c: c.execute(_Q["peek"], {"key": key}).fetchone()
        )
        return None if row is None else str(row[0])

    # -- lifecycle ---------------------------------------------------------------------------

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._notifier.close()
        self._client.close()

    def __repr__(self) -> str:
        return f"PostgresBroker({self.options.target!r})"
