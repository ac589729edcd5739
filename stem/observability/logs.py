"""Structured JSON logs: one object per line with an ``event`` key, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from stem.observability.redact import redact_mapping, redact_text

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
            if key not in _STANDARD and key != "event":
                data[key] = value
        if record.exc_info:
            data["exc"] = redact_text(self.formatException(record.exc_info))
        return json.dumps(redact_mapping(data), default=str, sort_keys=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact_text(super().format(record))


def setup_logging(level: str = "info", fmt: str = "text") -> None:
    """Configure the ``stem`` logger hierarchy (idempotent)."""
    root = logging.getLogger("stem")
    for handler in list(root.handlers):
        if getattr(handler, "_stem", False):
            root.removeHandler(handler)
    handler = logging.StreamHandler(sys.stderr)
    handler._stem = True  # type: ignore[attr-defined]
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root.addHandler(handler)
    # An unknown level is the settings' to report (logging.level, exit 78), as an unknown
    # format is: until they do, log at info rather than fail with a traceback.
    known = logging.getLevelNamesMapping()
    root.setLevel(known.get(level.upper(), logging.INFO))
    root.propagate = False
