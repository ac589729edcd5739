"""The result backend contract.

A backend stores one opaque record (encoded JSON) per task id together with its state, so it
can wake waiters when a task reaches a ready state (see :data:`stem.states.READY_STATES`)
without polling where the store can notify. Records expire after their ``ttl_s`` (None or
a non-positive ttl keeps them). Counters
and unique-member sets back group and chord completion: ``add_member`` is idempotent, so a
member redelivered after a worker kill is counted once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable


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
