"""Group-committed acks: one thread acks at once, concurrent settlers share calls."""

from __future__ import annotations

import threading

import pytest

from stem.brokers.base import Delivery
from stem.errors import BrokerConnectionError
from stem.worker.settle import AckBatcher


def _d(i: int) -> Delivery:
    return Delivery(f"r{i}", f"m{i}", "q", b"{}", 1, 0)


def test_a_lone_ack_is_sent_before_add_returns() -> None:
    calls: list[list[str]] = []
    acks = AckBatcher(lambda batch: calls.append([d.receipt for d in batch]))
    acks.add(_d(1))
    assert calls == [["r1"]]
    acks.add(_d(2))
    assert calls == [["r1"], ["r2"]]
    assert acks.wait_idle(0.1)


def test_acks_arriving_during_a_call_go_out_together_and_none_is_lost() -> None:
    in_call = threading.Event()
    release = threading.Event()
    calls: list[list[str]] = []

    def slow_ack(batch: list[Delivery]) -> None:
        calls.append([d.receipt for d in batch])
        if len(calls) == 1:
            in_call.set()
            release.wait(5)

    acks = AckBatcher(slow_ack)
    leader = threading.Thread(target=acks.add, args=(_d(0),))
    leader.start()
    assert in_call.wait(5)
    for i in range(1, 6):
        acks.add(_d(i))  # returns at once: the leader is flushing
    assert calls == [["r0"]]
    assert not acks.wait_idle(0.05)
    release.set()
    leader.join(5)
    assert acks.wait_idle(5)
    assert calls == [["r0"], ["r1", "r2", "r3", "r4", "r5"]]
    assert (acks.batches, acks.acked) == (2, 6)


def test_a_failed_ack_is_logged_and_the_batcher_keeps_working(caplog) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def flaky(batch: list[Delivery]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise BrokerConnectionError("redis://127.0.0.1:1 refused")

    acks = AckBatcher(flaky)
    acks.add(_d(1))
    acks.add(_d(2))
    assert calls == [1, 1]
    assert "delivered again" in caplog.text and "127.0.0.1:1" in caplog.text
    assert acks.wait_idle(0.1)


def test_an_unexpected_error_in_a_flush_does_not_wedge_the_batcher() -> None:
    calls: list[list[str]] = []

    def ack(batch: list[Delivery]) -> None:
        calls.append([d.receipt for d in batch])

    raised: list[int] = []

    def claim_many(claims: list[tuple[str, str, float]]) -> None:
        if not raised:
            raised.append(1)
            raise KeyboardInterrupt  # anything at all escaping the leader thread

    acks = AckBatcher(ack, claim_many)
    with pytest.raises(KeyboardInterrupt):
        acks.add(_d(1), ("nonce:k:1", "m1", 60.0))
    assert calls == []
    assert acks.wait_idle(1.0)  # shutdown sends what the failed flush left behind
    assert calls == [["r1"]]
    acks.add(_d(2))  # and later acks are sent at once
    assert calls == [["r1"], ["r2"]]
