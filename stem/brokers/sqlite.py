"""SQLite broker: the embedded default for one machine.

``sqlite:///relative/path.db`` or ``sqlite:////absolute/path.db``. The file (and its parent
directory) is created on first use, with the schema in ``sqlite.sql``. Several worker
processes may share one file: the database runs in WAL mode (readers never block the one
writer) with a busy timeout, every write is one short transaction, and reserve takes the
write lock up front (``BEGIN IMMEDIATE``) so two processes can never lease the same row.

Each instance keeps one connection behind a lock: SQLite serialises writers anyway, and
one connection shares its prepared-statement cache between the worker's threads. Waiting
reserves wake at once for publishes made in this process and poll for the others: often
at first (a message is often on its way: the next of a caller waiting on each result), less
often the longer the wait (:func:`poll_interval`), which for a worker reserving again and
again runs across its calls: after ``POLL_IDLE_AFTER_S`` with nothing, it looks every
``POLL_IDLE_S`` (so a message from another process may wait that long).

The helpers at the bottom (URL parsing, the guarded connection, named queries, wake-ups)
are shared with :mod:`stem.backends.sqlite`, which may use the same file.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Generic, TypeVar
from urllib.parse import unquote, urlsplit

from stem.brokers.base import (
    Claim,
    DeadLetter,
    Delivery,
    Message,
    QueueStats,
    list_limit,
    row_id,
)
from stem.envelope import now_ms
from stem.errors import BrokerConnectionError, BrokerError, ConfigError, StemError
from stem.security.tls import TLSSettings

__all__ = [
    "SQLiteBroker",
    "SQLiteDatabase",
    "Wake",
    "load_queries",
    "poll_interval",
    "sqlite_path",
]

SCHEMA_VERSION = 1
# How often a wait looks for other processes' writes: a quarter of the time waited so far,
# within these bounds (so a write is seen after at most ~25 % more than it took to come).
POLL_MIN_S = 0.001
POLL_MAX_S = 0.02
# Past this long without a message, reserves look this often (an idle worker's polls
# cost a few per cent of a core at POLL_MAX_S).
POLL_IDLE_AFTER_S = 2.0
POLL_IDLE_S = 0.1
BUSY_TIMEOUT_S = 10.0
_CLAIM_SWEEP_S = 30.0
_KNOWN_MAX = 10_000  # queue names an instance remembers having recorded


class SQLiteBroker:
    """The SQLite broker (see module docstring). ``tls`` is accepted and ignored."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self.path = sqlite_path(url)
        self._db = SQLiteDatabase(
            self.path,
            _Q["schema"],
            _Q["schema_version"],
            "broker",
            SCHEMA_VERSION,
            BrokerError,
            BrokerConnectionError,
        )
        self._wake = Wake.for_path(self.path, "broker")
        # Since when reserves of these queues found nothing: a worker reserves again and
        # again, and its polls slow down over the idle time, not within each call.
        self._idle_since: dict[tuple[str, ...], float] = {}
        self._next_claim_sweep = 0.0
        self._known: set[str] = set()  # queues this instance already recorded in stem_queues

    def __repr__(self) -> str:
        return f"<SQLiteBroker {self.path}>"

    # -- messages ------------------------------------------------------------------------

    def publish(self, messages: Sequence[Message]) -> None:
        now = now_ms()
        rows = [
            (m.id, m.queue, m.priority, now if m.not_before_ms is None else m.not_before_ms, m.body)
            for m in messages
        ]
        if not rows:
            return
        new = {m.queue for m in messages} - self._known
        with self._db.session("BEGIN IMMEDIATE" if len(rows) > 1 or new else None) as conn:
            conn.executemany(_Q["publish"], rows)
            if new:
                conn.executemany(_Q["known_queue"], [(q,) for q in new])
        if len(self._known) > _KNOWN_MAX:  # one-off queues (control replies) pass by
            self._known.clear()
        self._known |= new
        self._wake.notify()

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        if max_n <= 0 or not queues:
            return []
        names = list(dict.fromkeys(queues))
        key = tuple(names)
        started = time.monotonic()
        deadline = started + max(0.0, wait_s)
        look = True
        while True:
            seen = self._wake.generation
            if look:
                got = self._reserve_once(names, max_n, lease_s)
                if got:
                    self._idle_since.pop(key, None)
                    return got
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                return []
            if len(self._idle_since) > _KNOWN_MAX:  # one-off queues (control replies)
                self._idle_since.clear()
            idle = now - self._idle_since.setdefault(key, started)
            self._wake.wait(seen, min(poll_interval(idle, idle=True), remaining))
            # A read is enough to learn whether taking the write lock is worth it.
            look = self._wake.generation != seen or self._any_visible(names)

    def _any_visible(self, names: list[str]) -> bool:
        with self._db.session(None) as conn:
            now = now_ms()
            return any(conn.execute(_Q["any_visible"], (q, now)).fetchone() for q in names)

    def _reserve_once(self, names: list[str], max_n: int, lease_s: float) -> list[Delivery]:
        with self._db.session("BEGIN IMMEDIATE") as conn:
            now = now_ms()
            rows: list[tuple[int, bytes, str, bytes, int, int, int]] = []
            for q in names:
                rows.extend(conn.execute(_Q["candidates"], (q, now, max_n)))
            if not rows:
                return []
            if len(names) > 1:
                rows.sort(key=lambda r: (-r[5], r[6], r[0]))
                del rows[max_n:]
            token = secrets.token_hex(8)
            expires = now + int(lease_s * 1000)
            conn.executemany(_Q["lease"], [(token, expires, r[0]) for r in rows])
        return [
            Delivery(f"{r[0]}:{token}", _text(r[1]), r[2], r[3], r[4] + 1, expires) for r in rows
        ]

    def ack(self, deliveries: Sequence[Delivery], claims: Sequence[Claim] = ()) -> int:
        keys = [k for k in map(_receipt, deliveries) if k is not None]
        if not keys and not claims:
            return 0
        one_statement = len(keys) <= 1 and not claims
        with self._db.session(None if one_statement else "BEGIN IMMEDIATE") as conn:
            if claims:
                self._claim_in(conn, claims)
            return conn.executemany(_Q["ack"], keys).rowcount if keys else 0

    def nack(self, delivery: Delivery, *, delay_s: float = 0.0, body: bytes | None = None) -> bool:
        key = _receipt(delivery)
        if key is None:
            return False
        params = {
            "visible_ms": now_ms() + max(0, int(delay_s * 1000)),
            "body": body,
            "id": key[0],
            "token": key[1],
        }
        with self._db.session(None) as conn:
            held = conn.execute(_Q["nack"], params).rowcount == 1
        if held:
            self._wake.notify()
        return held

    def extend(self, deliveries: Sequence[Delivery], lease_s: float) -> list[bool]:
        keys = [_receipt(d) for d in deliveries]
        if not any(keys):
            return [False] * len(keys)
        with self._db.session("BEGIN IMMEDIATE") as conn:
            expires = now_ms() + int(lease_s * 1000)
            return [
                k is not None and conn.execute(_Q["extend"], (expires, *k)).rowcount == 1
                for k in keys
            ]

    # -- dead letters --------------------------------------------------------------------

    def dead_letter(self, delivery: Delivery, reason: str, detail: str = "") -> bool:
        key = _receipt(delivery)
        if key is None:
            return False
        with self._db.session("BEGIN IMMEDIATE") as conn:
            row = conn.execute(_Q["take_for_dead_letter"], key).fetchone()
            if row is None:
                return False
            message_id, queue, priority, body, count = row
            conn.execute(
                _Q["insert_dead_letter"],
                (_text(message_id), queue, priority, body, reason, detail, now_ms(), count),
            )
        return True

    def dlq_list(self, queue: str | None = None, limit: int = 100) -> list[DeadLetter]:
        with self._db.session(None) as conn:
            params = {"queue": queue, "limit": list_limit(limit)}
            rows = conn.execute(_Q["dlq_list"], params)
            return [_dead(r) for r in rows]

    def dlq_get(self, dead_id: str) -> DeadLetter | None:
        row_number = row_id(dead_id)
        if row_number is None:
            return None
        with self._db.session(None) as conn:
            row = conn.execute(_Q["dlq_get"], (row_number,)).fetchone()
        return _dead(row) if row is not None else None

    def dlq_replay(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        params = {"ids": _id_list(ids), "queue": queue, "now": now_ms()}
        with self._db.session("BEGIN IMMEDIATE") as conn:
            moved = conn.execute(_Q["dlq_replay"], params).rowcount
            conn.execute(_Q["dlq_delete"], params)
        if moved:
            self._wake.notify()
        return moved

    def dlq_purge(self, ids: Sequence[str] | None = None, queue: str | None = None) -> int:
        with self._db.session(None) as conn:
            return conn.execute(_Q["dlq_delete"], {"ids": _id_list(ids), "queue": queue}).rowcount

    # -- depths --------------------------------------------------------------------------

    def stats(self, queues: Sequence[str] | None = None) -> list[QueueStats]:
        with self._db.session("BEGIN") as conn:  # one snapshot for all the counts
            now = now_ms()
            if queues is None:
                # Queue names read as bytes: one written by something else than Stem
                # that is not UTF-8 must not fail the depths of every queue.
                rows = conn.execute(_Q["stats_all"], {"now": now})
                counts = {_text(r[0]): r[1:] for r in rows}
                dead = {_text(q): n for q, n in conn.execute(_Q["dead_all"])}
                known = {_text(r[0]) for r in conn.execute(_Q["known_queues"])}
                names = sorted(known | counts.keys() | dead.keys())
            else:
                names = list(dict.fromkeys(queues))
                counts = {
                    q: conn.execute(_Q["stats_one"], {"now": now, "queue": q}).fetchone()
                    for q in names
                }
                dead = {q: conn.execute(_Q["dead_one"], (q,)).fetchone()[0] for q in names}
        out = []
        for q in names:
            ready, delayed, reserved = counts.get(q) or (0, 0, 0)
            out.append(QueueStats(q, ready or 0, delayed or 0, reserved or 0, dead.get(q) or 0))
        return out

    def purge(self, queue: str) -> int:
        with self._db.session(None) as conn:
            return conn.execute(_Q["purge"], (queue, now_ms())).rowcount

    def drop(self, queue: str) -> int:
        with self._db.session("BEGIN IMMEDIATE") as conn:
            n = conn.execute(_Q["drop"], (queue,)).rowcount
            conn.execute(_Q["forget_queue"], (queue,))
        self._known.discard(queue)
        return n

    # -- claims --------------------------------------------------------------------------

    def claim(self, key: str, value: str, ttl_s: float) -> str:
        return self.claim_many([(key, value, ttl_s)])[0]

    def claim_many(self, items: Sequence[tuple[str, str, float]]) -> list[str]:
        if not items:
            return []
        with self._db.session("BEGIN IMMEDIATE") as conn:
            return self._claim_in(conn, items)

    def _claim_in(self, conn: sqlite3.Connection, items: Sequence[Claim]) -> list[str]:
        """claim_many inside the caller's transaction."""
        now = now_ms()
        self._maybe_sweep(conn, now)
        held: list[str] = []
        for key, value, ttl_s in items:
            params = {"key": key, "value": value, "expires_ms": now + int(ttl_s * 1000)}
            if conn.execute(_Q["claim"], {**params, "now": now}).rowcount == 1:
                held.append(value)
            else:
                held.append(str(conn.execute(_Q["peek"], (key, now)).fetchone()[0]))
        return held

    def peek_many(self, keys: Sequence[str]) -> list[str | None]:
        now = now_ms()
        with self._db.session(None) as conn:
            rows = [conn.execute(_Q["peek"], (key, now)).fetchone() for key in keys]
        return [None if row is None else str(row[0]) for row in rows]

    def release(self, key: str, value: str | None = None) -> bool:
        with self._db.session(None) as conn:
            params = {"key": key, "value": value, "now": now_ms()}
            return conn.execute(_Q["release"], params).rowcount > 0

    def peek(self, key: str) -> str | None:
        return self.peek_many([key])[0]

    def _maybe_sweep(self, conn: sqlite3.Connection, now: int) -> None:
        """Drop expired claims now and then (replay nonces come one per signed message;
        heartbeats, rate and concurrency limits write through swap)."""
        if time.monotonic() >= self._next_claim_sweep:
            self._next_claim_sweep = time.monotonic() + _CLAIM_SWEEP_S
            conn.execute(_Q["expire_claims"], (now,))

    def swap(self, key: str, expected: str | None, new: str | None, ttl_s: float | None) -> bool:
        with self._db.session("BEGIN IMMEDIATE") as conn:
            now = now_ms()
            self._maybe_sweep(conn, now)
            row = conn.execute(_Q["peek"], (key, now)).fetchone()
            if (None if row is None else row[0]) != expected:
                return False
            if new is None:
                conn.execute(_Q["delete_claim"], (key,))
            else:
                expires = None if ttl_s is None else now + int(ttl_s * 1000)
                conn.execute(_Q["set_claim"], (key, new, expires))
            return True

    def scan(self, prefix: str) -> dict[str, str]:
        params = {"lo": prefix, "hi": _prefix_end(prefix), "now": now_ms()}
        with self._db.session(None) as conn:
            return dict(conn.execute(_Q["scan"], params).fetchall())

    def ping(self) -> None:
        with self._db.session(None) as conn:
            conn.execute("SELECT 1").fetchone()

    def close(self) -> None:
        self._db.close()


def _prefix_end(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (None: unbounded)."""
    if not prefix:
        return None
    last = ord(prefix[-1]) + 1
    if last > 0x10FFFF or 0xD800 <= last <= 0xDFFF:
        return None
    return prefix[:-1] + chr(last)


def _receipt(delivery: Delivery) -> tuple[int, str] | None:
    text, _, token = delivery.receipt.partition(":")
    row = row_id(text)
    return (row, token) if row is not None and token else None


def _id_list(ids: Sequence[str] | None) -> str | None:
    return None if ids is None else json.dumps([r for r in map(row_id, ids) if r is not None])


def _dead(row: tuple[int, bytes, bytes, bytes, bytes, bytes, int, int]) -> DeadLetter:
    number, message_id, queue, body, reason, detail, dead_ms, count = row
    message_id_, queue_, reason_, detail_ = map(_text, (message_id, queue, reason, detail))
    return DeadLetter(str(number), message_id_, queue_, body, reason_, detail_, dead_ms, count)


def _text(value: bytes | str) -> str:
    """A text column read as bytes (``CAST(... AS BLOB)``): what is not UTF-8 (written by
    something else than Stem) is escaped (``\\xff``), not a reason to fail the whole read;
    escaped, not replaced, so two such ids do not read as one."""
    return value.decode("utf-8", "backslashreplace") if isinstance(value, bytes) else str(value)


# -- helpers shared with stem.backends.sqlite ----------------------------------------------


def sqlite_path(url: str) -> Path:
    """The absolute file path of ``sqlite:///relative`` or ``sqlite:////absolute``."""
    parts = urlsplit(url)
    if parts.scheme.lower() != "sqlite" or parts.netloc or len(parts.path) < 2:
        raise ConfigError(
            f"bad SQLite URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
        )
    return Path(unquote(parts.path[1:])).expanduser().absolute()


_NAME = re.compile(r"^-- name: (\w+)\s*$", re.MULTILINE)


def load_queries(package: str, resource: str) -> dict[str, str]:
    """Named queries from a ``.sql`` file: each starts at a ``-- name: x`` line."""
    text = resources.files(package).joinpath(resource).read_text(encoding="utf-8")
    chunks = _NAME.split(text)[1:]
    queries = {}
    for name, body in zip(chunks[::2], chunks[1::2], strict=True):
        lines = [ln for ln in body.splitlines() if ln.strip() and not ln.lstrip().startswith("--")]
        queries[name] = "\n".join(lines)
    return queries


class SQLiteDatabase:
    """One lazily opened connection to a database file, used under a lock, with driver
    errors translated into ``error`` / ``connection_error`` naming the file."""

    def __init__(
        self,
        path: Path,
        schema_sql: str,
        version_sql: str,
        component: str,
        version: int,
        error: type[StemError],
        connection_error: type[StemError],
    ) -> None:
        self.path = path
        self._schema_sql = schema_sql
        self._version_sql = version_sql
        self._component = component
        self._version = version
        self._error = error
        self._connection_error = connection_error
        self._lock = _FILE_LOCKS.get(path)
        self._conn: sqlite3.Connection | None = None
        self._pid = 0

    @contextmanager
    def session(self, begin: str | None) -> Iterator[sqlite3.Connection]:
        """The connection, inside ``begin`` ... COMMIT when ``begin`` is given."""
        with self._lock:
            try:
                conn = self._connect()
                if begin:
                    conn.execute(begin)
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                if begin:
                    conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise self.translate(exc) from exc

    def translate(self, exc: sqlite3.Error) -> StemError:
        """The Stem error for a SQLite error (connection errors for an unusable store)."""
        if isinstance(exc, sqlite3.OperationalError) and "locked" in str(exc):
            return self._connection_error(
                f"SQLite database {self.path} is locked by another connection "
                f"(waited up to {BUSY_TIMEOUT_S:g}s): {exc}"
            )
        if isinstance(exc, sqlite3.OperationalError) or type(exc) is sqlite3.DatabaseError:
            # cannot open, read-only, disk I/O, "file is not a database": the store is unusable
            return self._connection_error(f"SQLite database {self.path}: {exc}")
        return self._error(f"SQLite database {self.path}: {exc}")

    def _connect(self) -> sqlite3.Connection:
        if self._conn is not None:
            if self._pid == os.getpid():
                return self._conn
            # Inherited through fork: never touch the parent's connection (not even to
            # close it, which could checkpoint under the parent's feet); open our own.
            _ABANDONED.append(self._conn)
            self._conn = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._connection_error(
                f"cannot create the directory for SQLite database {self.path}: "
                f"{exc.strerror or exc}"
            ) from exc
        conn = sqlite3.connect(
            self.path,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,  # used by many threads, one at a time (self._lock)
            cached_statements=256,
        )
        try:
            _use_wal(conn)
            # In WAL mode NORMAL loses no commit on a process crash (only on power loss).
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.executescript(self._schema_sql)
            row = conn.execute(self._version_sql).fetchone()
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            conn.close()
            raise
        if row is None or row[0] > self._version:
            conn.close()
            raise self._error(
                f"SQLite database {self.path} has {self._component} schema version "
                f"{row[0] if row else 'none'}; this Stem supports version {self._version}"
            )
        self._conn, self._pid = conn, os.getpid()
        return conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None


_ABANDONED: list[sqlite3.Connection] = []
_T = TypeVar("_T")


class _PerFile(Generic[_T]):
    """One object per database file and topic in this process. A file is known by its
    real path, so two spellings of it (a symlink, ``..``) share the object."""

    def __init__(self, factory: Callable[[], _T]) -> None:
        self._factory = factory
        self._objects: dict[tuple[str, str], _T] = {}
        self._lock = threading.Lock()

    def get(self, path: Path, topic: str = "") -> _T:
        key = (os.path.realpath(path), topic)
        with self._lock:
            obj = self._objects.get(key)
            if obj is None:
                obj = self._objects[key] = self._factory()
            return obj


# One lock per database file in this process, shared by its connections.
_FILE_LOCKS: _PerFile[threading.RLock] = _PerFile(threading.RLock)


def _use_wal(conn: sqlite3.Connection) -> None:
    """Switch the file to WAL mode (it stays so). Changing the journal mode needs the file
    to itself and does not wait on the busy handler, so a fresh file opened by several
    processes at once is retried here."""
    deadline = time.monotonic() + BUSY_TIMEOUT_S
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode = WAL").fetchone()
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.005 + secrets.randbelow(20) / 1000)


def poll_interval(waited_s: float, *, idle: bool = False) -> float:
    """How long a wait that began ``waited_s`` ago sleeps before looking again for what
    another process wrote (SQLite cannot notify across processes). ``idle``: a worker's
    wait for messages, which past ``POLL_IDLE_AFTER_S`` looks only every ``POLL_IDLE_S``
    (a caller waiting on a result keeps looking often)."""
    if idle and waited_s >= POLL_IDLE_AFTER_S:
        return POLL_IDLE_S
    return min(POLL_MAX_S, max(POLL_MIN_S, waited_s / 4))


class Wake:
    """Wakes waiters in this process when another thread changes the same file."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self.generation = 0

    @classmethod
    def for_path(cls, path: Path, topic: str) -> Wake:
        return _WAKES.get(path, topic)

    def notify(self) -> None:
        with self._cond:
            self.generation += 1
            self._cond.notify_all()

    def wait(self, seen: int, timeout_s: float) -> None:
        """Sleep up to ``timeout_s`` unless the generation already moved past ``seen``."""
        with self._cond:
            if self.generation == seen:
                self._cond.wait(timeout_s)


_WAKES: _PerFile[Wake] = _PerFile(Wake)

_Q = load_queries("stem.brokers", "sqlite.sql")
