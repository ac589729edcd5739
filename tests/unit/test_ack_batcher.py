"""Batched acks: one sender thread; settling threads never wait for the broker."""

from __future__ import annotations

import threading
import time
from typing import Any

from stem.brokers.base import Claim, Delivery
from stem.errors import BrokerConnectionError
from stem.worker.cpu import CpuGauge
from stem.worker.settle import AckBatcher


def _d(i: int) -> Delivery:
    return Delivery(f"r{i}", f"m{i}", "q", b"{}", 1, 0)


def test_without_a_background_sender_each_ack_is_sent_before_add_returns() -> None:
    calls: list[list[str]] = []
    acks = AckBatcher(lambda batch, claims: calls.append([d.receipt for d in batch]))
    acks.add(_d(1))
    assert calls == [["r1"]]
    acks.add(_d(2))
    assert calls == [["r1"], ["r2"]]
    assert acks.wait_idle(0.1)


def test_acks_handed_in_during_a_call_go_out_together_and_none_is_lost() -> None:
    in_call = threading.Event()
    release = threading.Event()
    calls: list[list[str]] = []

    def slow_ack(batch: list[Delivery], claims: list[Claim]) -> None:
        calls.append([d.receipt for d in batch])
        if len(calls) == 1:
            in_call.set()
            release.wait(5)

    acks = AckBatcher(slow_ack, background=True)
    acks.add(_d(0))  # returns at once: the sender thread sends it
    assert in_call.wait(5)
    for i in range(1, 6):
        acks.add(_d(i))  # returns at once although the sender is busy
    assert calls == [["r0"]]
    assert not acks.wait_idle(0.05)
    release.set()
    assert acks.wait_idle(5)
    assert calls == [["r0"], ["r1", "r2", "r3", "r4", "r5"]]
    assert (acks.batches, acks.acked) == (2, 6)
    assert acks.stop()


def test_many_threads_share_calls_and_every_ack_is_sent_once() -> None:
    sent: list[str] = []

    def ack(batch: list[Delivery], claims: list[Claim]) -> None:
        sent.extend(d.receipt for d in batch)
        time.sleep(0.002)

    acks = AckBatcher(ack, background=True)

    def settle(n: int) -> None:
        for i in range(200):
            acks.add(_d(n * 1000 + i))

    threads = [threading.Thread(target=settle, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert acks.stop()
    assert sorted(sent) == sorted(f"r{n * 1000 + i}" for n in range(8) for i in range(200))
    assert acks.batches < acks.acked / 4  # shared round trips


def test_stop_sends_what_is_left_and_later_acks_go_out_inline() -> None:
    release = threading.Event()
    calls: list[list[str]] = []

    def ack(batch: list[Delivery], claims: list[Claim]) -> None:
        calls.append([d.receipt for d in batch])
        release.wait(5)

    acks = AckBatcher(ack, background=True)
    acks.add(_d(1))
    acks.add(_d(2))
    threading.Timer(0.1, release.set).start()
    assert acks.stop(5)
    assert [r for batch in calls for r in batch] == ["r1", "r2"]
    acks.add(_d(3))  # after stop (a late settle): sent before add returns
    assert calls[-1] == ["r3"]


def test_claims_go_out_in_the_ack_call_of_their_batch() -> None:
    calls: list[tuple[list[str], list[str]]] = []

    def ack(batch: list[Delivery], claims: list[Claim]) -> None:
        calls.append(([d.receipt for d in batch], [c[0] for c in claims]))

    acks = AckBatcher(ack)
    acks.add(_d(1), ("nonce:k:1", "m1", 60.0))
    acks.add(_d(2))  # no claim: nothing to record
    assert calls == [(["r1"], ["nonce:k:1"]), (["r2"], [])]


def test_a_failed_ack_is_logged_and_the_sender_keeps_working(caplog) -> None:  # type: ignore[no-untyped-def]
    calls: list[int] = []

    def flaky(batch: list[Delivery], claims: list[Claim]) -> None:
        calls.append(len(batch))
        if len(calls) == 1:
            raise BrokerConnectionError("redis://127.0.0.1:1 refused")
        if len(calls) == 2:
            raise KeyboardInterrupt  # even this does not end the sender

    acks = AckBatcher(flaky, background=True)
    for i in range(3):
        acks.add(_d(i))
        assert acks.wait_idle(5)
    assert calls == [1, 1, 1]
    assert "delivered again" in caplog.text and "127.0.0.1:1" in caplog.text
    assert acks.stop()


def _recording() -> tuple[list[list[str]], Any]:
    calls: list[list[str]] = []

    def ack(batch: list[Delivery], claims: list[Claim]) -> None:
        calls.append([d.receipt for d in batch])

    return calls, ack


def test_a_busy_sender_waits_for_the_acks_of_the_tasks_still_running() -> None:
    calls, ack = _recording()
    running = [3]
    acks = AckBatcher(
        ack, background=True, linger_s=10.0, running=lambda: running[0], busy=lambda: True
    )
    acks.add(_d(1))
    time.sleep(0.1)
    assert calls == []  # two more tasks are running: their acks are worth waiting for
    acks.add(_d(2))
    acks.add(_d(3))  # every running task's ack is in: sent at once, not after 10 s
    assert acks.wait_idle(5)
    assert calls == [["r1", "r2", "r3"]]
    assert acks.stop()


def test_lingering_ends_at_its_deadline_and_at_stop() -> None:
    calls, ack = _recording()
    acks = AckBatcher(ack, background=True, linger_s=0.05, running=lambda: 5, busy=lambda: True)
    acks.add(_d(1))
    assert acks.wait_idle(5)  # the others never finished: sent after 50 ms anyway
    assert calls == [["r1"]]
    slow = AckBatcher(ack, background=True, linger_s=60.0, running=lambda: 5, busy=lambda: True)
    slow.add(_d(2))
    started = time.monotonic()
    assert slow.stop(5)
    assert calls[-1] == ["r2"] and time.monotonic() - started < 5


def test_a_sender_with_cpu_to_spare_never_lingers() -> None:
    calls, ack = _recording()
    acks = AckBatcher(ack, background=True, linger_s=60.0, running=lambda: 5, busy=lambda: False)
    acks.add(_d(1))
    assert acks.wait_idle(5)
    assert calls == [["r1"]]
    assert acks.stop()


def test_cpu_gauge_turns_busy_above_its_threshold_and_back_only_below_release() -> None:
    now = {"wall": 0.0, "cpu": 0.0}
    reads: list[float] = []

    def cpu() -> float:
        reads.append(now["cpu"])
        return now["cpu"]

    gauge = CpuGauge(0.75, 0.375, 0.125, clock=lambda: now["wall"], cpu=cpu)

    def run(cores: float) -> bool:  # binary fractions: exact sums, no rounding at the edges
        now["wall"] += 0.125
        now["cpu"] += 0.125 * cores
        return gauge.busy()

    assert not run(0.5)
    assert run(0.875)  # busy from 0.75 cores
    assert run(0.5)  # and still busy until below 0.375
    assert not run(0.25)
    assert not run(0.625)  # not busy again until 0.75
    before = len(reads)
    assert not gauge.busy() and len(reads) == before  # within a window: no clock read
