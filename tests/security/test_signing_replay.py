"""ReplayGuard: a nonce runs to completion once; crash redeliveries still run."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import pytest

from stem import envelope as codec
from stem.envelope import Envelope, SignatureBlock
from stem.errors import SignatureError
from stem.security.replay import ClaimStore, ReplayGuard
from stem.security.signing import Keyring

NOW = 1_800_000_000_000
WINDOW_S = 600.0
RING = Keyring.build("hmac-sha256", {"v1": b"s" * 32}, replay_window_s=WINDOW_S)


@dataclass
class FakeClaims:
    """Set-if-absent with expiry, on a clock the test moves."""

    now_ms: int = NOW
    claims: dict[str, tuple[str, int]] = field(default_factory=dict)
    ttls: list[float] = field(default_factory=list)

    def _held(self, key: str) -> str | None:
        held = self.claims.get(key)
        return held[0] if held is not None and held[1] > self.now_ms else None

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        self.ttls.append(ttl_s)
        held = self._held(key)
        if held is not None:
            return held
        self.claims[key] = (value, self.now_ms + int(ttl_s * 1000))
        return value

    def peek(self, key: str) -> str | None:
        return self._held(key)

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        return [self.claim(*item) for item in items]

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        return [self._held(key) for key in keys]


Clock = Callable[[int], None]


@pytest.fixture(params=["fake", "memory"])
def store(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[ClaimStore, Clock]]:
    if request.param == "fake":
        fake = FakeClaims()

        def set_fake(t: int) -> None:
            fake.now_ms = t

        yield fake, set_fake
        return
    memory = pytest.importorskip("stem.brokers.memory")
    clock = {"now": NOW}
    monkeypatch.setattr(memory, "now_ms", lambda: clock["now"])
    broker = memory.MemoryBroker(f"memory://replay-{uuid.uuid4().hex}")

    def set_memory(t: int) -> None:
        clock["now"] = t

    try:
        yield broker, set_memory
    finally:
        broker.close()


def signed(**kw: object) -> Envelope:
    return RING.sign(Envelope(id="t1", task="x", **kw), now_ms=NOW)  # type: ignore[arg-type]


def test_fresh_message_passes_and_a_consumed_nonce_is_replayed(
    store: tuple[ClaimStore, Clock],
) -> None:
    broker, _ = store
    guard = ReplayGuard.for_keyring(broker, RING)
    env = signed()
    guard.check(env)
    assert guard.consume(env, now_ms=NOW)
    copy = codec.decode(codec.encode(env))
    with pytest.raises(SignatureError) as exc:
        guard.check(copy)
    assert exc.value.reason == "signature-replayed"
    assert "t1" in str(exc.value)


def test_redelivery_before_settlement_still_runs(store: tuple[ClaimStore, Clock]) -> None:
    # check at admission, consume at settlement: a crash in between leaves no trace
    broker, _ = store
    guard = ReplayGuard(broker, WINDOW_S)
    env = signed()
    guard.check(env)  # first worker admits it, then dies before settling
    guard.check(env)  # the redelivery is admitted too
    assert guard.consume(env, now_ms=NOW)
    assert guard.consume(env, now_ms=NOW)  # settling twice is harmless


def test_a_resigned_retry_has_a_new_nonce(store: tuple[ClaimStore, Clock]) -> None:
    broker, _ = store
    guard = ReplayGuard(broker, WINDOW_S)
    first = signed()
    guard.consume(first, now_ms=NOW)
    retry = RING.sign(first.replace(attempt=1, signature=None), now_ms=NOW + 5)
    guard.check(retry)


def test_nonce_is_per_key_id(store: tuple[ClaimStore, Clock]) -> None:
    broker, _ = store
    guard = ReplayGuard(broker, WINDOW_S)
    env = signed()
    guard.consume(env, now_ms=NOW)
    sig = env.signature
    assert sig is not None
    other_key = SignatureBlock(sig.algorithm, "v2", sig.issued_at_ms, sig.nonce, sig.value)
    guard.check(other_key)
    assert ReplayGuard.key(sig) == f"nonce:v1:{sig.nonce}"


def test_unsigned_messages_are_left_to_the_keyring(store: tuple[ClaimStore, Clock]) -> None:
    broker, _ = store
    guard = ReplayGuard(broker, WINDOW_S)
    env = Envelope(id="t1", task="x")
    guard.check(env)
    assert not guard.consume(env)


def test_nonce_outlives_the_window_so_expiry_takes_over(store: tuple[ClaimStore, Clock]) -> None:
    broker, set_clock = store
    guard = ReplayGuard.for_keyring(broker, RING)
    env = signed()
    guard.consume(env, now_ms=NOW)
    # Until the signature itself expires, the nonce is remembered ...
    set_clock(NOW + int(WINDOW_S * 1000))
    RING.verify(env, now_ms=NOW + int(WINDOW_S * 1000))
    with pytest.raises(SignatureError, match="replayed"):
        guard.check(env)
    # ... and once the window has passed, verification refuses the copy anyway.
    later = NOW + int(WINDOW_S * 1000) + 1
    set_clock(later)
    with pytest.raises(SignatureError) as exc:
        RING.verify(env, now_ms=later)
    assert exc.value.reason == "signature-expired"
    # Long after (window + skew + margin) the claim is gone: nothing accumulates.
    set_clock(NOW + int(guard.ttl_s(env, now_ms=NOW) * 1000) + 1)
    guard.check(env)


def test_ttl_covers_delayed_tasks_until_their_window_closes() -> None:
    guard = ReplayGuard(FakeClaims(), WINDOW_S, clock_skew_s=60, margin_s=60)
    plain = signed()
    assert guard.ttl_s(plain, now_ms=NOW) == WINDOW_S + 120
    eta = NOW + 86_400_000
    delayed = signed(not_before_ms=eta)
    # consumed early (before its ETA): remembered until ETA + window
    assert guard.ttl_s(delayed, now_ms=NOW) == 86_400 + WINDOW_S + 120
    assert guard.ttl_s(delayed, now_ms=eta) == WINDOW_S + 120


def test_control_message_blocks_are_guarded_too() -> None:
    claims = FakeClaims()
    guard = ReplayGuard(claims, WINDOW_S)
    block = SignatureBlock(**RING.sign_bytes(b"revoke t1", context="control", now_ms=NOW))
    guard.check(block)
    assert guard.consume(block, now_ms=NOW)
    with pytest.raises(SignatureError, match="replayed"):
        guard.check(block)


def test_what_the_broker_peeked_is_used_only_for_the_nonce_it_names() -> None:
    # A broker may read the claim off the body while reserving (before any signature was
    # checked). The guard takes that reading only when its key is the verified nonce's; a
    # body that made the broker read another pair is read again, from the store.
    fake = FakeClaims()
    guard = ReplayGuard(fake, WINDOW_S)
    used, fresh, decoy = signed(), RING.sign(Envelope(id="t2", task="x"), now_ms=NOW), signed()
    for env in (used, decoy):
        guard.consume(env, now_ms=NOW)
    reads: list[Sequence[str]] = []
    real_peek_many = fake.peek_many

    def peek_many(keys: Sequence[str]) -> list[str | None]:
        reads.append(list(keys))
        return real_peek_many(keys)

    fake.peek_many = peek_many  # type: ignore[method-assign]
    key = ReplayGuard.key
    verdicts = guard.replayed(
        [used, fresh, decoy],
        [
            (key(used.signature), "t1"),  # type: ignore[arg-type]
            (key(fresh.signature), None),  # type: ignore[arg-type]
            ("nonce:v1:something-else", None),  # the broker read another pair
        ],
    )
    assert [v and v.reason for v in verdicts] == ["signature-replayed", None, "signature-replayed"]
    assert reads == [[key(decoy.signature)]]  # type: ignore[arg-type]
    assert guard.replayed([fresh], [(key(fresh.signature), None)]) == [None]  # type: ignore[arg-type]
    assert len(reads) == 1  # everything peeked: no broker call
