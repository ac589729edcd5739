"""The result backend contract.

A backend stores one opaque record (encoded JSON) per task id together with its state, so it
can wake waiters when a task reaches a ready state (see :data:`stem.states.READY_STATES`)
without polling where the store can notify. Records expire after their ``ttl_s`` (None or
a non-positive ttl keeps them). Counters
and unique-member sets back group and chord completion: ``add_member`` is idempotent, so a
member redelivered after a worker kill is counted once.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

log = logging.getLogger("stem.backends")

#: How long a wait for a result rides out a store that does not answer (a restart, a
#: failover) before it raises, however long the caller was willing to wait for the task.
WAIT_OUTAGE_S = 60.0


def ttl_ms(ttl_s: float | None) -> int | None:
    """A record's ttl in whole milliseconds (at least 1), or None: kept for good (None or
    a non-positive ttl, on every backend)."""
    return None if ttl_s is None or ttl_s <= 0 else max(1, round(ttl_s * 1000))


@runtime_checkable
class ResultBackend(Protocol):
    url: str

    def store(self, task_id: str, state: str, body: bytes, ttl_s: float | None) -> None:
        """Write the record for ``task_id`` (replacing any earlier one)."""

    def fetch(self, task_id: str) -> bytes | None:
        """The stored record, or None if there is none (or it expired)."""

    def fetch_many(self, task_ids: Sequence[str]) -> list[bytes | None]: ...

    def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        """Block until the task's record is in a ready state and return it; after
        ``timeout_s`` return whatever is stored (possibly None)."""

    def add_member(self, key: str, member: str, ttl_s: float | None) -> int:
        """Add ``member`` to the set ``key`` (idempotently); return the set's size."""

    def delete(self, task_id: str) -> None: ...

    def cleanup(self) -> int:
        """Delete expired records now; return how many went."""

    def ping(self) -> None:
        """Raise :class:`~stem.errors.BackendConnectionError` unless the store answers."""

    def close(self) -> None: ...


class WaitRetry:
    """How a backend's ``wait`` rides out a store that stops answering: tries again after
    50 ms, doubling up to 1 s, says so once in the log, and gives up at the caller's
    deadline or after :data:`WAIT_OUTAGE_S` without an answer (a wrong URL or a dead store
    is then an error, not a silent wait of an hour for ``get()`` without a timeout)."""

    def __init__(self, deadline: float, what: str) -> None:
        self.deadline = deadline
        self.what = what
        self._backoff_s = 0.05
        self._down_since: float | None = None

    def answered(self) -> None:
        self._backoff_s = 0.05
        self._down_since = None

    def pause(self, error: BaseException) -> bool:
        """After a connection error: sleep before the next try (True), or False when the
        caller should raise it."""
        now = time.monotonic()
        if self._down_since is None:
            self._down_since = now
            log.warning(
                "result store did not answer while %s; trying again for up to %gs: %s",
                self.what,
                WAIT_OUTAGE_S,
                error,
                extra={"event": "result-wait-retrying"},
            )
        remaining = min(self.deadline, self._down_since + WAIT_OUTAGE_S) - now
        if remaining <= 0:
            return False
        time.sleep(min(self._backoff_s, remaining))
        self._backoff_s = min(self._backoff_s * 2, 1.0)
        return True
