"""Tasks: the ``@app.task`` decorator's product, its options and the run-time context."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Generic, ParamSpec, TypeVar

from stem.envelope import PRIORITY_MAX, PRIORITY_MIN, name_problem
from stem.errors import ConfigError
from stem.retry import Retry, RetryPolicy

if TYPE_CHECKING:
    from stem.app import Stem
    from stem.canvas import Signature
    from stem.envelope import Envelope
    from stem.result import AsyncResult

P = ParamSpec("P")
R = TypeVar("R")


#: The envelope of the task running in this context (thread or coroutine): the pools set
#: it around a task's call (``RUNNING.set`` / ``RUNNING.reset``, no wrapper: it is on
#: every task's path).
RUNNING: ContextVar[Envelope | None] = ContextVar("stem_running_task", default=None)


def current_envelope() -> Envelope | None:
    """The envelope of the task running in this thread (or coroutine), or None outside a
    task: what a task publishes becomes its child (``parent_id``, same ``root_id``)."""
    return RUNNING.get()


@dataclass(frozen=True, slots=True)
class TaskOptions:
    """Per-task settings. Times are seconds."""

    name: str
    queue: str | None = None
    priority: int = 0
    max_retries: int | None = 3
    retry_backoff: bool | float = False
    retry_backoff_max: float = 600.0
    retry_jitter: bool = True
    default_retry_delay: float = 1.0
    autoretry_for: tuple[type[BaseException], ...] = ()
    time_limit: float | None = None
    soft_time_limit: float | None = None
    expires: float | None = None
    ignore_result: bool = False
    bind: bool = False
    track_started: bool = False
    log_args: bool = False
    rate_limit: str | None = None
    rate_limit_key: str | Callable[..., str] | None = None
    rate_limit_group: str | None = None
    concurrency_limit: int | None = None
    limit_store_failure: str = "closed"
    unique: bool = False
    unique_key: str | Callable[..., str] | None = None
    unique_window_s: float = 3600.0
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if problem := name_problem("task name", self.name):
            raise ConfigError(problem)
        if not PRIORITY_MIN <= self.priority <= PRIORITY_MAX:
            raise ConfigError(
                f"task {self.name!r}: priority must be {PRIORITY_MIN}..{PRIORITY_MAX}"
            )
        if self.max_retries is not None and self.max_retries < 0:
            raise ConfigError(f"task {self.name!r}: max_retries must be >= 0 or None")
        for limit in (self.time_limit, self.soft_time_limit):
            if limit is not None and limit <= 0:
                raise ConfigError(f"task {self.name!r}: time limits must be > 0 seconds")
        if (
            self.time_limit is not None
            and self.soft_time_limit is not None
            and self.soft_time_limit >= self.time_limit
        ):
            raise ConfigError(f"task {self.name!r}: soft_time_limit must be below time_limit")

        if self.rate_limit is not None:
            from stem.limits import parse_rate

            parse_rate(self.rate_limit)
        if self.limit_store_failure not in ("open", "closed"):
            raise ConfigError(f"task {self.name!r}: limit_store_failure must be open or closed")
        if self.concurrency_limit is not None and self.concurrency_limit < 1:
            raise ConfigError(f"task {self.name!r}: concurrency_limit must be >= 1")

    def retry_policy(self) -> RetryPolicy:
        backoff = self.retry_backoff
        base = self.default_retry_delay if backoff is True or backoff is False else float(backoff)
        return RetryPolicy(
            max_retries=self.max_retries,
            backoff=backoff is not False,
            backoff_base_s=base,
            backoff_max_s=self.retry_backoff_max,
            jitter=self.retry_jitter,
        )


class TaskContext:
    """What a bound task (``bind=True``) receives as its first argument."""

    def __init__(
        self,
        *,
        task_id: str,
        task_name: str,
        attempt: int,
        max_retries: int | None,
        headers: Mapping[str, Any] | None = None,
        queue: str = "default",
        root_id: str | None = None,
        parent_id: str | None = None,
        group_id: str | None = None,
        progress: Callable[[dict[str, Any]], None] | None = None,
    ) -> None:
        self.task_id = task_id
        self.task_name = task_name
        self.attempt = attempt
        self.max_retries = max_retries
        self.headers = dict(headers or {})
        self.queue = queue
        self.root_id = root_id
        self.parent_id = parent_id
        self.group_id = group_id
        self._progress = progress

    @property
    def retries(self) -> int:
        return self.attempt

    def retry(
        self,
        countdown: float | None = None,
        *,
        eta: datetime | None = None,
        exc: BaseException | None = None,
        max_retries: int | None = None,
    ) -> Retry:
        """Ask for another run. Raises :class:`Retry`; ``raise ctx.retry(...)`` also reads
        well. The worker schedules the retry in the broker (never in worker memory) unless
        retries are exhausted, in which case the task fails."""
        raise Retry(countdown=countdown, eta=eta, exc=exc, max_retries=max_retries)

    def update_progress(
        self, current: float | None = None, total: float | None = None, **meta: Any
    ) -> None:
        """Record progress, readable from ``AsyncResult.progress`` in any process."""
        data: dict[str, Any] = dict(meta)
        if current is not None:
            data["current"] = current
        if total is not None:
            data["total"] = total
        if self._progress is not None:
            self._progress(data)


def _eta_seconds(value: datetime | float | timedelta | None) -> float | None:
    if value is None:
        return None
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, datetime):
        raise TypeError("use eta= for datetimes")
    return float(value)


class Task(Generic[P, R]):
    """A registered task. Calling it runs the function here and now; ``delay``/``enqueue``
    send it to a worker."""

    def __init__(self, app: Stem, fn: Callable[..., R], options: TaskOptions) -> None:
        self.app = app
        self.fn = fn
        self.options = options
        self.name = options.name
        self.is_async = inspect.iscoroutinefunction(fn)
        self.__doc__ = fn.__doc__
        self.__name__ = getattr(fn, "__name__", options.name)
        self.__wrapped__ = fn

    def __repr__(self) -> str:
        return f"<Task {self.name}>"

    def arguments(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
        """The call's arguments by parameter name (defaults included; ``**kwargs`` spread
        out), as the function would see them; just ``kwargs`` if they do not bind."""
        named = self.bound_arguments(args, kwargs)
        return dict(kwargs) if named is None else named

    def bound_arguments(
        self, args: Sequence[Any], kwargs: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """:meth:`arguments`, or None if they do not bind to the function's parameters."""
        try:
            params = list(inspect.signature(self.fn).parameters.values())
        except (TypeError, ValueError):
            return None
        sig = inspect.Signature(params[1:] if self.options.bind else params)  # ctx first
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError:
            return None
        bound.apply_defaults()
        named = dict(bound.arguments)
        for p in sig.parameters.values():
            if p.kind is inspect.Parameter.VAR_KEYWORD:
                named.update(named.pop(p.name, {}))
        return named

    def __call__(self, *args: P.args, **kwargs: P.kwargs) -> R:
        if self.options.bind:
            ctx = TaskContext(
                task_id="local",
                task_name=self.name,
                attempt=0,
                max_retries=self.options.max_retries,
            )
            return self.fn(ctx, *args, **kwargs)
        return self.fn(*args, **kwargs)

    def delay(self, *args: P.args, **kwargs: P.kwargs) -> AsyncResult:
        """Enqueue with default options."""
        return self.enqueue(args=args, kwargs=kwargs)

    def enqueue(
        self,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        countdown: float | timedelta | None = None,
        eta: datetime | None = None,
        expires: float | timedelta | datetime | None = None,
        priority: int | None = None,
        queue: str | None = None,
        task_id: str | None = None,
        ignore_result: bool | None = None,
        headers: Mapping[str, Any] | None = None,
    ) -> AsyncResult:
        """Enqueue with explicit options. ``countdown`` seconds or ``eta`` delay the task
        (kept in the broker); ``expires`` (seconds from now or a datetime) makes a task that
        has not started by then be recorded as EXPIRED instead of running."""
        return self.app.send_task(
            self.name,
            args=args,
            kwargs=kwargs,
            countdown=_eta_seconds(countdown),
            eta=eta,
            expires=expires,
            priority=priority,
            queue=queue,
            task_id=task_id,
            ignore_result=ignore_result,
            headers=headers,
        )

    apply_async = enqueue

    def s(self, *args: Any, **kwargs: Any) -> Signature:
        """A signature: this task with (partial) arguments, for canvas compositions."""
        from stem.canvas import Signature

        return Signature(self.name, tuple(args), dict(kwargs), app=self.app)

    def si(self, *args: Any, **kwargs: Any) -> Signature:
        """An immutable signature: ignores the result of the previous step in a chain."""
        from stem.canvas import Signature

        return Signature(self.name, tuple(args), dict(kwargs), immutable=True, app=self.app)
