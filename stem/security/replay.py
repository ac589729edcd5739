"""Replay protection: each signed message's nonce runs to completion once.

The nonce of a verified message is recorded in the broker's claim store under
``nonce:{key_id}:{nonce}`` when a worker *settles* the delivery (success, failure, retry
re-publish, dead letter), not when it starts running it: in the same atomic
``Broker.ack`` call as the ack, after any result record was written
(:meth:`stem.worker.settle.Settler.ack`). So:

* a message redelivered because its worker crashed (lease lapsed, nothing settled) still runs
  -- delivery stays at-least-once;
* a copy re-injected into the broker after the original settled is rejected with
  ``signature-replayed``;
* two copies in flight at the same moment may both run (the guard is not a lock; tasks are
  idempotent under at-least-once anyway). That includes a copy re-injected as soon as the
  original's result appears, if a worker checks it before the ack is sent (at once, or
  within the ack batcher's linger of 1 ms while the worker is short of CPU).

A nonce is remembered for as long as its message could still pass verification: until
``max(issued_at, not_before) + replay window`` plus the clock skew allowance and a margin.
Older copies are refused by :meth:`Keyring.verify` as ``signature-expired`` instead.

Call :meth:`ReplayGuard.check` only after :meth:`Keyring.verify` succeeded: the key id and
nonce are only trustworthy (and bounded in size) once the signature covering them is checked.

A worker checks the nonces of a reserved batch in one read. A broker that
:class:`~stem.brokers.base.PeeksOnReserve` (Redis) reads each claim in the reserve call
itself, off the unverified body; :meth:`ReplayGuard.replayed` takes such a reading only
for the nonce it names, so a body that misleads the broker's reading costs one more read,
not a replay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from stem import envelope as codec
from stem.envelope import Envelope, SignatureBlock
from stem.errors import SignatureError
from stem.security.signing import DEFAULT_CLOCK_SKEW_S, Keyring

DEFAULT_MARGIN_S = 60.0
NONCE_PREFIX = "nonce:"  # claim keys: NONCE_PREFIX + key id + ":" + nonce


class ClaimStore(Protocol):
    """The part of :class:`~stem.brokers.base.Broker` the guard uses."""

    def claim(self, key: str, value: str, ttl_s: float) -> str: ...

    def peek(self, key: str) -> str | None: ...

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]: ...

    def peek_many(self, keys: Sequence[str]) -> list[str | None]: ...


def _block(item: Envelope | SignatureBlock) -> SignatureBlock | None:
    return item.signature if isinstance(item, Envelope) else item


class ReplayGuard:
    """Rejects signed messages whose nonce was already consumed (see module docstring)."""

    def __init__(
        self,
        broker: ClaimStore,
        window_s: float,
        *,
        clock_skew_s: float = DEFAULT_CLOCK_SKEW_S,
        margin_s: float = DEFAULT_MARGIN_S,
    ) -> None:
        self.broker = broker
        self.window_s = window_s
        self.clock_skew_s = clock_skew_s
        self.margin_s = margin_s

    @classmethod
    def for_keyring(cls, broker: ClaimStore, keyring: Keyring) -> ReplayGuard:
        return cls(broker, keyring.replay_window_s, clock_skew_s=keyring.clock_skew_s)

    @staticmethod
    def key(block: SignatureBlock) -> str:
        return f"{NONCE_PREFIX}{block.key_id}:{block.nonce}"

    def check(self, item: Envelope | SignatureBlock) -> None:
        """Raise ``SignatureError("signature-replayed")`` if this nonce was consumed.
        Unsigned messages pass (whether they may run is the keyring's decision)."""
        err = self.replayed([item])[0]
        if err is not None:
            raise err

    def replayed(
        self,
        items: Sequence[Envelope | SignatureBlock],
        peeked: Sequence[tuple[str, str | None] | None] = (),
    ) -> list[SignatureError | None]:
        """:meth:`check` for many messages in one broker call: for each, the error it would
        raise, or None. ``peeked``: what the broker read while reserving each message
        (:attr:`~stem.brokers.base.Delivery.peeked`), used where its key is this nonce's;
        only the others are read, in one call."""
        blocks = [_block(item) for item in items]
        holders: list[str | None] = [None] * len(blocks)
        unread: dict[int, str] = {}  # index -> key, for the broker to read
        for i, block in enumerate(blocks):
            if block is None:
                continue
            key = self.key(block)
            hint = peeked[i] if i < len(peeked) else None
            if hint is not None and hint[0] == key:
                holders[i] = hint[1]
            else:
                unread[i] = key
        if unread:
            read = self.broker.peek_many(list(unread.values()))
            for i, holder in zip(unread, read, strict=True):
                holders[i] = holder
        return [
            None
            if block is None or holder is None
            else SignatureError(
                "signature-replayed",
                f"replayed: the nonce of key {block.key_id!r} was already used "
                f"by message {holder[:64]!r}",
            )
            for block, holder in zip(blocks, holders, strict=True)
        ]

    def ttl_s(self, item: Envelope | SignatureBlock, *, now_ms: int | None = None) -> float:
        """How long the nonce must be remembered from now."""
        block = _block(item)
        if block is None:
            return 0.0
        not_before = item.not_before_ms if isinstance(item, Envelope) else None
        now = codec.now_ms() if now_ms is None else now_ms
        valid_until_ms = max(block.issued_at_ms, not_before or 0) + self.window_s * 1000
        remaining_s = max(self.window_s, (valid_until_ms - now) / 1000)
        return remaining_s + self.clock_skew_s + self.margin_s

    def consume(self, item: Envelope | SignatureBlock, *, now_ms: int | None = None) -> bool:
        """Record the nonce as used. True if it is now held for this message id (also when
        it already was), False if another message holds it. Unsigned messages: False."""
        claim = self.claim_of(item, now_ms=now_ms)
        if claim is None:
            return False
        return self.broker.claim(*claim) == claim[1]

    def claim_of(
        self, item: Envelope | SignatureBlock, *, now_ms: int | None = None
    ) -> tuple[str, str, float] | None:
        """The ``(key, value, ttl_s)`` claim that consumes this nonce (for a batched
        ``Broker.claim_many``), or None for an unsigned message."""
        block = _block(item)
        if block is None:
            return None
        value = item.id if isinstance(item, Envelope) else "control"
        return self.key(block), value, self.ttl_s(item, now_ms=now_ms)
