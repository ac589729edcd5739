"""The PostgreSQL result backend.

One row per task id in ``stem_results`` (state, opaque body, expiry in server milliseconds);
storing a ready state notifies the ``stem_results`` channel with the task id in the same
statement, so :meth:`PostgresBackend.wait` sleeps on LISTEN and re-checks at least every
``poll_interval_s`` (URL option, see :mod:`stem.pg.conninfo`). Unique-member sets keep their
size in ``stem_sets`` so adding a member is O(1). Statements live in
``stem/pg/sql/backend.sql``; the schema comes from the shared migrations.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from stem.backends.base import WaitRetry, ttl_ms
from stem.errors import BackendConnectionError, BackendError
from stem.pg import conninfo, queries
from stem.pg.client import Conn, PgClient
from stem.pg.notify import Notifier
from stem.security.tls import TLSSettings
from stem.states import READY_STATES

CHANNEL = "stem_results"
_Q = queries.load("backend")


class PostgresBackend:
    """A :class:`~stem.backends.base.ResultBackend` on PostgreSQL."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self.options = conninfo.parse(url, tls)
        self._client = PgClient(
            self.options, error=BackendError, conn_error=BackendConnectionError, role="backend"
        )
        self._notifier = Notifier(self._client.new_connection, CHANNEL, enabled=self.options.listen)

    def store(self, task_id: str, state: str, body: bytes, ttl_s: float | None) -> None:
        params = {
            "task_id": task_id,
            "state": state,
            "body": bytes(body),
            "ttl_ms": ttl_ms(ttl_s),
            "ready": state in READY_STATES,
            "channel": CHANNEL,
        }
        self._client.run("storing a result", lambda c: c.execute(_Q["store"], params))

    def _fetch(self, task_id: str) -> tuple[str, bytes] | None:
        row = self._client.run(
            "reading a result",
            lambda c: c.execute(_Q["fetch"], {"task_id": task_id}).fetchone(),
        )
        return None if row is None else (str(row[0]), bytes(row[1]))

    def fetch(self, task_id: str) -> bytes | None:
        record = self._fetch(task_id)
        return None if record is None else record[1]

    def fetch_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        ids = list(task_ids)
        rows = self._client.run(
            "reading results",
            lambda c: c.execute(_Q["fetch_many"], {"task_ids": ids}).fetchall(),
        )
        found = {str(r[0]): bytes(r[1]) for r in rows}
        return [found.get(t) for t in ids]

    def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        deadline = time.monotonic() + max(0.0, timeout_s)
        since = self._notifier.mark()
        retry = WaitRetry(deadline, f"waiting for the result of {task_id}")
        while True:
            try:
                record = self._fetch(task_id)
            except BackendConnectionError as exc:
                # The server restarting (or out of reach): try again, for a while, as the
                # Redis store does.
                if not retry.pause(exc):
                    raise
                continue
            retry.answered()
            if record is not None and record[0] in READY_STATES:
                return record[1]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None if record is None else record[1]
            self._notifier.wait((task_id,), since, min(remaining, self.options.poll_interval_s))
            since = self._notifier.mark()

    def add_member(self, key: str, member: str, ttl_s: float | None) -> int:
        params = {"key": key, "member": member, "ttl_ms": ttl_ms(ttl_s)}

        def add(c: Conn) -> int:
            with c.transaction():
                c.execute(_Q["drop_expired_set"], params)
                added = c.execute(_Q["add_member"], params).rowcount
                row = c.execute(_Q["bump_set"], {**params, "added": added}).fetchone()
            return 0 if row is None else int(row[0])

        return self._client.run("adding a set member", add)

    def delete(self, task_id: str) -> None:
        self._client.run(
            "deleting a result", lambda c: c.execute(_Q["delete"], {"task_id": task_id})
        )

    def cleanup(self) -> int:
        def sweep(c: Conn) -> int:
            results = c.execute(_Q["cleanup_results"]).rowcount
            row = c.execute(_Q["cleanup_sets"]).fetchone()
            return results + (0 if row is None else int(row[0]))

        return self._client.run("deleting expired results", sweep)

    def ping(self) -> None:
        self._client.ping()

    def close(self) -> None:
        self._notifier.close()
        self._client.close()

    def __repr__(self) -> str:
        return f"PostgresBackend({self.options.target!r})"
