"""Structured JSON logs: one object per line with an ``event`` key, secrets redacted."""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

from stem.observability.redact import redact_mapping, redact_text

_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}


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
    root.setLevel(level.upper())
    root.propagate = False
