"""SQLite result backend: ``sqlite:///path.db`` (may be the broker's file).

Tables ``stem_results`` and ``stem_members`` (schema in ``sqlite.sql``). ``wait`` wakes at once
for results stored by this process and polls for results stored by other processes (SQLite
cannot notify across processes): often at first, less often the longer it waits. Expired
records are invisible to reads at once and deleted by :meth:`SQLiteBackend.cleanup`.

Records written by several threads at once share a transaction (group commit): a commit
costs several times an insert, and a busy worker's pool threads store results together.
Each ``store`` still returns only once its record is committed.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Sequence
from typing import Any

from stem.brokers.sqlite import SQLiteDatabase, Wake, load_queries, poll_interval, sqlite_path
from stem.envelope import now_ms
from stem.errors import BackendConnectionError, BackendError, StemError
from stem.security.tls import TLSSettings
from stem.states import READY_STATES

__all__ = ["SQLiteBackend"]

SCHEMA_VERSION = 1

_Q = load_queries("stem.backends", "sqlite.sql")


def _expiry_ms(ttl_s: float | None) -> int | None:
    """Epoch-ms expiry; ``None`` or a non-positive ttl keeps the record forever."""
    return None if ttl_s is None or ttl_s <= 0 else now_ms() + int(ttl_s * 1000)


class _Write:
    """A record waiting to be committed, and how that went (set before ``done``)."""

    __slots__ = ("done", "error", "row")

    def __init__(self, row: tuple[Any, ...]) -> None:
        self.row = row
        self.done = False
        self.error: tuple[type[StemError], str] | None = None


class SQLiteBackend:
    """The SQLite result backend (see module docstring). ``tls`` is accepted and ignored."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._db = SQLiteDatabase(
            self.path,
            _Q["schema"],
            _Q["schema_version"],
            "backend",
            SCHEMA_VERSION,
            BackendError,
            BackendConnectionError,
        )
        self._wake = Wake.for_path(self.path, "results")
        self._pending: list[_Write] = []
        self._pending_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"<SQLiteBackend {self.path}>"

    def store(self, task_id: str, state: str, body: bytes, ttl_s: float | None) -> None:
        mine = _Write((task_id, state, body, _expiry_ms(ttl_s)))
        with self._pending_lock:
            self._pending.append(mine)
        try:
            with self._db.session(None) as conn:
                # Whoever gets the connection first commits every record waiting by then;
                # the others find theirs done (or failed) when their turn comes.
                if not mine.done:
                    self._commit_pending(conn)
        except BaseException:
            # The connection failed before this record's turn: it must not go in later,
            # behind whatever the caller does about the error.
            with self._pending_lock:
                if mine in self._pending:
                    self._pending.remove(mine)
            raise
        if mine.error is not None:
            kind, message = mine.error
            raise kind(message)
        if state in READY_STATES:
            self._wake.notify()

    def _commit_pending(self, conn: sqlite3.Connection) -> None:
        """Commit the waiting records in one transaction; every one of them is marked done,
        with the error if it failed, before the connection is let go."""
        with self._pending_lock:
            batch, self._pending = self._pending, []
        error: tuple[type[StemError], str] | None = None
        try:
            if len(batch) == 1:
                conn.execute(_Q["store"], batch[0].row)
            else:
                conn.execute("BEGIN IMMEDIATE")
                conn.executemany(_Q["store"], [w.row for w in batch])
                conn.execute("COMMIT")
        except sqlite3.Error as exc:
            translated = self._db.translate(exc)
            error = (type(translated), str(translated))
            try:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
            except sqlite3.Error:
                pass  # the connection is unusable: the next session reports it
        except BaseException:
            error = (BackendError, "the result write was interrupted")
            raise
        finally:
            for w in batch:
                w.error = error
                w.done = True

    def _get(self, task_id: str) -> tuple[str, bytes] | None:
        with self._db.session(None) as conn:
            row: tuple[str, bytes] | None = conn.execute(
                _Q["fetch"], (task_id, now_ms())
            ).fetchone()
        return row

    def fetch(self, task_id: str) -> bytes | None:
        row = self._get(task_id)
        return None if row is None else row[1]

    def fetch_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []
        with self._db.session(None) as conn:
            rows = conn.execute(_Q["fetch_many"], (json.dumps(list(task_ids)), now_ms()))
            found: dict[str, bytes] = dict(rows.fetchall())
        return [found.get(t) for t in task_ids]

    def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        started = time.monotonic()
        deadline = started + max(0.0, timeout_s)
        while True:
            seen = self._wake.generation
            row = self._get(task_id)
            now = time.monotonic()
            remaining = deadline - now
            if (row is not None and row[0] in READY_STATES) or remaining <= 0:
                return None if row is None else row[1]
            self._wake.wait(seen, min(poll_interval(now - started), remaining))

    def add_member(self, key: str, member: str, ttl_s: float | None) -> int:
        with self._db.session("BEGIN IMMEDIATE") as conn:
            now = now_ms()
            if conn.execute(_Q["set_expired"], (key, now)).fetchone():
                conn.execute(_Q["drop_set"], (key,))
            conn.execute(_Q["add_member"], (key, member))
            params = {"key": key, "expires_ms": _expiry_ms(ttl_s), "now": now}
            conn.execute(_Q["touch_set"], params)
            size: int = conn.execute(_Q["count_members"], (key,)).fetchone()[0]
        return size

    def delete(self, task_id: str) -> None:
        with self._db.session(None) as conn:
            conn.execute(_Q["delete"], (task_id,))

    def cleanup(self) -> int:
        with self._db.session("BEGIN IMMEDIATE") as conn:
            now = now_ms()
            gone: int = conn.execute(_Q["cleanup_results"], (now,)).rowcount
            conn.execute(_Q["cleanup_members"], (now,))
            gone += conn.execute(_Q["cleanup_sets"], (now,)).rowcount
        return gone

    def ping(self) -> None:
        with self._db.session(None) as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._db.close()
