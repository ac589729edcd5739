"""The worker's semantics on the in-memory broker (no services needed)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest

from stem import Stem, TaskError, group, states
from stem.backends.memory import MemoryBackend
from stem.brokers.base import Delivery, Message
from stem.brokers.memory import MemoryBroker
from stem.errors import BrokerError, ConfigError, ResultTimeout, StemError
from stem.security.signing import Keyring
from stem.testing import memory_app, running_worker


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()
    yield a
    a.close()


def Running(app: Stem, **cfg: Any) -> Any:
    cfg.setdefault("lease_s", 2.0)
    return running_worker(app, **cfg)


def test_delay_runs_and_result_is_readable(app: Stem) -> None:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    with Running(app):
        res = add.delay(2, 3)
        assert res.get(timeout=5) == 5
    assert res.state == states.SUCCESS
    assert res.successful() and res.ready()


def test_failure_is_stored_as_data_and_raised_as_task_error(app: Stem) -> None:
    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("bad input 42")

    with Running(app):
        res = boom.delay()
        with pytest.raises(TaskError, match="ValueError: bad input 42") as info:
            res.get(timeout=5)
    assert info.value.type_name == "ValueError"
    assert "Traceback" in (info.value.traceback or "")
    assert res.state == states.FAILURE
    assert isinstance(res.result, TaskError)
    err = res.get(timeout=1, propagate=False)
    assert isinstance(err, TaskError)


def test_autoretry_with_backoff_then_success(app: Stem) -> None:
    attempts: list[int] = []

    @app.task(
        name="flaky", bind=True, max_retries=3, retry_backoff=0.05, autoretry_for=(ConnectionError,)
    )
    def flaky(ctx: Any) -> int:
        attempts.append(ctx.attempt)
        if ctx.attempt < 2:
            raise ConnectionError("down")
        return ctx.attempt

    with Running(app):
        assert flaky.delay().get(timeout=10) == 2
    assert attempts == [0, 1, 2]


def test_explicit_retry_with_countdown_waits_in_the_broker(app: Stem) -> None:
    @app.task(name="later", bind=True)
    def later(ctx: Any) -> str:
        if ctx.attempt == 0:
            raise ctx.retry(countdown=0.5)
        return "done"

    with Running(app) as w:
        started = time.monotonic()
        res = later.delay()
        deadline = time.monotonic() + 5
        while res.state != states.RETRY and time.monotonic() < deadline:
            time.sleep(0.01)
        stats = {s.queue: s for s in app.broker.stats()}
        assert stats["default"].delayed == 1  # held by the broker, not by the worker
        assert not w.inflight
        assert res.get(timeout=5) == "done"
        assert time.monotonic() - started >= 0.5


def test_exhausted_retries_fail_and_dead_letter(app: Stem) -> None:
    @app.task(name="always", max_retries=2, retry_backoff=0.01, autoretry_for=(OSError,))
    def always() -> None:
        raise OSError("nope")

    with Running(app):
        res = always.delay()
        with pytest.raises(TaskError, match="retries exhausted"):
            res.get(timeout=10)
    letters = app.broker.dlq_list()
    assert [d.reason for d in letters] == ["retries-exhausted"]
    assert "OSError" in letters[0].detail


def test_explicit_retries_exhausted_say_so_once(app: Stem) -> None:
    @app.task(name="again", bind=True, max_retries=1)
    def again(ctx: Any) -> None:
        raise ctx.retry(countdown=0)

    with Running(app):
        with pytest.raises(TaskError) as caught:
            again.delay().get(timeout=10)
    assert str(caught.value).count("retries exhausted") == 1, str(caught.value)


def test_a_retry_that_would_be_due_after_the_expiry_fails_at_once_saying_so(
    app: Stem,
) -> None:
    runs: list[int] = []

    @app.task(name="late_retry", bind=True, max_retries=3)
    def late_retry(ctx: Any) -> None:
        runs.append(ctx.attempt)
        raise ctx.retry(countdown=30, exc=OSError("upstream down"))

    with Running(app):
        res = late_retry.enqueue(expires=10)
        with pytest.raises(TaskError, match=r"upstream down \(not retried: .*past the expiry"):
            res.get(timeout=5)
    assert res.state == states.FAILURE
    assert runs == [0]
    assert app.broker.dlq_list() == []  # nothing to replay: it would be expired anyway


def test_unknown_task_is_dead_lettered_not_run(app: Stem) -> None:
    with Running(app):
        res = app.send_task("nobody.home", [1])
        with pytest.raises(TaskError, match="TaskNotRegistered"):
            res.get(timeout=5)
    assert res.state == states.DEAD
    assert [d.reason for d in app.broker.dlq_list()] == ["unknown-task"]


def test_the_queue_and_eta_in_the_body_count_not_the_brokers_copy(app: Stem) -> None:
    """Someone editing the broker's scheduling data (not the body, which may be signed)
    cannot run a task on another queue, or before its ETA."""
    ran: list[str] = []

    @app.task(name="note")
    def note(tag: str) -> None:
        ran.append(tag)

    week = app.build_envelope("note", ["next week"], countdown=7 * 86400)
    payments = app.build_envelope("note", ["payments"], queue="payments")
    app.publish_messages(
        [
            Message(id=week.id, queue="default", body=app.seal(week)),  # due now, says broker
            Message(id=payments.id, queue="default", body=app.seal(payments)),
        ]
    )
    with Running(app):
        note.delay("control").get(timeout=5)
        deadline = time.monotonic() + 5
        while not app.broker.dlq_list() and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ran == ["control"]
    [letter] = app.broker.dlq_list()
    assert (letter.message_id, letter.reason) == (payments.id, "misrouted")
    assert "'payments'" in letter.detail and "'default'" in letter.detail
    [stats] = app.broker.stats(["default"])
    assert (stats.ready, stats.delayed) == (0, 1)  # put back until its ETA


def test_malformed_message_is_dead_lettered(app: Stem) -> None:
    app.broker.publish([Message(id="junk", queue="default", body=b"{not json")])
    with Running(app):
        deadline = time.monotonic() + 5
        while not app.broker.dlq_list() and time.monotonic() < deadline:
            time.sleep(0.02)
    [letter] = app.broker.dlq_list()
    assert letter.reason == "malformed"
    assert "not valid JSON" in letter.detail
    assert letter.body == b"{not json"


def test_expired_task_is_recorded_and_never_runs(app: Stem) -> None:
    ran: list[int] = []

    @app.task(name="stale")
    def stale() -> None:
        ran.append(1)

    res = stale.enqueue(expires=0.05)
    time.sleep(0.1)
    with Running(app):
        with pytest.raises(TaskError, match="TaskExpired"):
            res.get(timeout=5)
    assert res.state == states.EXPIRED
    assert ran == []


def test_countdown_delays_execution(app: Stem) -> None:
    @app.task(name="stamp")
    def stamp() -> float:
        return time.time()

    with Running(app):
        sent = time.time()
        res = stamp.enqueue(countdown=0.6)
        assert res.get(timeout=5) - sent >= 0.6


def test_priority_orders_ready_tasks(app: Stem) -> None:
    order: list[int] = []

    @app.task(name="p")
    def p(n: int) -> None:
        order.append(n)

    for n, prio in [(1, 0), (2, 9), (3, 5), (4, 9)]:
        p.enqueue(args=[n], priority=prio)
    with Running(app, concurrency=1, pool="solo"):
        deadline = time.monotonic() + 5
        while len(order) < 4 and time.monotonic() < deadline:
            time.sleep(0.02)
    assert order == [2, 4, 3, 1]


def test_the_producer_refuses_what_no_worker_would_take(app: Stem) -> None:
    """Refused at enqueue, with the reason, rather than published to sit PENDING (a
    worker dead-letters a non-integer priority; no worker can be told to consume a queue
    named with a space or a comma)."""

    @app.task(name="plain_task")
    def plain_task() -> None: ...

    for bad, words in [
        ({"priority": 5.5}, "priority must be an integer 0..9, got 5.5"),
        ({"priority": True}, "priority must be an integer 0..9, got True"),
        ({"queue": "odd q"}, "queue name 'odd q' must be non-empty without spaces"),
        ({"queue": "a,b"}, "without spaces, commas"),
        ({"queue": "nul\x00"}, "control characters"),
        ({"countdown": float("nan")}, "finite number of seconds"),
        ({"expires": float("inf")}, "finite number of seconds"),
        # past 64-bit milliseconds: failed with an encode error naming no argument
        ({"countdown": 1e300}, "finite number of seconds (at most 100 years), got 1e+300"),
        ({"expires": timedelta(days=999_999_999)}, "at most 100 years"),
        ({"queue": "q" * 256}, "queue name must be a non-empty string of at most 255"),
        ({"task_id": "x" * 256}, "task id must be a non-empty string of at most 255"),
        ({"task_id": ""}, "task id must be a non-empty string"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(words)):
            plain_task.enqueue(**bad)
    for name in ("", "n" * 256):  # by name, unregistered here
        with pytest.raises(ConfigError, match="task name must be a non-empty string"):
            app.send_task(name)
    assert app.broker.stats() == [] or all(s.ready == 0 for s in app.broker.stats())


def test_a_result_timeout_of_nan_is_refused_and_infinity_waits(app: Stem) -> None:
    """get(timeout=nan) waited for good: no time is past a deadline of nan."""

    @app.task(name="quick")
    def quick() -> int:
        return 1

    res = quick.delay()
    with pytest.raises(ConfigError, match="a result timeout must be a number of seconds"):
        res.get(timeout=float("nan"))
    group_res = group([quick.s(), quick.s()]).delay()
    with pytest.raises(ConfigError, match="a result timeout must be a number of seconds"):
        group_res.get(timeout=float("nan"))  # timed out at once
    with Running(app):
        assert res.get(timeout=float("inf")) == 1
        assert group_res.get(timeout=float("inf")) == [1, 1]


def test_ignore_result_writes_nothing(app: Stem) -> None:
    """Not even a STARTED record (track_started, progress), which no final state would
    follow: the task would look stuck running for good."""
    done = threading.Event()

    @app.task(name="quiet", ignore_result=True, track_started=True, bind=True)
    def quiet(ctx: Any) -> int:
        ctx.update_progress(1, 2)
        if ctx.attempt == 0:  # nor RETRY, which its success would not replace
            raise ctx.retry(countdown=0)
        done.set()
        return 1

    with Running(app):
        res = quiet.delay()
        assert done.wait(5)
        time.sleep(0.1)
    assert res.state == states.PENDING
    assert app.result_store.read(res.id) is None
    with pytest.raises(ResultTimeout):
        res.get(timeout=0.2)


def test_bound_task_reports_progress(app: Stem) -> None:
    gate = threading.Event()

    @app.task(name="prog", bind=True)
    def prog(ctx: Any) -> str:
        ctx.update_progress(3, 10, stage="copy")
        gate.wait(5)
        return ctx.task_id

    with Running(app):
        res = prog.delay()
        deadline = time.monotonic() + 5
        while res.progress is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert res.progress == {"current": 3, "total": 10, "stage": "copy"}
        assert res.state == states.STARTED
        gate.set()
        assert res.get(timeout=5) == res.id


def test_soft_time_limit_raises_inside_the_task(app: Stem) -> None:
    from stem import SoftTimeLimitExceeded

    @app.task(name="slow", soft_time_limit=0.2, max_retries=0)
    def slow() -> str:
        try:
            for _ in range(200):
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "cleaned up"
        return "finished"

    with Running(app):
        assert slow.delay().get(timeout=5) == "cleaned up"


def test_hard_time_limit_on_thread_pool_fails_the_task_and_frees_the_slot(app: Stem) -> None:
    @app.task(name="stuck", time_limit=0.3, max_retries=0)
    def stuck() -> None:
        for _ in range(500):
            time.sleep(0.01)

    @app.task(name="next")
    def nxt() -> str:
        return "ran"

    with Running(app, concurrency=1):
        res = stuck.delay()
        with pytest.raises(TaskError, match="HardTimeLimitExceeded"):
            res.get(timeout=5)
        assert nxt.delay().get(timeout=5) == "ran"


def test_async_pool_runs_coroutines_natively_and_concurrently(app: Stem) -> None:
    @app.task(name="nap")
    async def nap(n: int) -> int:
        await asyncio.sleep(0.3)
        return n

    @app.task(name="sync_in_async")
    def plain() -> str:
        return "plain"

    with Running(app, pool="async", concurrency=20):
        started = time.monotonic()
        results = [nap.delay(i) for i in range(20)]
        assert [r.get(timeout=10) for r in results] == list(range(20))
        assert time.monotonic() - started < 3.0  # 20 x 0.3 s serially would be 6 s
        assert plain.delay().get(timeout=5) == "plain"


class Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no str")


@pytest.mark.parametrize("pool", ["thread", "solo", "async"])
def test_an_exception_that_cannot_be_printed_is_still_recorded(app: Stem, pool: str) -> None:
    """Recording a failure must not fail: the pool thread would die with the task unsettled
    and its slot lost."""

    @app.task(name="unprintable", max_retries=0)
    def unprintable() -> None:
        raise Unprintable(1, 2)

    @app.task(name="after")
    def after() -> str:
        return "ran"

    with Running(app, pool=pool, concurrency=1):
        with pytest.raises(TaskError, match="<unprintable Unprintable object>"):
            unprintable.delay().get(timeout=5)
        assert after.delay().get(timeout=5) == "ran"


@pytest.mark.parametrize("pool", ["thread", "solo", "async"])
def test_an_exception_whose_message_is_not_utf8_is_recorded_once(app: Stem, pool: str) -> None:
    """A message holding a lone surrogate (a file name os.listdir could not decode) is
    recorded with the character escaped. It could not be encoded: the task was run again
    until dead-lettered (for the process pool, see the crashing app's crash.undecodable:
    the pool process died of it, recording WorkerLost)."""
    runs: list[int] = []

    @app.task(name="undecodable", max_retries=0)
    def undecodable() -> None:
        runs.append(1)
        name = os.fsdecode(b"caf\xe9.csv")
        raise ValueError(f"cannot import {name}")

    with Running(app, pool=pool, concurrency=1):
        res = undecodable.delay()
        with pytest.raises(TaskError, match=r"ValueError: cannot import caf\\udce9\.csv"):
            res.get(timeout=10)
        assert res.state == states.FAILURE
    assert runs == [1]
    assert app.broker.dlq_list() == []


def test_async_pool_limits_reach_plain_functions_and_blocking_coroutines(app: Stem) -> None:
    from stem import SoftTimeLimitExceeded

    @app.task(name="plain_soft", soft_time_limit=0.2, max_retries=0)
    def plain_soft() -> str:
        try:
            for _ in range(300):
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            return "cleaned"
        return "finished"

    @app.task(name="plain_hard", time_limit=0.3, max_retries=0)
    def plain_hard() -> None:
        for _ in range(300):
            time.sleep(0.01)

    @app.task(name="blocking_coroutine", time_limit=0.3, max_retries=0)
    async def blocking_coroutine() -> str:
        time.sleep(1.5)  # blocks the loop: cancelling cannot reach it
        return "done"

    @app.task(name="after_limits")
    async def after_limits() -> str:
        return "ran"

    with Running(app, pool="async", concurrency=2):
        assert plain_soft.delay().get(timeout=5) == "cleaned"
        with pytest.raises(TaskError, match="HardTimeLimitExceeded"):
            plain_hard.delay().get(timeout=5)
        res = blocking_coroutine.delay()
        with pytest.raises(TaskError, match="HardTimeLimitExceeded"):
            res.get(timeout=5)
        assert after_limits.delay().get(timeout=5) == "ran"
    assert res.state == states.FAILURE  # not overwritten by the late return


def test_async_pool_replaces_a_thread_stuck_past_its_hard_limit(app: Stem) -> None:
    """A plain function that does not stop at its hard limit keeps its thread; the next
    task must not queue behind it.

    The function here swallows the time-limit exception rather than block in C: an
    exception sent to a thread blocked in C stays pending, and CPython 3.11 then keeps
    every thread on its slow path until it is raised, which under a tracer (coverage in
    CI) stalls the whole process (seen here; the worker itself runs no tracer)."""
    from tests.fixtures.stuck import ignore_hard_limits

    blocker = threading.Event()

    @app.task(name="blocked", time_limit=0.3, max_retries=0)
    def blocked() -> None:
        ignore_hard_limits(blocker)

    @app.task(name="next_plain")
    def next_plain() -> str:
        return "ran"

    try:
        with Running(app, pool="async", concurrency=1):
            with pytest.raises(TaskError, match="HardTimeLimitExceeded"):
                blocked.delay().get(timeout=30)
            # Queued behind the stuck call, it would wait for it (until the test ends).
            assert next_plain.delay().get(timeout=30) == "ran"
    finally:
        blocker.set()


def test_a_pool_shrunk_while_reserving_admits_only_what_fits(app: Stem) -> None:
    """The consumer computed its free slots before waiting in reserve; a shrink that
    lands meanwhile must count (the async pool does not cap running tasks itself)."""
    in_reserve, go = threading.Event(), threading.Event()
    reserve = app.broker.reserve
    running, most = [0], [0]
    lock, release = threading.Lock(), threading.Event()

    def held_reserve(queues: Any, n: int, lease_s: float, wait_s: float = 0.0) -> Any:
        if "default" in queues and n == 3 and not go.is_set():
            in_reserve.set()
            go.wait(5)
        return reserve(queues, n, lease_s, wait_s)

    app.broker.reserve = held_reserve  # type: ignore[method-assign]

    @app.task(name="one_at_a_time")
    def one_at_a_time() -> None:
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        release.wait(0.5)
        with lock:
            running[0] -= 1

    with Running(app, pool="async", concurrency=3) as w:
        assert in_reserve.wait(5)
        w.resize(1)
        results = [one_at_a_time.delay() for _ in range(3)]
        go.set()
        for r in results:
            r.get(timeout=10)
    assert most[0] == 1


def test_async_pool_runs_as_many_plain_functions_as_it_has_slots(app: Stem) -> None:
    """Plain functions get one thread per slot (the loop's default executor has cpu+4),
    and a finished coroutine is settled while they all still run."""
    slots = 10
    barrier = threading.Barrier(slots, timeout=10)
    release = threading.Event()
    met_all: list[int] = []

    @app.task(name="meet")
    def meet() -> bool:
        barrier.wait()  # raises BrokenBarrierError unless all run at once
        met_all.append(1)
        return release.wait(10)

    @app.task(name="quick")
    async def quick() -> str:
        return "quick"

    with Running(app, pool="async", concurrency=slots + 1):
        met = [meet.delay() for _ in range(slots)]
        deadline = time.monotonic() + 10
        while len(met_all) < slots and not barrier.broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(met_all) == slots, "the plain functions did not all run at once"
        assert quick.delay().get(timeout=5) == "quick"  # settled while all plain ones run
        release.set()
        assert [r.get(timeout=10) for r in met] == [True] * slots


def test_async_pool_soft_limit_cancels_the_coroutine(app: Stem) -> None:
    @app.task(name="forever", soft_time_limit=0.2, max_retries=0)
    async def forever() -> None:
        await asyncio.sleep(30)

    with Running(app, pool="async"):
        with pytest.raises(TaskError, match="SoftTimeLimitExceeded"):
            forever.delay().get(timeout=5)


def test_worker_reserves_only_what_its_slots_can_run(app: Stem) -> None:
    gate = threading.Event()

    @app.task(name="hold")
    def hold() -> None:
        gate.wait(10)

    for _ in range(10):
        hold.delay()
    with Running(app, concurrency=3) as w:
        deadline = time.monotonic() + 5
        while len(w.inflight) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.3)
        [stats] = [s for s in app.broker.stats() if s.queue == "default"]
        assert stats.reserved == 3
        assert stats.ready == 7
        gate.set()


def _wait_until(pred: Any, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.01)


def test_prefetch_holds_deliveries_for_busy_slots_renews_them_and_runs_each_once(
    app: Stem,
) -> None:
    gate = threading.Event()
    runs: list[int] = []

    @app.task(name="hold")
    def hold(i: int) -> int:
        runs.append(i)
        gate.wait(10)
        return i

    results = [hold.delay(i) for i in range(8)]
    with Running(app, concurrency=2, prefetch=2, lease_s=0.6) as w:
        _wait_until(lambda: len(w.inflight) == 2 and len(w.buffered) == 4)
        time.sleep(1.5)  # past two lease periods: the prefetched leases must be renewed
        [stats] = [s for s in app.broker.stats() if s.queue == "default"]
        assert (stats.reserved, stats.ready) == (6, 2)
        reserved = w._control.dispatch("reserved", {}) if w._control else None
        assert reserved is not None and len(reserved) == 4
        assert all(r["deliveries"] == 1 for r in reserved)
        gate.set()
        assert [r.get(timeout=10) for r in results] == list(range(8))
    assert sorted(runs) == list(range(8))  # each ran once: no lease lapsed


def test_prefetched_deliveries_are_handed_back_at_shutdown(app: Stem) -> None:
    started = threading.Event()

    @app.task(name="sleepy")
    def sleepy() -> None:
        started.set()
        time.sleep(3)

    for _ in range(4):
        sleepy.delay()
    with Running(app, concurrency=1, prefetch=3, shutdown_budget_s=0.2) as w:
        assert started.wait(5)
        _wait_until(lambda: len(w.buffered) == 3)
    [stats] = [s for s in app.broker.stats() if s.queue == "default"]
    assert (stats.ready, stats.reserved) == (4, 0)  # the running one and the 3 prefetched


def test_a_slot_is_free_again_only_once_its_ack_was_sent(app: Stem) -> None:
    """A slot never holds more than one unacknowledged task (so a crash or an outage
    duplicates at most one task per slot)."""
    gate = threading.Event()
    acked: list[int] = []
    started: list[int] = []
    real_ack = app.broker.ack

    def slow_ack(deliveries: Any, claims: Any = ()) -> int:
        gate.wait(10)
        acked.append(len(deliveries))
        return real_ack(deliveries, claims)

    app.broker.ack = slow_ack  # type: ignore[method-assign]

    @app.task(name="quick")
    def quick(i: int) -> int:
        started.append(i)
        return i

    first, second = quick.delay(1), quick.delay(2)
    with Running(app, concurrency=1) as w:
        assert first.get(timeout=5) == 1  # the result is written before the ack
        time.sleep(0.3)
        assert started == [1] and len(w.inflight) == 1  # the ack is held back: no slot
        gate.set()
        assert second.get(timeout=5) == 2
    assert started == [1, 2] and sum(acked) == 2


def test_prefetch_out_of_range_is_refused() -> None:
    from stem.errors import StemError
    from stem.worker.consumer import WorkerConfig

    with pytest.raises(StemError, match=r"prefetch must be 0\.\.64"):
        WorkerConfig(prefetch=-1)


def test_leases_are_renewed_while_a_long_task_runs(app: Stem) -> None:
    runs: list[int] = []

    @app.task(name="long")
    def long() -> str:
        runs.append(1)
        time.sleep(1.5)
        return "ok"

    with Running(app, lease_s=0.5, concurrency=2):
        assert long.delay().get(timeout=10) == "ok"
    assert runs == [1]  # never delivered twice although it outlived its lease 3 times


def test_shutdown_hands_unfinished_work_back(app: Stem) -> None:
    started = threading.Event()

    @app.task(name="sleepy")
    def sleepy() -> None:
        started.set()
        time.sleep(3)

    res = sleepy.delay()
    r = Running(app, shutdown_budget_s=0.2)
    with r:
        assert started.wait(5)
    [stats] = [s for s in app.broker.stats() if s.queue == "default"]
    assert stats.ready == 1 and stats.reserved == 0
    assert res.state == states.PENDING


def test_poison_message_is_dead_lettered_after_max_deliveries(app: Stem) -> None:
    @app.task(name="poison")
    def poison() -> None:
        raise AssertionError("must not run")

    poison.delay()
    # Simulate crashed workers: lease and let the lease lapse, more often than allowed.
    for _ in range(2):
        assert app.broker.reserve(["default"], 1, 0.05)
        time.sleep(0.08)
    with Running(app, max_deliveries=2):
        deadline = time.monotonic() + 5
        while not app.broker.dlq_list() and time.monotonic() < deadline:
            time.sleep(0.02)
    [letter] = app.broker.dlq_list()
    assert letter.reason == "max-deliveries-exceeded"


def test_routes_send_tasks_to_queues_by_pattern() -> None:
    app = memory_app()
    app.routes.update({"email.*": "mail", "report.daily": "reports"})

    @app.task(name="email.send")
    def send() -> None: ...

    @app.task(name="report.daily", queue="ignored")
    def daily() -> None: ...

    @app.task(name="misc", queue="own")
    def misc() -> None: ...

    assert app.route("email.send") == "mail"
    assert app.route("report.daily") == "reports"
    assert app.route("misc") == "own"
    assert app.route("other") == "default"
    assert app.route("email.send", "explicit") == "explicit"
    send.delay()
    assert {s.queue: s.ready for s in app.broker.stats()}["mail"] == 1
    app.close()


class OldBroker(MemoryBroker):
    """A broker of a user's own whose ack was written before acks took claims."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.acked: list[str] = []

    def ack(self, deliveries: Any) -> int:  # type: ignore[override]
        self.acked.extend(d.message_id for d in deliveries)
        return super().ack(deliveries)


def test_a_broker_whose_ack_predates_claims_still_works() -> None:
    url = "memory://old-ack"
    broker = OldBroker(url)
    acked = broker.acked
    old = Stem("old", broker=broker, backend=MemoryBackend(url))
    try:

        @old.task(name="twice")
        def twice(x: int) -> int:
            return 2 * x

        @old.task(name="quiet", ignore_result=True)
        def quiet() -> None:
            return None

        with Running(old):
            res = twice.delay(21)
            assert res.get(timeout=5) == 42
            quiet.delay()
            deadline = time.monotonic() + 5
            while len(acked) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
        assert len(acked) == 2  # both acked by the old signature, nothing redelivered
        assert all(s.ready == 0 and s.reserved == 0 for s in old.broker.stats())
    finally:
        old.close()


def test_a_broker_whose_ack_takes_no_claims_is_refused_at_start_when_signing() -> None:
    url = "memory://old-ack-signed"
    ring = Keyring.build("hmac-sha256", {"v1": b"k" * 32}, active_key="v1")
    old = Stem("old", broker=OldBroker(url), backend=MemoryBackend(url), keyring=ring)
    try:
        with pytest.raises(ConfigError, match=r"OldBroker\.ack\(\) takes no claims"):
            with Running(old):
                pass
    finally:
        old.close()


CRASHING_APP = """
import os
from stem import Stem
from stem.errors import WorkerLost

url = os.environ["STEM_TEST_CRASH_URL"]
app = Stem("crash", broker=url, backend=url)
marker = os.environ["STEM_TEST_CRASH_MARKER"]

def _crash_once():
    if not os.path.exists(marker):
        open(marker, "w").close()
        os._exit(3)  # the pool process dies mid-task, as under the OOM killer
    return "survived"

@app.task(name="crash.retried", autoretry_for=(WorkerLost,), max_retries=1, retry_backoff=0.1)
def retried():
    return _crash_once()

@app.task(name="crash.undecodable", max_retries=0)
def undecodable():
    raise ValueError("cannot import " + os.fsdecode(b"caf\\xe9.csv"))

@app.task(name="crash.stops_children")
def stops_children():
    import hashlib, multiprocessing, subprocess, time
    program = subprocess.Popen(["sleep", "30"])
    time.sleep(0.2)
    program.terminate()
    # A long C call: a Python-level handler would wait for it to end (a minute or so).
    busy = ("sha256", b"x", b"y", 200_000_000)
    forked = multiprocessing.get_context("fork").Process(target=hashlib.pbkdf2_hmac, args=busy)
    forked.start()
    time.sleep(0.2)
    forked.terminate()
    forked.join(10)
    if forked.is_alive():
        forked.kill()
    try:
        return [program.wait(10), forked.exitcode]
    except subprocess.TimeoutExpired:
        program.kill()
        return ["still running", forked.exitcode]

@app.task(name="crash.hard_limit", time_limit=0.5, autoretry_for=(Exception,), max_retries=2)
def hard_limit():
    with open(marker + ".hard", "a") as runs:
        runs.write("ran\\n")
    import time
    time.sleep(30)

@app.task(name="crash.plain")
def plain():
    os._exit(3)

@app.task(name="crash.huge")
def huge():
    return "x" * (70 << 20)  # over the result size limit (and the pipe's 64 MiB frames)

@app.task(name="crash.fork_returns")
def fork_returns():
    return "child" if os.fork() == 0 else "parent"  # the child returns, not os._exit

@app.task(name="crash.fork_lingers", time_limit=1.0)
def fork_lingers():
    if os.fork() == 0:
        import time
        time.sleep(600)  # holds the outcome pipe, inherited from the pool process
        os._exit(0)
    import time
    time.sleep(600)
"""


def test_a_lost_pool_process_fails_the_task_or_retries_it_if_asked(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "crash_app.py").write_text(CRASHING_APP)
    monkeypatch.setenv("STEM_TEST_CRASH_URL", f"sqlite:///{tmp_path / 'stem.db'}")
    monkeypatch.setenv("STEM_TEST_CRASH_MARKER", str(tmp_path / "crashed"))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    from stem.loader import load_app

    app = load_app("crash_app:app")
    try:
        with running_worker(app, pool="process", concurrency=1):
            assert app.tasks["crash.retried"].delay().get(timeout=30) == "survived"
            with pytest.raises(TaskError, match=r"ValueError: cannot import caf\\udce9\.csv"):
                app.tasks["crash.undecodable"].delay().get(timeout=30)
            # A hard limit fails the task, as on the other pools: not retried.
            with pytest.raises(TaskError, match="HardTimeLimitExceeded"):
                app.tasks["crash.hard_limit"].delay().get(timeout=30)
            assert (tmp_path / "crashed.hard").read_text().count("ran") == 1
            # What a task starts or forks stops on SIGTERM (ignored by the pool process).
            assert app.tasks["crash.stops_children"].delay().get(timeout=30) == [-15, -15]
            with pytest.raises(TaskError, match="WorkerLost"):
                app.tasks["crash.plain"].delay().get(timeout=30)
            with pytest.raises(TaskError, match="over the 48 MiB a result may have"):
                app.tasks["crash.huge"].delay().get(timeout=30)
            assert app.tasks["crash.retried"].delay().get(timeout=30) == "survived"
            # A forked process that returns is not taken for the pool process.
            assert app.tasks["crash.fork_returns"].delay().get(timeout=30) == "parent"
            assert app.tasks["crash.fork_returns"].delay().get(timeout=30) == "parent"
            # The hard limit kills what the task forked too: settled at once, slot free.
            # (Its grandchild sleeps 600 s: before, the outcome waited for it.)
            with pytest.raises(TaskError, match=r"HardTimeLimitExceeded|WorkerLost"):
                app.tasks["crash.fork_lingers"].delay().get(timeout=20)
            assert app.tasks["crash.retried"].delay().get(timeout=30) == "survived"
    finally:
        app.close()


def test_a_retry_books_its_own_rate_limit_slot(app: Stem) -> None:
    """A rate-limit slot is booked for one attempt: a retry carrying its attempt's
    booking would run at once, however many retries the limit should space out."""
    seen: list[tuple[int, int, Any]] = []

    @app.task(name="limited_retry", bind=True, rate_limit="5/s", max_retries=2)
    def limited_retry(ctx: Any, n: int) -> int:
        seen.append((n, ctx.attempt, ctx.headers.get("rate_slot_ms")))
        if ctx.attempt < 2:
            raise ctx.retry(countdown=0)
        return n

    with Running(app, concurrency=3):
        results = [limited_retry.delay(n) for n in range(3)]
        assert [r.get(timeout=20) for r in results] == [0, 1, 2]
    booked = [(n, slot) for n, _, slot in seen if slot is not None]
    assert booked, "with 3 tasks at 5/s some runs must have waited for a slot"
    assert len(set(booked)) == len(booked), f"a booking was reused by a retry: {seen}"


def test_a_message_that_fits_at_enqueue_can_be_retried() -> None:
    """A retry grows the message (not_before_ms, attempt): enqueue keeps room for that, so
    a message near the size limit is refused up front rather than failing its retry."""
    from stem.envelope import REPUBLISH_HEADROOM
    from stem.errors import EnvelopeTooLarge

    url = f"memory://edge-{time.monotonic_ns()}"
    app = Stem("edge", broker=url, backend=url, max_message_bytes=2_000)
    try:

        @app.task(name="edge", bind=True, max_retries=1)
        def edge(ctx: Any, pad: str) -> int:
            if ctx.attempt == 0:
                raise ctx.retry(countdown=0)
            return len(pad)

        def size(pad: str) -> int:
            return len(app.seal(app.build_envelope("edge", [pad])))

        base = size("")
        largest = "x" * (2_000 - REPUBLISH_HEADROOM - base)
        assert size(largest) == 2_000 - REPUBLISH_HEADROOM
        with pytest.raises(EnvelopeTooLarge, match="less 96 bytes kept for a retry"):
            edge.delay(largest + "x")
        with Running(app):
            assert edge.delay(largest).get(timeout=10) == len(largest)
    finally:
        app.close()


def test_a_result_store_outage_during_admission_does_not_stop_consuming(
    app: Stem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A chain step is checked against the result store before it runs; while that store
    is down the step goes back to the broker, and the worker keeps consuming (its thread
    used to die, leaving a process that heartbeats but runs nothing)."""
    from stem import chain
    from stem.errors import BackendConnectionError

    ran: list[str] = []

    @app.task(name="step")
    def step(tag: str) -> str:
        ran.append(tag)
        return tag

    store = app.result_store
    real_read = store.read
    outage = threading.Event()
    outage.set()

    def read(task_id: str, **_: Any) -> Any:
        if outage.is_set():
            raise BackendConnectionError("cannot reach the result store (test)")
        return real_read(task_id)

    monkeypatch.setattr(store, "read", read)
    with Running(app):
        res = chain(step.si("one"), step.si("two")).delay()
        deadline = time.monotonic() + 5
        while "could not admit task" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)
        assert "could not admit task" in caplog.text
        step.delay("plain").get(timeout=5)  # the consumer still runs other work
        outage.clear()
        assert res.get(timeout=10) == "two"
    assert ran.count("plain") == 1 and ran[-1] == "two"


def test_reserve_errors_of_any_kind_are_retried_and_the_recovery_is_logged(
    app: Stem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from stem.errors import BrokerConnectionError

    @app.task(name="ping_task")
    def ping_task() -> str:
        return "pong"

    broker = app.broker
    real_reserve = broker.reserve
    failures = [BrokerConnectionError("broker down (test)"), RuntimeError("a bug (test)")]

    def reserve(*args: Any, **kwargs: Any) -> Any:
        if failures:
            raise failures.pop(0)
        return real_reserve(*args, **kwargs)

    monkeypatch.setattr(broker, "reserve", reserve)
    caplog.set_level("INFO", logger="stem")
    with Running(app):
        assert ping_task.delay().get(timeout=10) == "pong"
    assert "broker down (test)" in caplog.text and "a bug (test)" in caplog.text
    assert "reserving again after" in caplog.text


def test_an_admission_fault_that_waiting_cannot_fix_dead_letters_the_task(app: Stem) -> None:
    """A rate-limit key template naming no argument raises on every delivery: the task is
    DEAD and dead-lettered (replayable once fixed), not handed back every second forever.
    A template fills positional arguments by parameter name, as unique_key does."""

    @app.task(name="by_user", rate_limit="100/s", rate_limit_key="user:{user}")
    def by_user(user: str) -> str:
        return user

    @app.task(name="broken_key", rate_limit="100/s", rate_limit_key="user:{nope}")
    def broken_key(user: str) -> str:
        return user

    with Running(app):
        assert by_user.delay("ann").get(timeout=5) == "ann"
        res = broken_key.delay("bob")
        with pytest.raises(TaskError, match="names a missing argument"):
            res.get(timeout=5)
    assert res.state == states.DEAD
    [letter] = app.broker.dlq_list()
    assert (letter.message_id, letter.reason) == (res.id, "admission-failed")
    assert "rate_limit_key" in letter.detail


def test_a_password_in_a_task_error_is_not_stored(app: Stem) -> None:
    """The worker's log redacts it; the result record (read by `stem result`, get(),
    events) must not keep it either."""

    @app.task(name="connect", max_retries=0)
    def connect() -> None:
        raise ConnectionError("could not connect to postgresql://app:hunter2@db:5432/shop")

    with Running(app):
        res = connect.delay()
        with pytest.raises(TaskError) as info:
            res.get(timeout=5)
    rec = res.record
    assert rec is not None and rec.error is not None
    assert "hunter2" not in rec.error.message and "hunter2" not in (rec.error.traceback or "")
    assert "postgresql://app:***@db:5432/shop" in rec.error.message
    assert "hunter2" not in str(info.value)


class _Custom(BaseException):
    pass


@pytest.mark.parametrize("pool", ["thread", "solo", "async"])
@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt(), _Custom("odd")])
def test_a_task_raising_a_base_exception_fails_and_frees_its_slot(
    app: Stem, pool: str, exc: BaseException
) -> None:
    """It used to end the pool thread (or the async pool's loop): the task stayed PENDING
    with its lease renewed for ever, and its slot was gone."""

    @app.task(name="quits", max_retries=0)
    def quits() -> None:
        raise exc

    @app.task(name="after")
    def after() -> str:
        return "ran"

    with Running(app, pool=pool, concurrency=1):
        res = quits.delay()
        with pytest.raises(TaskError, match=type(exc).__name__):
            res.get(timeout=5)
        assert after.delay().get(timeout=5) == "ran"
    assert res.state == states.FAILURE


def test_get_does_not_spin_on_a_store_that_answers_at_once_without_a_result(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backend whose index says ready while the record says STARTED answered every
    wait at once: get() asked it tens of thousands of times a second."""
    from stem.result import ResultRecord

    calls = []

    def wait(task_id: str, timeout_s: float) -> ResultRecord:
        calls.append(timeout_s)
        return ResultRecord(task_id, states.STARTED)

    monkeypatch.setattr(app.result_store, "wait", wait)
    with pytest.raises(ResultTimeout):
        app.AsyncResult("t1").get(timeout=1.0)
    assert 2 <= len(calls) <= 20, len(calls)


def test_hand_back_frees_the_concurrency_place_before_the_delivery(app: Stem) -> None:
    """Released first, the copy could be reserved elsewhere and pass the cap as this
    holder, then lose its place when this worker freed it: two would run."""
    from stem.worker.job import Job
    from stem.worker.settle import Settler

    @app.task(name="capped_hb", concurrency_limit=1)
    def capped_hb() -> None: ...

    order: list[str] = []
    settler = Settler.__new__(Settler)
    settler.release = lambda delivery, delay_s=0.0: not order.append("release")  # type: ignore[method-assign]
    settler.limits = type("L", (), {"finished": lambda self, task, env: order.append("slot")})()  # type: ignore[assignment]
    env = app.build_envelope("capped_hb")
    delivery = Delivery("r", env.id, "default", b"", 1, lease_expires_ms=0)
    job = Job(delivery=delivery, envelope=env, task=capped_hb)
    assert settler.give_back(settler.claim_all([job])) == 1
    assert order == ["slot", "release"]


def test_a_worker_deletes_expired_results_and_forgets_lapsed_revocations(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQL result stores keep expired rows until asked; a worker asks now and then. And
    its set of revoked ids keeps only what is still revoked (it grew for good before)."""
    import sqlite3

    from stem.control import revoked_key
    from stem.worker import consumer

    monkeypatch.setattr(consumer, "RESULT_CLEANUP_S", 0.1)
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    app = Stem("cleanup", broker=url, backend=url)
    try:
        app.backend.store("old", states.SUCCESS, b"{}", 0.05)
        app.broker.swap(revoked_key("gone"), None, "1", 60.0)
        with running_worker(app, heartbeat_s=0.1) as w:
            deadline = time.monotonic() + 10
            while "gone" not in w.revoked and time.monotonic() < deadline:
                time.sleep(0.02)
            assert "gone" in w.revoked
            app.broker.release(revoked_key("gone"))  # its key lapses
            while time.monotonic() < deadline and (
                "gone" in w.revoked
                or sqlite3.connect(tmp_path / "stem.db")
                .execute("SELECT count(*) FROM stem_results")
                .fetchone()[0]
            ):
                time.sleep(0.05)
            assert "gone" not in w.revoked
        rows = sqlite3.connect(tmp_path / "stem.db").execute("SELECT count(*) FROM stem_results")
        assert rows.fetchone()[0] == 0
    finally:
        app.close()


@pytest.mark.parametrize("path", ["rate-limit", "retry"])
def test_a_message_put_back_signed_afresh_cannot_be_replayed(path: str) -> None:
    """A rate-limited run deferred to its slot, or a retry, is put back signed afresh (a
    new nonce). The nonce of the bytes first delivered was left unspent on the rate-limit
    path: a copy of them, re-injected after the task ran, ran again (and, deferred in
    its turn, got signed afresh itself)."""
    from stem.brokers.base import Message

    url = f"memory://put-back-{time.monotonic_ns()}"
    ring = Keyring.build("hmac-sha256", {"v1": b"k" * 32}, active_key="v1")
    app = Stem("put-back", broker=url, backend=url, keyring=ring)
    runs: list[str] = []
    try:

        @app.task(name="transfer", bind=True, rate_limit="2/s", max_retries=1)
        def transfer(ctx: Any, what: str) -> str:
            runs.append(what)
            if path == "retry" and what == "target" and ctx.attempt == 0:
                raise ctx.retry(countdown=0)
            return what

        filler = app.build_envelope("transfer", ["filler"])
        target = app.build_envelope("transfer", ["target"])
        captured = app.seal(target)  # what someone reading the broker saw
        msgs = [
            Message(filler.id, "default", app.seal(filler)),
            Message(target.id, "default", captured),
        ]
        if path == "retry":
            msgs = msgs[1:]
        app.broker.publish(msgs)
        with Running(app, concurrency=2):
            assert app.AsyncResult(target.id).get(timeout=10) == "target"
            app.broker.publish([Message(target.id, "default", captured) for _ in range(3)])
            deadline = time.monotonic() + 10
            while len(app.broker.dlq_list("default")) < 3 and time.monotonic() < deadline:
                time.sleep(0.02)
        reasons = [d.reason for d in app.broker.dlq_list("default")]
        assert reasons == ["signature-replayed"] * 3
        assert runs.count("target") == (2 if path == "retry" else 1), runs
    finally:
        app.close()


@pytest.mark.parametrize("trouble", ["slow-heartbeat", "autoscale-raises"])
def test_leases_are_renewed_whatever_housekeeping_does(
    app: Stem, trouble: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats and autoscaling ran on the lease thread: a slow one (a broker slow to
    answer, a process pool starting processes) held up lease renewal, and one that raised
    ended the thread for good. Either way a task still running here was delivered again
    and ran twice."""
    from stem.observability import signals

    runs: list[str] = []

    @app.task(name="long_one")
    def long_one() -> None:
        runs.append("ran")
        time.sleep(2.5)

    def slow_heartbeat(**_: Any) -> None:
        time.sleep(4)

    def failing_autoscale(now: float) -> None:
        raise StemError("pool process failed to start: ImportError: broken deploy")

    if trouble == "slow-heartbeat":
        signals.heartbeat.connect(slow_heartbeat)
    try:
        with Running(app, lease_s=1.0, pool="thread", autoscale=(3, 2), heartbeat_s=0.5) as worker:
            if trouble == "autoscale-raises":
                monkeypatch.setattr(worker, "_autoscale", failing_autoscale)
            res = long_one.delay()
            res.get(timeout=15)
            time.sleep(1.5)  # a copy delivered again would have started by now
            lease = [t for t in worker._threads if t.name == "stem-lease"]
            assert lease and lease[0].is_alive()
        assert runs == ["ran"]
    finally:
        signals.heartbeat.disconnect(slow_heartbeat)


def test_shutdown_is_bounded_when_the_broker_stops_answering(
    app: Stem, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Handing unfinished tasks back, one broker call each with no deadline, held the exit
    for minutes when the broker hung (past systemd's TimeoutStopSec), and each call that
    failed still counted as handed back."""
    from stem.worker import consumer

    # 15 s in service, where the hand-back step gets 5 s of it: 1 s is as good a bound here.
    monkeypatch.setattr(consumer, "STOP_TAIL_S", 1.0)
    hung = threading.Event()

    @app.task(name="sleepy")
    def sleepy() -> None:
        hung.wait(60)

    def hanging_nack(*_: Any, **__: Any) -> bool:
        hung.wait(60)
        return True

    try:
        with Running(app, pool="thread", concurrency=2, shutdown_budget_s=0.2) as worker:
            sleepy.delay()
            sleepy.delay()
            deadline = time.monotonic() + 5
            while len(worker.inflight) < 2 and time.monotonic() < deadline:
                time.sleep(0.01)
            monkeypatch.setattr(app.broker, "nack", hanging_nack)
            stopping = time.monotonic()
        assert time.monotonic() - stopping < 30, "shutdown waited on the hung broker"
        assert "handing tasks back did not finish" in caplog.text
        assert "2 unfinished task(s) not handed back" in caplog.text
        assert "handed 2 unfinished" not in caplog.text
    finally:
        hung.set()


def test_a_result_too_large_for_any_pool_fails_on_every_pool(app: Stem) -> None:
    """A 70 MB result failed on the process pool (its pipe's frame limit) but was stored
    on the others: one limit now, with a message that says what to do."""
    from stem.worker.job import MAX_RESULT_BYTES

    @app.task(name="huge", max_retries=0)
    def huge() -> str:
        return "x" * (MAX_RESULT_BYTES + 1)

    with Running(app, pool="thread", concurrency=1):
        with pytest.raises(TaskError, match="over the 48 MiB a result may have"):
            huge.delay().get(timeout=30)


def test_a_task_being_admitted_as_the_worker_stops_is_not_stranded(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown listed the running jobs while the consumer was still admitting what its
    last reserve brought: a job added after the list was neither waited for nor handed
    back, queued behind the pool's stop, and stayed reserved until its lease ran out."""

    @app.task(name="late_admit")
    def late_admit() -> str:
        return "ran"

    with Running(app, lease_s=60.0, concurrency=1, shutdown_budget_s=2.0) as worker:
        real_admit = worker.admission.admit
        admitting = threading.Event()

        def slow_admit(*args: Any, **kwargs: Any) -> Any:
            admitting.set()  # past the consumer's last look at the stop flag
            time.sleep(0.5)
            return real_admit(*args, **kwargs)

        monkeypatch.setattr(worker.admission, "admit", slow_admit)
        res = late_admit.delay()
        assert admitting.wait(5)
    [stats] = app.broker.stats(["default"])
    assert res.state == states.SUCCESS or stats.ready == 1, (res.state, stats)
    assert stats.reserved == 0


def test_a_result_store_down_gives_tasks_back_for_longer_and_longer(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run whose result could not be written was given back for 1 s: for as long as
    the result store stayed down, every task ran again about every second (found with
    PostgreSQL down: 286 runs for 20 tasks in 20 s). Given back now for as long as the
    store has been down (1 s to 30 s), whatever the number of tasks failing meanwhile."""
    from stem.errors import BackendConnectionError
    from stem.worker.settle import Settler

    down = True
    clock = [1000.0]

    def write_state(*_: Any, **__: Any) -> None:
        if down:
            raise BackendConnectionError("cannot reach the result store (test)")

    monkeypatch.setattr(app.result_store, "write_state", write_state)
    settler = Settler(app, "w", max_deliveries=5)
    settler._clock = lambda: clock[0]
    env = app.build_envelope("anything")
    delays = []
    for elapsed in (0, 0, 0, 3, 10, 25, 50):  # 16 tasks failing at once count as one
        clock[0] = 1000.0 + elapsed
        assert not settler.store(env, states.SUCCESS, attempts=1)
        delays.append(settler.later())
    assert delays == [1.0, 1.0, 1.0, 3.0, 10.0, 25.0, 30.0]
    clock[0] += 31  # no failure for 30 s: back, whatever no write said so
    assert settler.later() == 1.0
    assert not settler.store(env, states.SUCCESS, attempts=1)
    clock[0] += 5
    assert settler.later() == 5.0
    down = False
    assert settler.store(env, states.SUCCESS, attempts=1)
    assert settler.later() == 1.0


def test_a_stop_with_the_broker_hung_ends_within_the_drain_budget_and_its_tail(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each shutdown step had its own few seconds (handing back, acks, every thread's
    join, the control thread, the goodbye): with the broker hung they added up to 35-40 s
    past the drain budget, where units allow the budget plus 30 s."""
    from stem.worker import consumer

    tail_s = 1.0
    monkeypatch.setattr(consumer, "STOP_TAIL_S", tail_s)  # 15 s in service: kept short here
    hung = threading.Event()

    def hang(*_: Any, **__: Any) -> Any:
        hung.wait(120)
        raise BrokerError("hung (test)")

    @app.task(name="sleepy_tail")
    def sleepy_tail() -> None:
        hung.wait(120)

    try:
        with Running(app, pool="thread", concurrency=2, shutdown_budget_s=0.5) as worker:
            sleepy_tail.delay()
            deadline = time.monotonic() + 5
            while not worker.inflight and time.monotonic() < deadline:
                time.sleep(0.01)
            for name in ("nack", "ack", "extend", "reserve", "drop", "claim", "swap", "publish"):
                monkeypatch.setattr(app.broker, name, hang)
            stopping = time.monotonic()
        took = time.monotonic() - stopping
        assert took < 0.5 + tail_s + 5, f"the stop took {took:.1f}s"
    finally:
        hung.set()


def test_a_message_whose_lease_lapsed_is_not_run_twice_by_one_worker(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Renewals held up (a paused server) let a running task's lease lapse; the same
    worker reserved it again and ran the copy beside the first run (and, once given back
    instead, after it: the first run's lease was gone, so was its ack)."""
    release = threading.Event()
    runs: list[str] = []

    @app.task(name="lapsing", ignore_result=True)
    def lapsing() -> None:
        runs.append("ran")
        release.wait(10)

    real_extend = app.broker.extend
    monkeypatch.setattr(app.broker, "extend", lambda deliveries, lease_s: [False] * len(deliveries))
    with Running(app, pool="thread", concurrency=2, lease_s=0.3, poll_wait_s=0.05):
        lapsing.delay()
        time.sleep(2)  # the lease lapses many times over meanwhile
        monkeypatch.setattr(app.broker, "extend", real_extend)  # renewals work again
        release.set()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            [stats] = app.broker.stats(["default"])
            if stats.ready == stats.reserved == stats.delayed == 0:
                break
            time.sleep(0.05)
        time.sleep(1)  # a copy left behind would have run by now
    assert runs == ["ran"]
    [stats] = app.broker.stats(["default"])
    assert (stats.ready, stats.reserved, stats.delayed) == (0, 0, 0)


def test_heartbeats_go_on_while_autoscaling_takes_its_time(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Growing a process pool starts processes one by one (seconds each for an app slow
    to import): on the heartbeat thread that held up heartbeats, and with them systemd's
    watchdog, which could kill a worker for growing."""
    from stem.observability import signals

    beats: list[float] = []
    scaling, scaled = threading.Event(), threading.Event()

    def count(**_: Any) -> None:
        beats.append(time.monotonic())

    def slow_autoscale(now: float) -> None:
        scaling.set()
        scaled.wait(10)  # until the heartbeats were counted (the stop then need not wait)

    signals.heartbeat.connect(count)
    try:
        with Running(app, pool="thread", autoscale=(3, 1), heartbeat_s=0.1) as worker:
            monkeypatch.setattr(worker, "_autoscale", slow_autoscale)
            assert scaling.wait(5), "no autoscale pass started"
            since = time.monotonic()
            time.sleep(1.5)
            counted = len([b for b in beats if b >= since])
            scaled.set()
        assert counted >= 3, "heartbeats stopped while scaling"
    finally:
        scaled.set()
        signals.heartbeat.disconnect(count)
