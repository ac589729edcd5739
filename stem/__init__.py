"""Stem: a security-hardened background task queue for Python."""

from __future__ import annotations

from stem.app import Stem
from stem.canvas import Chain, Chord, Group, Signature, chain, chord, group
from stem.errors import (
    ConfigError,
    DecodeError,
    ResultTimeout,
    SignatureError,
    SoftTimeLimitExceeded,
    StemError,
    TaskError,
    TaskNotRegistered,
)
from stem.result import AsyncResult, GroupResult
from stem.retry import Retry
from stem.task import Task, TaskContext

__version__ = "0.1.0"

__all__ = [
    "AsyncResult",
    "Chain",
    "Chord",
    "ConfigError",
    "DecodeError",
    "Group",
    "GroupResult",
    "ResultTimeout",
    "Retry",
    "Signature",
    "SignatureError",
    "SoftTimeLimitExceeded",
    "Stem",
    "StemError",
    "Task",
    "TaskContext",
    "TaskError",
    "TaskNotRegistered",
    "__version__",
    "chain",
    "chord",
    "group",
]
