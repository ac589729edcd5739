"""Pools on their own: how time limits reach the code of a running task, and only it."""

from __future__ import annotations

import gc
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stem import Stem
from stem.brokers.base import Delivery
from stem.errors import HardTimeLimitExceeded, SoftTimeLimitExceeded, StemError
from stem.testing import memory_app
from stem.worker import job as job_module
from stem.worker.job import Job, Outcome
from stem.worker.pools import ThreadPool
from tests.fixtures.stuck import ignore_hard_limits


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()
    yield a
    a.close()


def _job(app: Stem, name: str) -> Job:
    env = app.build_envelope(name)
    return Job(
        delivery=Delivery("r", env.id, "default", b"", 1, lease_expires_ms=0),
        envelope=env,
        task=app.tasks[name],
    )


def _run_until_inside(pool: ThreadPool, job: Job) -> None:
    """Submit ``job`` and return once its function runs (its window is open)."""
    pool.submit(job)
    deadline = time.monotonic() + 5
    while job.window._thread is None:
        assert time.monotonic() < deadline, "the task never started"
        time.sleep(0.01)


def test_a_limit_that_fires_as_the_task_returns_does_not_land_in_settlement(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The watchdog decides to interrupt, the task returns meanwhile: the exception used to
    be raised wherever the pool thread was by then (settling the outcome, or the next
    task), ending the thread with a result stored and no ack sent."""
    go = threading.Event()
    settling = threading.Event()
    real = job_module._raise_in_thread

    def late_raise(tid: int, exc_type: type[BaseException]) -> bool:
        if exc_type is SoftTimeLimitExceeded:
            go.set()  # the task returns now
            settling.wait(1.0)  # and, unless the window holds it, reaches settlement
        # Nothing after the injection: under a tracer (coverage), CPython 3.11 spins any
        # thread that enters a Python function while an exception is pending for a
        # thread that cannot run (this one holds the lock that thread waits for).
        return real(tid, exc_type)

    monkeypatch.setattr(job_module, "_raise_in_thread", late_raise)

    @app.task(name="quick")
    def quick() -> str:
        go.wait(5)
        return "done"

    outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    stray: list[BaseException] = []

    def done(job: Job, outcome: Outcome) -> None:
        try:
            outcomes.put(outcome)
            settling.set()
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:  # settlement work, in Python
                pass
        except BaseException as exc:
            stray.append(exc)
            raise

    pool = ThreadPool(1, done)
    pool.start()
    try:
        first = _job(app, "quick")
        _run_until_inside(pool, first)
        pool.on_soft_limit(first)
        outcome = outcomes.get(timeout=5)
        assert outcome.status == "success" and outcome.value == "done"
        assert stray == []
        # The pool thread survived and the next task is not hit either.
        go.set()
        pool.submit(_job(app, "quick"))
        assert outcomes.get(timeout=5).status == "success"
        assert stray == []
    finally:
        go.set()
        pool.stop(kill=False)


def test_a_limit_interrupts_the_task_while_it_runs(app: Stem) -> None:
    caught: list[str] = []

    @app.task(name="slow")
    def slow() -> str:
        try:
            while True:
                time.sleep(0.01)
        except SoftTimeLimitExceeded:
            caught.append("soft")
            return "cleaned up"

    outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    pool = ThreadPool(1, lambda job, outcome: outcomes.put(outcome))
    pool.start()
    try:
        job = _job(app, "slow")
        assert job.window.interrupt(SoftTimeLimitExceeded) is None  # not running yet
        pool.submit(job)
        deadline = time.monotonic() + 5
        while job.window.interrupt(SoftTimeLimitExceeded) is None:
            assert time.monotonic() < deadline, "the task never started"
            time.sleep(0.01)
        outcome = outcomes.get(timeout=5)
        assert (outcome.status, outcome.value, caught) == ("success", "cleaned up", ["soft"])
        assert job.window.interrupt(SoftTimeLimitExceeded) is None  # over: nothing to hit
    finally:
        pool.stop(kill=False)


def test_a_hard_limit_on_the_thread_pool_is_settled_off_the_callers_thread(app: Stem) -> None:
    """on_hard_limit is called by the worker's lease thread: settling there (a result
    write, perhaps slow) held up lease renewal of every other running task."""
    release = threading.Event()

    @app.task(name="stuck_here")
    def stuck_here() -> None:
        ignore_hard_limits(release)

    settled_on: queue.SimpleQueue[str] = queue.SimpleQueue()
    pool = ThreadPool(1, lambda job, outcome: settled_on.put(threading.current_thread().name))
    pool.start()
    try:
        job = _job(app, "stuck_here")
        _run_until_inside(pool, job)
        pool.on_hard_limit(job)
        assert settled_on.get(timeout=5) != threading.current_thread().name
    finally:
        release.set()
        pool.stop(kill=False)


class _FakeChild:
    def __init__(self) -> None:
        self.retiring = False
        self.job: Job | None = None
        self.lock = threading.Lock()
        self.proc = type("P", (), {"poll": lambda self: None, "pid": 0})()


def _process_pool(app: Stem, done: Any) -> Any:
    from stem.worker.process_pool import ProcessPool

    return ProcessPool(1, done, bootstrap={"app": "tests.unit.nowhere:app"})


def test_a_process_pool_grown_part_way_counts_the_processes_that_started(app: Stem) -> None:
    pool = _process_pool(app, lambda job, outcome: None)
    started: list[int] = []

    def spawn() -> None:
        if len(started) == 1:
            raise StemError("pool process failed to start: ImportError: broken deploy")
        started.append(1)

    pool._spawn = spawn
    with pytest.raises(StemError, match="broken deploy"):
        pool.resize(4)
    assert pool.size == 2  # it said 4 while only one more process ran


def test_a_pool_process_that_cannot_be_replaced_is_tried_again(app: Stem) -> None:
    pool = _process_pool(app, lambda job, outcome: None)
    tries: list[float] = []

    def spawn() -> None:
        tries.append(time.monotonic())
        if len(tries) < 3:
            raise StemError("pool process failed to start: ImportError: broken deploy")

    pool._spawn = spawn
    pool._replace()
    deadline = time.monotonic() + 10
    while len(tries) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(tries) == 3, "a replacement that failed once was never tried again"


def test_a_job_whose_hard_limit_passed_while_it_waited_does_not_start(app: Stem) -> None:
    """on_hard_limit found no process holding it then (a replacement was still starting),
    so the limit was never enforced and the task ran to completion."""
    from stem.errors import HardTimeLimitExceeded

    @app.task(name="late", time_limit=1)
    def late() -> None: ...

    outcomes: list[Outcome] = []
    pool = _process_pool(app, lambda job, outcome: outcomes.append(outcome))
    child = _FakeChild()
    pool._idle.put(child)
    job = _job(app, "late")
    job.hard_fired = True
    pool.submit(job)
    assert [o.status for o in outcomes] == ["failure"]
    assert outcomes[0].error is not None
    assert outcomes[0].error.type == HardTimeLimitExceeded.__name__
    assert child.job is None and pool._idle.get_nowait() is child  # free for the next job


class _SlowToOpen:
    """A lock whose first release pauses (after releasing): the moment just after the
    window opened, held long enough for a limit to be sent then."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.opened = threading.Event()
        self._first = True

    def __enter__(self) -> _SlowToOpen:
        self._lock.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self._lock.release()
        if self._first:
            self._first = False
            self.opened.set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:  # the limit sent meanwhile is raised here
                time.sleep(0.001)


def test_a_limit_sent_as_the_window_opens_leaves_it_closed_behind_it() -> None:
    """Raised at the check after the opening lock's __exit__, the exception escaped
    before the try whose finally closes the window: it stayed open, and a later limit
    (the hard one, revoke --terminate) was raised into the idle pool thread."""
    window = job_module.Interruptible()
    lock = _SlowToOpen()
    window._lock = lock  # type: ignore[assignment]
    seen: list[object] = []

    def run() -> None:
        try:
            seen.append(window.call(lambda: "ran"))
        except SoftTimeLimitExceeded:
            seen.append("limit")
        seen.append(window._thread)

    t = threading.Thread(target=run)
    t.start()
    assert lock.opened.wait(5)
    assert window.interrupt(SoftTimeLimitExceeded) is not None
    t.join(10)
    assert seen == ["limit", None]
    assert window.interrupt(HardTimeLimitExceeded) is None  # nothing left to hit


def test_a_second_hard_limit_on_a_stuck_thread_replaces_it_once(app: Stem) -> None:
    release = threading.Event()

    @app.task(name="deaf")
    def deaf() -> None:
        ignore_hard_limits(release)

    pool = ThreadPool(1, lambda job, outcome: None)
    pool.start()
    try:
        job = _job(app, "deaf")
        _run_until_inside(pool, job)
        pool.on_hard_limit(job)
        pool.on_hard_limit(job)  # revoke --terminate after the watchdog's own
        assert len(pool._threads) == 2  # the stuck one and one replacement
    finally:
        release.set()
        pool.stop(kill=False)


def test_a_soft_limit_sent_before_the_task_started_is_sent_again(app: Stem) -> None:
    @app.task(name="quick_soft")
    def quick_soft() -> None: ...

    pool = ThreadPool(1, lambda job, outcome: None)
    job = _job(app, "quick_soft")
    job.soft_fired = True  # as the watchdog sets it before calling on_soft_limit
    pool.on_soft_limit(job)  # the task is not running yet: nothing to raise into
    assert job.soft_fired is False


def test_a_soft_limit_waits_while_the_pool_process_writes_a_frame() -> None:
    """Raised part-way through a frame (a progress report, a publish's notice), the soft
    limit left half a frame in the pipe and the worker killed the pool process."""
    from stem.worker import child

    child._alarm.writing = True
    try:
        child._on_alarm(14, None)  # no raise while writing
        assert child._alarm.deferred
    finally:
        child._alarm.writing = False
        child._alarm.deferred = False
    with pytest.raises(SoftTimeLimitExceeded):
        child._on_alarm(14, None)


def test_a_pool_process_that_comes_up_as_the_pool_stops_is_not_kept(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    """stop() took its list of processes while a replacement was still starting: the
    replacement joined after it, outlived the pool, and ran a job already handed back."""
    pool = _process_pool(app, lambda job, outcome: None)
    started: list[Any] = []

    def ready_as_the_pool_stops(child: Any) -> dict[str, Any]:
        started.append(child.proc)
        pool.stop(kill=True)  # what the worker's shutdown does meanwhile
        return {"type": "ready", "pid": child.proc.pid}

    monkeypatch.setattr(pool, "_first_frame", ready_as_the_pool_stops)
    with pytest.raises(StemError, match="the pool is stopping"):
        pool._start_child()
    assert pool.pids() == [] and pool._idle.empty()
    assert started[0].poll() is not None  # and the process is gone
    with pytest.raises(StemError, match="the pool is stopping"):
        pool._spawn()  # nothing new starts once stopped


def test_a_job_waiting_for_a_pool_process_gives_up_when_the_pool_stops(app: Stem) -> None:
    @app.task(name="waits")
    def waits() -> None: ...

    pool = _process_pool(app, lambda job, outcome: None)
    waiting = threading.Thread(target=pool.submit, args=(_job(app, "waits"),), daemon=True)
    waiting.start()
    pool.stop(kill=True)
    waiting.join(5)
    assert not waiting.is_alive(), "submit waited for a pool process that never comes"


def test_a_pool_process_stuck_starting_is_killed_not_waited_for(
    app: Stem, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every start goes through the spawner thread: one pool process hung importing the
    app held up every later start (replacements, resizes) for good."""
    from stem.worker import process_pool

    (tmp_path / "stem_slow_import_app.py").write_text("import time\ntime.sleep(60)\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.setattr(process_pool, "START_TIMEOUT_S", 1.0)
    pool = process_pool.ProcessPool(
        1, lambda job, outcome: None, bootstrap={"app": "stem_slow_import_app:app"}
    )
    try:
        with pytest.raises(StemError, match="no word from it within 1s"):
            pool._spawn()
        assert pool.pids() == []
    finally:
        pool.stop(kill=True)


def test_a_queued_job_settled_before_its_turn_does_not_run(app: Stem) -> None:
    """Failed by its hard limit (or handed back) while it waited in the pool's queue, it
    used to run all the same once a thread was free."""
    ran: list[str] = []

    @app.task(name="too_late")
    def too_late() -> None:
        ran.append("ran")

    outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    pool = ThreadPool(1, lambda job, outcome: outcomes.put(outcome))
    job = _job(app, "too_late")
    assert job.claim_settlement()
    pool.submit(job)
    pool.submit(_job(app, "too_late"))
    pool.start()
    try:
        outcomes.get(timeout=5)  # the second one ran
        assert ran == ["ran"]
    finally:
        pool.stop(kill=False)


def test_a_hard_limit_is_settled_even_when_no_thread_can_replace_the_stuck_one(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()

    @app.task(name="stuck_no_threads")
    def stuck_no_threads() -> None:
        ignore_hard_limits(release)

    outcomes: queue.SimpleQueue[Outcome] = queue.SimpleQueue()
    pool = ThreadPool(1, lambda job, outcome: outcomes.put(outcome))
    pool.start()
    try:
        job = _job(app, "stuck_no_threads")
        _run_until_inside(pool, job)

        def no_threads() -> None:
            raise StemError("cannot start a pool thread: can't start new thread")

        monkeypatch.setattr(pool, "_spawn", no_threads)
        with pytest.raises(StemError, match="cannot start a pool thread"):
            pool.on_hard_limit(job)
        outcome = outcomes.get(timeout=5)
        assert outcome.error is not None and outcome.error.type == "HardTimeLimitExceeded"
    finally:
        release.set()
        pool.stop(kill=False)


def test_a_graceful_stop_lets_pool_processes_exit_by_themselves(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ending the spawner thread first had the kernel kill every pool process at once
    (PR_SET_PDEATHSIG follows the thread that started them): a graceful stop cut short,
    and the app's pool_process_shutdown receivers never ran."""
    from stem.loader import load_app
    from stem.worker.process_pool import ProcessPool

    (tmp_path / "stem_stop_app.py").write_text(
        "from stem import Stem\napp = Stem('stopapp', broker='memory://s', backend='memory://s')\n"
    )
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    monkeypatch.syspath_prepend(str(tmp_path))
    app = load_app("stem_stop_app:app")
    pool = ProcessPool(
        2,
        lambda job, outcome: None,
        bootstrap={"app": "stem_stop_app:app", "config": app.child_config()},
    )
    pool.start()
    procs = [c.proc for c in pool._children]
    assert len(procs) == 2
    pool.stop(kill=False)
    assert [p.returncode for p in procs] == [0, 0]  # not -9 (SIGKILL)


def test_two_resizes_at_once_grow_the_pool_once(app: Stem) -> None:
    """A control pool-grow and an autoscale step read the same size and both started
    the processes it lacked."""
    pool = _process_pool(app, lambda job, outcome: None)
    started: list[int] = []

    def slow_spawn() -> None:
        time.sleep(0.2)
        started.append(1)

    pool._spawn = slow_spawn
    both = [threading.Thread(target=pool.resize, args=(3,)) for _ in range(2)]
    for t in both:
        t.start()
    for t in both:
        t.join(10)
    assert (pool.size, len(started)) == (3, 2)


def test_a_shrink_skips_stale_idle_entries(app: Stem) -> None:
    """A stale entry (a process gone) taken from the idle queue counted as the one
    retired, and a live process stayed."""
    pool = _process_pool(app, lambda job, outcome: None)
    gone, live = _FakeChild(), _FakeChild()
    gone.proc = type("P", (), {"poll": lambda self: -9, "pid": 1})()
    closed: list[object] = []
    pool._close_writer = closed.append
    pool.size = 2
    pool._idle.put(gone)
    pool._idle.put(live)
    pool.resize(1)
    assert closed == [live] and live.retiring


def test_an_async_pool_stopped_at_once_does_not_wait_for_a_blocked_loop(
    app: Stem, caplog: pytest.LogCaptureFixture
) -> None:
    """A coroutine blocking the event loop (time.sleep in an async def) held a stop at
    once for 5 s, past the shutdown budget, which had already handed its task back."""
    from stem.worker.pools import AsyncPool

    inside, blocked_until_end = threading.Event(), []

    @app.task(name="blocks_loop")
    async def blocks_loop() -> None:
        inside.set()
        time.sleep(3)  # blocks the loop, as such code does
        blocked_until_end.append("loop blocked to the end")

    pool = AsyncPool(1, lambda job, outcome: None)
    pool.start()
    pool.submit(_job(app, "blocks_loop"))
    assert inside.wait(5)
    pool.stop(kill=True)
    assert blocked_until_end == []  # stop returned while the loop was still blocked
    # When the coroutine ends, its outcome is dropped (the job was handed back): settling
    # it on the stopped pool logged "Task exception was never retrieved".
    pool._thread.join(10)
    assert blocked_until_end and pool._loop.is_closed()
    gc.collect()
    assert not [r for r in caplog.records if r.name == "asyncio"]
