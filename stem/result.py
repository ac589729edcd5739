"""Result records and the handles producers use to read them.

A record is canonical JSON. Errors are stored as data (type name, message, traceback text);
exception classes are never re-imported from a record.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from stem import states
from stem.envelope import dumps, loads, now_ms
from stem.errors import ConfigError, DecodeError, ResultTimeout, TaskError

MAX_MESSAGE = 64 * 1024  # characters of an error message kept in a result record

if TYPE_CHECKING:
    from stem.app import Stem


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, tb: str | None = None) -> ErrorInfo:
        """Never raises: an exception whose ``str()`` fails is recorded as unprintable (a
        failure while recording a failure would leave the task unsettled), and a huge
        message is cut to ``MAX_MESSAGE`` characters, and characters UTF-8 cannot hold (the
        lone surrogates of an undecodable file name) are escaped. Passwords in URLs are
        redacted from the message and traceback, as from log lines: results are read by
        more people."""
        from stem.observability.redact import redact_text

        try:
            message = str(exc)
        except Exception:
            message = f"<unprintable {type(exc).__name__} object>"
        if len(message) > MAX_MESSAGE:
            message = f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"
        return cls(
            _utf8(type(exc).__name__),
            redact_text(_utf8(message)),
            None if tb is None else redact_text(_utf8(tb)),
        )


def _utf8(text: str) -> str:
    """``text`` with what UTF-8 cannot encode (lone surrogates) written as escapes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


@dataclass(frozen=True, slots=True)
class ResultRecord:
    task_id: str
    state: str
    task: str = ""
    result: Any = None
    error: ErrorInfo | None = None
    progress: Mapping[str, Any] | None = None
    attempt: int = 0
    updated_ms: int = field(default_factory=now_ms)
    worker: str | None = None
    group_id: str | None = None

    def encode(self) -> bytes:
        """Canonical JSON of the fields that are set. Built by hand: ``dataclasses.asdict``
        deep-copies the result, which costs more than encoding it."""
        d: dict[str, Any] = {
            "task_id": self.task_id,
            "state": self.state,
            "task": self.task,
            "attempt": self.attempt,
            "updated_ms": self.updated_ms,
        }
        for name in ("result", "progress", "worker", "group_id"):
            value = getattr(self, name)
            if value is not None:
                d[name] = value
        if self.error is not None:
            e = self.error
            d["error"] = {"type": e.type, "message": e.message, "traceback": e.traceback}
        return dumps(d)

    @classmethod
    def decode(cls, data: bytes) -> ResultRecord:
        raw = loads(data)
        if not isinstance(raw, dict) or "task_id" not in raw or "state" not in raw:
            raise DecodeError("result record must be an object with task_id and state")
        if not isinstance(raw["state"], str) or raw["state"] not in states.ALL_STATES:
            raise DecodeError(f"result record has unknown state {raw['state']!r}")
        err = raw.get("error")
        try:
            error = ErrorInfo(**err) if isinstance(err, dict) else None
            return cls(**{**raw, "error": error})
        except TypeError as exc:
            raise DecodeError(f"malformed result record: {exc}") from None

    def as_error(self) -> TaskError:
        err = self.error or ErrorInfo(self.state, f"task ended in state {self.state}")
        return TaskError(err.type, err.message, err.traceback, task_id=self.task_id)


@dataclass(frozen=True, slots=True)
class RejectedRecord(ResultRecord):
    """What a stored record that could not be read or trusted is read as: a FAILURE
    saying why. A class of its own, so nothing a task raises, nor anything stored, can
    pass for one (``ResultRecord.decode`` never makes it)."""


class AsyncResult:
    """A handle on one task's result, usable from any process that can reach the backend."""

    def __init__(self, task_id: str, app: Stem) -> None:
        self.id = task_id
        self.app = app

    def __repr__(self) -> str:
        return f"<AsyncResult {self.id}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AsyncResult) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)

    def _record(self) -> ResultRecord | None:
        return self.app.result_store.read(self.id)

    @property
    def record(self) -> ResultRecord | None:
        return self._record()

    @property
    def state(self) -> str:
        rec = self._record()
        return rec.state if rec else states.PENDING

    @property
    def result(self) -> Any:
        """The return value on success, a :class:`TaskError` on failure, else None."""
        rec = self._record()
        if rec is None:
            return None
        if rec.state in states.EXCEPTION_STATES:
            return rec.as_error()
        return rec.result

    @property
    def progress(self) -> Mapping[str, Any] | None:
        rec = self._record()
        return rec.progress if rec else None

    def ready(self) -> bool:
        return self.state in states.READY_STATES

    def successful(self) -> bool:
        return self.state == states.SUCCESS

    def failed(self) -> bool:
        return self.state in states.EXCEPTION_STATES

    def wait_record(self, timeout: float | None = None) -> ResultRecord:
        timeout = _checked_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.05
        while True:
            remaining = 3600.0 if deadline is None else deadline - time.monotonic()
            asked = time.monotonic()
            rec = self.app.result_store.wait(self.id, max(0.0, remaining))
            if rec is not None and rec.state in states.READY_STATES:
                return rec
            if deadline is not None and time.monotonic() >= deadline:
                state = rec.state if rec else states.PENDING
                raise ResultTimeout(f"task {self.id} not ready after {timeout}s (state {state})")
            if time.monotonic() - asked < pause:
                # The store answered at once without a ready record (its index and the
                # record disagree, say): do not spin on it.
                time.sleep(pause)
                pause = min(pause * 2, 1.0)

    def get(self, timeout: float | None = None, propagate: bool = True) -> Any:
        """Wait for the task to finish and return its value.

        Raises :class:`~stem.errors.ResultTimeout` after ``timeout`` seconds, and
        :class:`~stem.errors.TaskError` if the task failed (unless ``propagate=False``,
        which returns the error instead).
        """
        rec = self.wait_record(timeout)
        if rec.state == states.SUCCESS:
            return rec.result
        error = rec.as_error()
        if propagate:
            raise error
        return error

    def forget(self) -> None:
        self.app.result_store.delete(self.id)


class GroupResult:
    """Results of a group, in the order the members were given."""

    def __init__(self, group_id: str, results: list[AsyncResult], app: Stem) -> None:
        self.id = group_id
        self.results = results
        self.app = app

    def __repr__(self) -> str:
        return f"<GroupResult {self.id} ({len(self.results)} members)>"

    def __len__(self) -> int:
        return len(self.results)

    def __iter__(self):  # type: ignore[no-untyped-def]
        return iter(self.results)

    def ready(self) -> bool:
        return all(r.ready() for r in self.results)

    def completed_count(self) -> int:
        return sum(1 for r in self.results if r.successful())

    def get(self, timeout: float | None = None, propagate: bool = True) -> list[Any]:
        timeout = _checked_timeout(timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        values = []
        for res in self.results:
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            values.append(res.get(timeout=remaining, propagate=propagate))
        return values


def _checked_timeout(timeout: float | None) -> float | None:
    """A result timeout: NaN is refused (no time is ever past it), infinity waits for good."""
    if timeout is not None and math.isnan(timeout):
        raise ConfigError("a result timeout must be a number of seconds, got nan")
    return None if timeout == math.inf else timeout
