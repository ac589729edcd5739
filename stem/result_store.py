"""Reads and writes result records through the configured backend.

The one place records are encoded, decoded and (when a keyring is configured) signed, so
the worker, producers and the CLI agree on the format.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from stem.backends.base import ResultBackend
from stem.errors import DecodeError, SignatureError
from stem.result import ErrorInfo, RejectedRecord, ResultRecord
from stem.security.signing import is_sealed


def rejected(record: ResultRecord) -> bool:
    """Whether ``record`` stands for a stored record that could not be trusted or read
    (not for anything the task did)."""
    return isinstance(record, RejectedRecord)


log = logging.getLogger("stem.results")

Wrap = Callable[[bytes], bytes]


class ResultStore:
    def __init__(
        self,
        backend: ResultBackend,
        *,
        ttl_s: float | None = 86400.0,
        seal: Wrap | None = None,
        unseal: Wrap | None = None,
        unseal_signed: Wrap | None = None,
    ) -> None:
        self.backend = backend
        self.ttl_s = ttl_s
        self._seal = seal
        self._unseal = unseal
        self._unseal_signed = unseal_signed or unseal

    def write(self, record: ResultRecord) -> None:
        body = record.encode()
        if self._seal is not None:
            body = self._seal(body)
        self.backend.store(record.task_id, record.state, body, self.ttl_s)

    def write_state(
        self,
        task_id: str,
        state: str,
        *,
        task: str = "",
        result: Any = None,
        error: ErrorInfo | None = None,
        progress: Mapping[str, Any] | None = None,
        attempt: int = 0,
        worker: str | None = None,
        group_id: str | None = None,
    ) -> None:
        self.write(
            ResultRecord(
                task_id=task_id,
                state=state,
                task=task,
                result=result,
                error=error,
                progress=progress,
                attempt=attempt,
                worker=worker,
                group_id=group_id,
            )
        )

    def _decode(
        self, task_id: str, body: bytes | None, *, signed: bool = False
    ) -> ResultRecord | None:
        if body is None:
            return None
        unseal = self._unseal_signed if signed else self._unseal
        try:
            if unseal is not None:
                body = unseal(body)
            elif is_sealed(body):
                raise DecodeError(
                    "the record is signed and this process has no signing keys to check it "
                    "(set STEM_SIGNING_KEYS, or STEM_SIGNING_PUBLIC_KEYS for Ed25519)"
                )
            record = ResultRecord.decode(body)
            if record.task_id != task_id:
                # A valid record copied under another task's key must not pass as its result.
                raise DecodeError(f"record is for task {record.task_id!r}, not {task_id!r}")
            return record
        except (DecodeError, SignatureError) as exc:
            # A record we cannot trust is reported as a failure, never as a value.
            log.warning(
                "result record rejected: %s",
                exc,
                extra={"event": "result-rejected", "task_id": task_id},
            )
            return RejectedRecord(
                task_id=task_id,
                state="FAILURE",
                error=ErrorInfo(type(exc).__name__, f"result record rejected: {exc}"),
            )

    def read(self, task_id: str, *, signed: bool = False) -> ResultRecord | None:
        """The record of ``task_id``. ``signed``: for what a worker acts on and signs (a
        chain step taken as done, its value passed on; a chord's results): with signing
        enforced, an unsigned record is refused there even where results may be unsigned
        (Ed25519's default), or whoever can write to the result store would choose what
        a worker signs and runs."""
        return self._decode(task_id, self.backend.fetch(task_id), signed=signed)

    def read_many(self, task_ids: list[str], *, signed: bool = False) -> list[ResultRecord | None]:
        bodies = self.backend.fetch_many(task_ids)
        return [self._decode(t, b, signed=signed) for t, b in zip(task_ids, bodies, strict=True)]

    def wait(self, task_id: str, timeout_s: float) -> ResultRecord | None:
        return self._decode(task_id, self.backend.wait(task_id, timeout_s))

    def delete(self, task_id: str) -> None:
        self.backend.delete(task_id)
