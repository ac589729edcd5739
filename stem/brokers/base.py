"""The broker contract: queue-level operations every broker implements.

A broker stores opaque message bodies (encoded, possibly signed envelopes) together with the
few fields it must act on itself: queue, priority and not-before time. Priority and delays
are kept broker-side, never in worker memory. Workers take deliveries under a lease; a
delivery whose lease lapses (its worker died) becomes available again with its delivery
count raised by one. ``tests/contract/`` holds the one suite every broker passes.

Ordering: within one queue, a higher priority is delivered first, then the message that
became available earliest. Across several queues no order is promised.

Leases: a delivery is identified by its ``receipt``, which names one lease. Once a lease has
lapsed and the message was delivered again, the old receipt no longer acks, nacks, extends
or dead-letters anything (those calls report ``False`` / a count of 0), so a slow worker
cannot settle a delivery that now belongs to someone else.

Claims: a small expiring key-value primitive kept in the broker's store (set-if-absent),
used for replay protection, unique tasks, beat ticks and revocations, so that several
processes on several hosts agree.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Claim = tuple[str, str, float]
"""A claim as :meth:`Broker.claim_many` takes it: ``(key, value, ttl_s)``."""

DLQ_LIST_MAX = 100_000  # dead letters one dlq_list call returns at most
_ROW_ID = re.compile(r"[0-9]{1,18}")  # ASCII digits that fit a 64-bit integer column


def list_limit(limit: int) -> int:
    """``limit`` as a dlq_list call honours it: 0..DLQ_LIST_MAX."""
    return min(max(0, limit), DLQ_LIST_MAX)


def row_id(text: str) -> int | None:
    """The row id a SQL broker's dead-letter id or receipt names, or None when ``text``
    is not one (so nothing is found, rather than an overflow deep in the driver)."""
    return int(text) if _ROW_ID.fullmatch(text) else None


@dataclass(frozen=True, slots=True)
class Message:
    """What a producer hands to a broker."""

    id: str
    queue: str
    body: bytes
    priority: int = 0
    not_before_ms: int | None = None


@dataclass(frozen=True, slots=True)
class Delivery:
    """One leased delivery of a message. ``delivery_count`` is 1 on the first delivery.

    ``peeked``: on a broker that :class:`PeeksOnReserve`, the replay claim it read off the
    body in the same step as the lease, as ``(key, value or None)``; None where it read
    none. Only a hint, read before any signature was checked: the worker uses it only when
    the key is the one of the nonce it verified."""

    receipt: str
    message_id: str
    queue: str
    body: bytes
    delivery_count: int
    lease_expires_ms: int
    peeked: tuple[str, str | None] | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message moved to the dead-letter queue, with the reason it was moved."""

    id: str
    message_id: str
    queue: str
    body: bytes
    reason: str
    detail: str
    dead_ms: int
    delivery_count: int


@dataclass(frozen=True, slots=True)
class QueueStats:
    queue: str
    ready: int
    delayed: int
    reserved: int
    dead: int


@runtime_checkable
class Broker(Protocol):
    """Queue-level broker contract (see module docstring for the guarantees)."""

    url: str

    def publish(self, messages: Sequence[Message]) -> None:
        """Store messages durably. A message with ``not_before_ms`` in the future is delayed
        until then. Raises :class:`~stem.errors.BrokerConnectionError` if unreachable."""

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        """Lease up to ``max_n`` available messages from ``queues`` for ``lease_s`` seconds,
        waiting up to ``wait_s`` seconds for the first one. Returns at most ``max_n``."""

    def ack(self, deliveries: Sequence[Delivery], claims: Sequence[Claim] = ()) -> int:
        """Remove settled messages. Returns how many leases were still held. ``claims``
        (``(key, value, ttl_s)``, as :meth:`claim_many` takes them: the replay nonces of
        the messages acked) are recorded in the same atomic step, whether or not the
        leases were still held: either the claims are set and the messages gone, or
        neither. A claim may be kept longer than its ``ttl_s``, never shorter (Redis keeps
        all of one call's claims for the longest ``ttl_s`` among them)."""

    def nack(self, delivery: Delivery, *, delay_s: float = 0.0, body: bytes | None = None) -> bool:
        """Hand a message back, available again after ``delay_s``. The delivery count goes
        back to what it was before this delivery; with a new ``body`` (a retry) it restarts
        at 0. Returns False if the lease had already lapsed."""

    def extend(self, deliveries: Sequence[Delivery], lease_s: float) -> list[bool]:
        """Renew leases to ``lease_s`` from now; False where the message was delivered again
        (a lapsed lease whose message nobody took yet may be renewed, or may report False)."""

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> bool:
        """Atomically move a leased message to the dead-letter queue."""

    def dlq_list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        """Dead letters, oldest first, optionally for one queue."""

    def dlq_get(self, dead_id: str) -> DeadLetter | None: ...

    def dlq_replay(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        """Move dead letters (all, those of ``queue``, or those named) back to their queues
        with a delivery count of 0. Returns how many moved."""

    def dlq_purge(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        """Delete dead letters. Returns how many were deleted."""

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        """Depths for the named queues, or for every queue the broker knows."""

    def purge(self, queue: str) -> int:
        """Delete the ready and delayed messages of a queue (not leased ones)."""

    def drop(self, queue: str) -> int:
        """Delete a queue: all its messages, leased ones included, and its name, so
        :meth:`stats` no longer lists it (its dead letters stay, under its name). For queues
        that live briefly: a control call's reply queue, a stopped worker's control queue.
        Publishing to it later creates it again. Returns how many messages were deleted."""

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        """Set ``key`` to ``value`` for ``ttl_s`` seconds unless it holds a live value.
        Returns the value now held (equal to ``value`` when this call claimed it)."""

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        """:meth:`claim` for each ``(key, value, ttl_s)``, in order, in as few round trips
        as the store allows. Returns the value now held for each item (an item whose key
        an earlier item of the same call claimed gets that item's value). ``ttl_s`` must be
        positive: a claim that expires at once holds nothing to agree on."""

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        """:meth:`peek` for each key, in one round trip where the store allows."""

    def release(self, key: str, value: str | None = None) -> bool:
        """Delete ``key`` (only if it holds ``value``, when given)."""

    def peek(self, key: str) -> str | None:
        """The live value of ``key``, or None."""

    def swap(self, key: str, expected: str | None, new: str | None, ttl_s: float | None) -> bool:
        """Compare-and-set: if ``key`` holds ``expected`` (None: absent or expired), set it
        to ``new`` (None: delete) with ``ttl_s`` (None: no expiry). True if it swapped."""

    def scan(self, prefix: str) -> dict[str, str]:
        """Every live key starting with ``prefix``, with its value."""

    def ping(self) -> None:
        """Raise :class:`~stem.errors.BrokerConnectionError` unless the broker answers."""

    def close(self) -> None: ...


@runtime_checkable
class PeeksOnReserve(Protocol):
    """A broker that can read each signed message's replay claim while it reserves it,
    sparing the worker a round trip per batch (:attr:`Delivery.peeked`). Optional."""

    def peek_on_reserve(self, prefix: str) -> None:
        """From now on, fill :attr:`Delivery.peeked` with the claim ``prefix + key id + ":"
        + nonce`` of each delivery whose body holds a signature block as Stem writes it."""
