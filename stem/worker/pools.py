"""Execution pools: thread, async and solo (the process pool lives in process_pool.py).

A pool runs jobs and reports each outcome through the ``done`` callback given at
construction. The worker owns slot accounting: it submits a job only when a slot is free.
Time limits are signalled by the worker's watchdog through ``on_soft_limit`` and
``on_hard_limit``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from typing import Any, Protocol

from stem.errors import HardTimeLimitExceeded, SoftTimeLimitExceeded, StemError
from stem.task import RUNNING
from stem.worker.job import Job, Outcome, call_args, check_value, classify, execute, failure

log = logging.getLogger("stem.worker.pool")

Done = Callable[[Job, Outcome], None]
Progress = Callable[[Job, dict[str, Any]], None]


class Pool(Protocol):
    name: str
    size: int

    def start(self) -> None: ...

    def submit(self, job: Job) -> None: ...

    def on_soft_limit(self, job: Job) -> None: ...

    def on_hard_limit(self, job: Job) -> None: ...

    def resize(self, size: int) -> None: ...

    def stop(self, *, kill: bool) -> None: ...


def _execute_here(job: Job, progress: Any) -> Outcome:
    """Run a plain-function job in this thread, which a time limit can then interrupt by
    raising its exception in the task's code (``job.window``)."""
    return execute(job.task, job.envelope, progress, job.window)


class ThreadPool:
    """Threads in this process. A hard time limit cannot kill a thread: the task gets an
    exception injected, its failure is recorded at once, and a fresh thread takes its slot;
    the stuck thread retires when (if) its task returns. Use the process pool where tasks
    may block in C code."""

    name = "thread"

    def __init__(self, size: int, done: Done, progress: Progress | None = None) -> None:
        self.size = size
        self._done = done
        self._progress = progress
        self._jobs: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._threads: set[threading.Thread] = set()
        self._retired: set[int] = set()
        self._lock = threading.Lock()
        self._seq = 0

    def start(self) -> None:
        for _ in range(self.size):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            self._seq += 1
            t = threading.Thread(target=self._run, name=f"stem-pool-{self._seq}", daemon=True)
            self._threads.add(t)
        try:
            t.start()
        except RuntimeError as exc:  # out of threads (a limit of the system or the cgroup)
            with self._lock:
                self._threads.discard(t)
            raise StemError(f"cannot start a pool thread: {exc}") from None

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while True:
                job = self._jobs.get()
                if job is None:
                    return
                if job.settled:
                    continue  # failed by its hard limit, or handed back, while it waited
                progress = None
                if self._progress is not None:
                    progress = functools.partial(self._progress, job)
                self._done(job, _execute_here(job, progress))
                if threading.get_ident() in self._retired:
                    return
        finally:
            with self._lock:
                self._threads.discard(me)
                self._retired.discard(threading.get_ident())

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def on_soft_limit(self, job: Job) -> None:
        if job.window.interrupt(SoftTimeLimitExceeded) is None:
            job.soft_fired = False  # not running yet (or over): the watchdog tries again

    def on_hard_limit(self, job: Job) -> None:
        try:
            self._replace_stuck(job)
        finally:  # settled even if no thread could be started in its place
            self._settle_hard_limit(job)

    def _replace_stuck(self, job: Job) -> None:
        tid = job.window.interrupt(HardTimeLimitExceeded)
        if tid is not None:
            with self._lock:
                replaced = tid in self._retired  # a second hard limit (revoke --terminate)
                self._retired.add(tid)
            if not replaced:
                self._spawn()

    def _settle_hard_limit(self, job: Job) -> None:
        outcome = failure(
            HardTimeLimitExceeded(
                f"task {job.task.name!r} exceeded its hard time limit of {job.hard_limit_s}s"
            )
        )
        # Settled on a thread of its own: this is the worker's lease thread, and a result
        # store slow to answer would hold up lease renewal (tasks running here would be
        # delivered again elsewhere).
        try:
            threading.Thread(
                target=self._done, args=(job, outcome), name="stem-limit-settle", daemon=True
            ).start()
        except RuntimeError:  # out of threads: settle here rather than not at all
            self._done(job, outcome)

    def resize(self, size: int) -> None:
        size = max(1, size)
        while self.size < size:
            self._spawn()  # may raise: the size then counts the threads that did start
            self.size += 1
        for _ in range(self.size - size):
            self._jobs.put(None)
        self.size = size

    def stop(self, *, kill: bool) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._jobs.put(None)
        if not kill:
            deadline = time.monotonic() + 5
            for t in threads:
                t.join(max(0.0, deadline - time.monotonic()))


class SoloPool(ThreadPool):
    """One job at a time. Runs in its own thread so the consumer can keep renewing leases
    and the watchdog can interrupt it."""

    name = "solo"

    def __init__(self, size: int, done: Done, progress: Progress | None = None) -> None:
        super().__init__(1, done, progress)

    def resize(self, size: int) -> None:
        """The solo pool always has one slot."""


_Call = tuple[Future[Any], Callable[..., Any], tuple[Any, ...]]


class _DaemonThreads(Executor):
    """Daemon threads running submitted calls, for the async pool's plain functions: one
    per slot, and a new one for each abandoned to a call stuck past its hard limit.
    ThreadPoolExecutor's threads are joined when the interpreter exits, so a call still
    blocked after a hard shutdown handed its task back kept the worker alive, and the task
    could run twice at once; daemon threads end with the process, as the thread pool's
    do."""

    def __init__(self, size: int, name: str) -> None:
        self._work: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._name = name
        self._lock = threading.Lock()
        self._retired: set[int] = set()  # threads abandoned to a call past its hard limit
        self._threads: list[threading.Thread] = []
        for _ in range(size):
            self._spawn()

    def _spawn(self) -> None:
        with self._lock:
            t = threading.Thread(
                target=self._run, name=f"{self._name}-{len(self._threads)}", daemon=True
            )
            self._threads.append(t)
        t.start()

    def abandon(self, ident: int) -> None:
        """The call running on thread ``ident`` is past its hard limit and may never
        return: a new thread takes its place, and it ends once (if) the call returns."""
        with self._lock:
            if ident in self._retired:
                return  # replaced already (a second hard limit: revoke --terminate)
            if not any(t.ident == ident for t in self._threads):
                return  # a thread of an executor replaced by a resize: it ends by itself
            self._retired.add(ident)
        self._spawn()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        future: Future[Any] = Future()
        self._work.put((future, functools.partial(fn, **kwargs) if kwargs else fn, args))
        return future

    def _run(self) -> None:
        me = threading.current_thread()
        try:
            while (item := self._work.get()) is not None:
                future, fn, args = item
                if not future.set_running_or_notify_cancel():
                    continue
                try:
                    future.set_result(fn(*args))
                except BaseException as exc:
                    future.set_exception(exc)
                with self._lock:
                    if me.ident in self._retired:
                        return
        finally:
            # However the thread ends, its id leaves the retired set: a later thread may
            # reuse it. (Time limits cannot end it: they raise only inside the task's
            # function, see Job.window.)
            with self._lock:
                self._retired.discard(me.ident or 0)
                if me in self._threads:
                    self._threads.remove(me)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            threads = list(self._threads)
        for _ in threads:
            self._work.put(None)
        if wait:
            for t in threads:
                t.join()


class AsyncPool:
    """An asyncio event loop in one thread: ``async def`` tasks run natively as coroutines,
    plain functions in threads of the pool's own (one per slot, so ``size`` of them can run
    at once). ``size`` bounds concurrent tasks. Outcomes are settled on separate threads,
    so a settle never waits behind a long plain function.

    Time limits: a coroutine is cancelled (it sees ``asyncio.CancelledError`` at its next
    ``await``; the task is recorded as SoftTimeLimitExceeded or HardTimeLimitExceeded); a
    plain function gets the exception injected, as on the thread pool. At the hard limit
    the failure is recorded and the slot freed at once, even if the code does not stop."""

    name = "async"

    def __init__(self, size: int, done: Done, progress: Progress | None = None) -> None:
        self.size = size
        self._done = done
        self._progress = progress
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="stem-async", daemon=True)
        self._tasks: dict[Job, asyncio.Task[Any]] = {}
        self._runners = _DaemonThreads(size, "stem-async-sync")
        self._settlers = ThreadPoolExecutor(_SETTLERS, thread_name_prefix="stem-async-settle")
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def _serve(self) -> None:
        try:
            self._loop.run_forever()
        finally:
            self._loop.close()  # here: a stop at once may not wait for the loop to end

    def submit(self, job: Job) -> None:
        self._loop.call_soon_threadsafe(self._start, job)

    def _start(self, job: Job) -> None:
        self._tasks[job] = self._loop.create_task(self._run(job))

    async def _run(self, job: Job) -> None:
        progress = None
        if self._progress is not None:
            progress = functools.partial(self._progress, job)
        start = time.perf_counter()
        try:
            if job.task.is_async:
                outcome = await self._run_coroutine(job, progress)
            else:
                outcome = await self._loop.run_in_executor(
                    self._runners, _execute_here, job, progress
                )
        except asyncio.CancelledError:
            if not (job.soft_fired or job.hard_fired):
                raise  # the pool is stopping: the worker hands the job back
            outcome = failure(_limit_error(job), runtime_s=time.perf_counter() - start)
        finally:
            self._tasks.pop(job, None)
        if self._stopped:
            return  # ran past a stop at once that did not wait: handed back, not settled
        # Settling does blocking I/O (backend, broker): keep it off the loop.
        await self._loop.run_in_executor(self._settlers, self._done, job, outcome)

    async def _run_coroutine(self, job: Job, progress: Any) -> Outcome:
        start = time.perf_counter()
        token = RUNNING.set(job.envelope)
        try:
            value = await job.task.fn(
                *call_args(job.task, job.envelope, progress), **job.envelope.kwargs
            )
        except asyncio.CancelledError:
            if not (job.soft_fired or job.hard_fired):
                raise  # the pool is stopping: the worker hands the job back
            return failure(_limit_error(job), runtime_s=time.perf_counter() - start)
        except BaseException as exc:  # SystemExit in a task must not end the event loop
            return classify(job.task, exc, start)
        finally:
            RUNNING.reset(token)
        return check_value(job.task, value, start)

    def on_soft_limit(self, job: Job) -> None:
        if job.window.interrupt(SoftTimeLimitExceeded) is None:
            self._loop.call_soon_threadsafe(self._cancel, job)

    def on_hard_limit(self, job: Job) -> None:
        tid = job.window.interrupt(HardTimeLimitExceeded)
        if tid is not None:
            # Code that does not return at once (blocked in C, say) keeps its thread: the
            # next task must not queue behind it. The new thread is started from the event
            # loop's thread, not this one (the worker's lease and time-limit thread).
            self._loop.call_soon_threadsafe(self._runners.abandon, tid)
        else:
            self._loop.call_soon_threadsafe(self._cancel, job)
        # Recorded now: code that ignores the cancellation (or blocks the loop) must not
        # hold the slot; whatever it returns later is dropped (a job settles once).
        self._settlers.submit(self._done, job, failure(_limit_error(job)))

    def _cancel(self, job: Job) -> None:
        task = self._tasks.get(job)
        if task is not None:
            task.cancel()

    def resize(self, size: int) -> None:
        size = max(1, size)
        if size > self.size:
            # An executor cannot grow: new work goes to a larger one, the old one finishes.
            old, self._runners = self._runners, _DaemonThreads(size, "stem-async-sync")
            old.shutdown(wait=False)
        self.size = size

    def stop(self, *, kill: bool) -> None:
        self._stopped = kill

        def _shutdown() -> None:
            for task in list(self._tasks.values()):
                task.cancel()
            self._loop.stop()

        if self._thread.is_alive():
            with contextlib.suppress(RuntimeError):  # closed meanwhile: stopped already
                self._loop.call_soon_threadsafe(_shutdown)
            # A coroutine that blocks the loop (time.sleep in an async def) holds it: when
            # stopping at once (the budget is spent, the tasks are handed back) wait only
            # briefly for it; its thread ends with the process.
            self._thread.join(_KILL_JOIN_S if kill else 5)
        elif not self._loop.is_closed():
            self._loop.close()  # never started
        self._runners.shutdown(wait=False)
        self._settlers.shutdown(wait=not kill)


_KILL_JOIN_S = 0.5  # how long a stop at once waits for the async pool's event loop
_SETTLERS = 4  # threads settling the async pool's outcomes (blocking result and ack calls)


def _limit_error(job: Job) -> BaseException:
    if job.hard_fired:
        return HardTimeLimitExceeded(f"hard time limit of {job.hard_limit_s}s")
    return SoftTimeLimitExceeded(f"soft time limit of {job.soft_limit_s}s")
