"""Structured JSON logs: one object per line with an ``event`` key, secrets redacted.

A Stem command (``stem worker``, ``stem beat``, ...) sets up its process's logging: Stem's
loggers get a handler of the chosen format and level, and so does the root logger unless the
app configured root handlers itself, so task code's own loggers (and libraries') come out
like Stem's, redacted. A record logged while a task runs names it (``task``, ``task_id``).
Library use of Stem (an app in your process) configures nothing.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from stem.observability.redact import redact_mapping, redact_text
from stem.task import RUNNING

if TYPE_CHECKING:
    from stem.envelope import Envelope

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


def task_log_fields(
    env: Envelope, *, worker: str | None = None, log_args: bool = False
) -> dict[str, Any]:
    """The standard ``extra`` of a log line about one task: ``task``, ``task_id``,
    ``attempt``, ``queue`` and ``worker``. Argument values are left out (they may hold
    personal data or secrets) unless the task opted in with ``log_args=True``; even then,
    values under secret-looking keyword names are redacted. ``task_args``/``task_kwargs``,
    since ``args`` is taken by :class:`logging.LogRecord`."""
    fields: dict[str, Any] = {
        "task": env.task,
        "task_id": env.id,
        "attempt": env.attempt,
        "queue": env.queue,
    }
    if worker is not None:
        fields["worker"] = worker
    if log_args:
        fields["task_args"] = redact_mapping(list(env.args))
        fields["task_kwargs"] = redact_mapping(dict(env.kwargs))
    return fields


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        data: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": redact_text(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key != "event" and not key.startswith("_"):
                data[key] = value
        if record.exc_info:
            data["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(redact_mapping(data), default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        if getattr(record, "_stem_in_task", False):
            # Task code's own line: say which task (Stem's lines name it themselves).
            head, sep, rest = line.partition(": ")
            line = f"{head}{sep}{record.task}[{record.task_id}] {rest}"  # type: ignore[attr-defined]
        return line

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


class TaskContext(logging.Filter):
    """Adds ``task`` and ``task_id`` to a record logged while a task runs, unless it
    names a task already (Stem's own lines do)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "task_id"):
            env = RUNNING.get()
            if env is not None:
                record.task, record.task_id = env.task, env.id
                record._stem_in_task = True
        return True


_setup: dict[str, str] | None = None


def current_setup() -> dict[str, str] | None:
    """The arguments of the last :func:`setup_logging` in this process (for a pool
    process to log alike), or None if Stem did not configure logging here."""
    return None if _setup is None else dict(_setup)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes (a test runner may have
    swapped and closed the one there was when logging was set up)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _handler(fmt: str) -> logging.Handler:
    handler = _StderrHandler()
    handler._stem = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TaskContext())
    return handler


def setup_logging(level: str = "info", fmt: str = "text", *, root_too: bool = True) -> None:
    """Configure this process's logging for a Stem command (idempotent; see the module
    docstring). Stem's loggers get their own handler and do not propagate, so they are
    written once, redacted, whatever else is configured. Other loggers (task code's,
    libraries') go through a handler of the same format on the root logger, unless the
    app configured root handlers of its own: then those are left to do it. Before the
    app is imported, pass ``root_too=False``: its own ``logging.basicConfig()`` must find
    the root logger bare."""
    global _setup
    root, ours = logging.getLogger(), logging.getLogger("stem")
    for logger in (root, ours) if root_too else (ours,):
        for handler in list(logger.handlers):
            if getattr(handler, "_stem", False):
                logger.removeHandler(handler)
    # An unknown level is the settings' to report (logging.level, exit 78), as an unknown
    # format is: until they do, log at info rather than fail with a traceback.
    known = logging.getLevelNamesMapping()
    number = known.get(level.upper(), logging.INFO)
    ours.addHandler(_handler(fmt))
    ours.setLevel(number)
    ours.propagate = False
    if root_too and not root.handlers:
        root.addHandler(_handler(fmt))
        root.setLevel(number)
    _setup = {"level": level, "fmt": fmt}
