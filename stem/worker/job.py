"""What a pool runs (a Job) and what it reports back (an Outcome)."""

from __future__ import annotations

import asyncio
import ctypes
import inspect
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from stem.brokers.base import Delivery
from stem.envelope import Envelope, dumps
from stem.errors import EncodeError, HardTimeLimitExceeded, SoftTimeLimitExceeded
from stem.result import ErrorInfo
from stem.retry import Retry
from stem.task import RUNNING, Task, TaskContext

Status = Literal["success", "failure", "retry"]
_TB_LIMIT = 16_000


@dataclass(frozen=True, slots=True)
class Outcome:
    status: Status
    value: Any = None
    error: ErrorInfo | None = None
    retry_countdown_s: float | None = None
    retry_max_retries: int | None = None
    autoretry: bool = False
    runtime_s: float = 0.0

    def to_wire(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "value": self.value,
            "error": None
            if self.error is None
            else [self.error.type, self.error.message, self.error.traceback],
            "retry_countdown_s": self.retry_countdown_s,
            "retry_max_retries": self.retry_max_retries,
            "autoretry": self.autoretry,
            "runtime_s": self.runtime_s,
        }

    @classmethod
    def from_wire(cls, d: dict[str, Any]) -> Outcome:
        err = d.get("error")
        return cls(
            status=d["status"],
            value=d.get("value"),
            error=ErrorInfo(err[0], err[1], err[2]) if err else None,
            retry_countdown_s=d.get("retry_countdown_s"),
            retry_max_retries=d.get("retry_max_retries"),
            autoretry=bool(d.get("autoretry")),
            runtime_s=float(d.get("runtime_s") or 0.0),
        )


def failure(
    exc: BaseException, *, tb: str | None = None, autoretry: bool = False, runtime_s: float = 0.0
) -> Outcome:
    return Outcome(
        "failure", error=ErrorInfo.from_exception(exc, tb), autoretry=autoretry, runtime_s=runtime_s
    )


@dataclass(eq=False)
class Job:
    """One delivery being run. ``settled`` flips once: the first outcome wins."""

    delivery: Delivery
    envelope: Envelope
    task: Task[Any, Any]
    soft_limit_s: float | None = None
    hard_limit_s: float | None = None
    started: float = field(default_factory=time.monotonic)
    soft_fired: bool = False
    hard_fired: bool = False
    revoked: bool = False
    window: Interruptible = field(default_factory=lambda: Interruptible())
    on_acked: Callable[[], None] | None = None  # the worker frees the job's slot with it
    ack_deferred: bool = False  # settled with an ack still to be sent; on_acked will run
    _settle_lock: threading.Lock = field(default_factory=threading.Lock)
    _settled: bool = False

    def claim_settlement(self) -> bool:
        with self._settle_lock:
            if self._settled:
                return False
            self._settled = True
            return True

    @property
    def settled(self) -> bool:
        return self._settled

    def adopt(self, delivery: Delivery) -> bool:
        """Carry on under ``delivery``, a new lease of this job's own message (its lease
        lapsed and it came back to this worker), unless the job is settled already: a
        settlement acks the lease it read once it claimed."""
        with self._settle_lock:
            if self._settled:
                return False
            self.delivery = delivery
            return True


def _raise_in_thread(thread_id: int, exc_type: type[BaseException]) -> bool:
    """Raise ``exc_type`` inside a Python thread at its next bytecode check (it replaces
    one set earlier and not raised yet)."""
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(
        ctypes.c_ulong(thread_id), ctypes.py_object(exc_type)
    )
    return bool(n == 1)


class _Withdrawn(BaseException):
    """Takes the place of a time-limit exception sent too late; raised and dropped at once.
    (Withdrawing with PyThreadState_SetAsyncExc(id, NULL) leaves CPython's pending-work
    flag set for every thread: seen here to spin a thread under a tracer.)"""


_LATE = (SoftTimeLimitExceeded, HardTimeLimitExceeded, _Withdrawn)


class Interruptible:
    """The only window in which a time limit may raise inside a pool thread: while the
    task's own function runs there. An exception injected into a thread by its id lands
    wherever that thread is when it next checks, so one aimed at a task that had just
    returned used to land in settlement code (a result stored but never acked, a pool
    thread ended) or in the thread's next task. Here the window opens and closes under
    a lock the injector takes too, and closing takes an injection not raised yet."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._thread: int | None = None
        self._sent = False

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``fn(*args, **kwargs)`` with the window open. A limit that arrives as ``fn``
        returns is raised from the call (the task then failed at its limit)."""
        me = threading.get_ident()
        try:
            # Opened inside the try: one sent as soon as it is open (the lock's __exit__
            # call checks for it) must still find the window closed behind it.
            with self._lock:
                self._thread = me
                self._sent = False
            return fn(*args, **kwargs)
        finally:
            # No call between the end of fn and the store below, so nothing can be raised
            # there; once it is stored no injection can start. One sent in the window may
            # still be pending: it is raised here and dropped, directly or replaced by
            # _Withdrawn (which this thread then raises at its next check, in the loop).
            try:
                with self._lock:
                    self._thread = None
                    if self._sent:
                        self._sent = False
                        _raise_in_thread(me, _Withdrawn)
                        for _ in range(1000):
                            pass
            except _LATE:
                pass

    def interrupt(self, exc_type: type[BaseException]) -> int | None:
        """Raise ``exc_type`` in the task's code if it is running in a thread now; the
        thread's id if so."""
        with self._lock:
            tid = self._thread
            if tid is None or not _raise_in_thread(tid, exc_type):
                return None
            self._sent = True
            return tid


def make_context(env: Envelope, progress: Callable[[dict[str, Any]], None] | None) -> TaskContext:
    return TaskContext(
        task_id=env.id,
        task_name=env.task,
        attempt=env.attempt,
        max_retries=env.max_retries,
        headers=env.headers,
        queue=env.queue,
        root_id=env.root_id,
        parent_id=env.parent_id,
        group_id=env.group_id,
        progress=progress,
    )


def execute(
    task: Task[Any, Any],
    env: Envelope,
    progress: Callable[[dict[str, Any]], None] | None = None,
    window: Interruptible | None = None,
) -> Outcome:
    """Run a task function and turn whatever happens into an Outcome. Never raises: a
    task's SystemExit, KeyboardInterrupt or other BaseException is its failure, not the
    pool thread's end (which would leave the task unsettled and its slot taken). With a
    ``window``, time limits can interrupt the function (and only the function)."""
    start = time.perf_counter()
    token = RUNNING.set(env)
    try:
        args = call_args(task, env, progress)
        if window is None:
            value = _invoke(task, args, env.kwargs)
        else:
            value = window.call(_invoke, task, args, env.kwargs)
    except BaseException as exc:
        return classify(task, exc, start)
    finally:
        RUNNING.reset(token)
    return check_value(task, value, start)


def call_args(
    task: Task[Any, Any], env: Envelope, progress: Callable[[dict[str, Any]], None] | None
) -> tuple[Any, ...]:
    if task.options.bind:
        return (make_context(env, progress), *env.args)
    return env.args


def classify(task: Task[Any, Any], exc: BaseException, start: float) -> Outcome:
    """The outcome for an exception a task raised (call inside the ``except`` block)."""
    runtime = time.perf_counter() - start
    if isinstance(exc, Retry):
        err = ErrorInfo.from_exception(exc.exc, _tb()) if exc.exc is not None else None
        return Outcome(
            "retry",
            error=err,
            retry_countdown_s=exc.countdown,
            retry_max_retries=exc.max_retries,
            runtime_s=runtime,
        )
    if isinstance(exc, EncodeError):
        return failure(exc, runtime_s=runtime)
    if isinstance(exc, SoftTimeLimitExceeded):
        return failure(exc, tb=_tb(), runtime_s=runtime)
    return failure(exc, tb=_tb(), autoretry=autoretries(task, exc), runtime_s=runtime)


def autoretries(task: Task[Any, Any], exc: BaseException) -> bool:
    """Whether ``exc`` ending a run of ``task`` is retried (its ``autoretry_for``)."""
    return bool(task.options.autoretry_for) and isinstance(exc, task.options.autoretry_for)


# The largest value a task may return, as JSON: the same on every pool (the process
# pool's pipe takes 64 MiB frames, with the rest of the outcome around the value).
MAX_RESULT_BYTES = 48 * 1024 * 1024


def check_value(task: Task[Any, Any], value: Any, start: float) -> Outcome:
    """Success, unless the value cannot be stored as JSON or is over MAX_RESULT_BYTES
    (then a clear failure now, with the task's name, rather than at result-write time)."""
    runtime = time.perf_counter() - start
    try:
        size = len(dumps(value))
    except EncodeError as exc:
        return failure(
            EncodeError(f"task {task.name!r} returned a value that is not JSON: {exc}"),
            runtime_s=runtime,
        )
    if size > MAX_RESULT_BYTES:
        return failure(
            EncodeError(
                f"task {task.name!r} returned a value of {size} bytes as JSON, over the "
                f"{MAX_RESULT_BYTES >> 20} MiB a result may have (store it elsewhere and "
                "return where)"
            ),
            runtime_s=runtime,
        )
    return Outcome("success", value=value, runtime_s=runtime)


def _invoke(task: Task[Any, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
    value = task.fn(*args, **kwargs)
    if inspect.isawaitable(value):
        value = asyncio.run(_await(value))
    return value


async def _await(value: Any) -> Any:
    return await value


def _tb() -> str:
    text = traceback.format_exc()
    return text if len(text) <= _TB_LIMIT else "...\n" + text[-_TB_LIMIT:]
