"""Connections shared by the PostgreSQL broker and result backend.

A small lock-protected pool of autocommit connections, one per concurrent caller, opened on
demand and kept up to ``pool_size`` when idle. We do not use psycopg_pool here on purpose: it
runs background threads (awkward around the worker's fork of child processes) and, while the
server is down, makes callers wait for its reconnect loop instead of failing at once with a
clear error; a worker's consumer loop already retries with a backoff.

After a server restart every idle connection is dead. A call that fails on a connection which
turns out to be broken drops all idle connections and is retried once on a fresh one, so one
restart costs callers nothing more than a reconnect. A retried publish may store a message
twice if the first attempt committed before the connection broke: at-least-once, as promised.

Errors leave this module as Stem errors (connection errors as ``conn_error``, everything else
as ``error``) with the target as ``host:port/db`` and never a password.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any, TypeVar

import psycopg
from psycopg import errors as pgerrors
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from stem.errors import StemError
from stem.observability.redact import redact_text
from stem.pg import migrate
from stem.pg.conninfo import PgOptions

log = logging.getLogger("stem.postgres")

T = TypeVar("T")
Conn = psycopg.Connection[Any]


# TCP keepalives unless the URL sets its own: a connection whose peer vanished without a
# word (a NAT or firewall that dropped it, a host that died) fails within about 25 s of
# silence instead of never. It matters most for the LISTEN connection, which only reads.
_KEEPALIVES = {
    "keepalives": "1",
    "keepalives_idle": "10",
    "keepalives_interval": "5",
    "keepalives_count": "3",
}

# Common libpq failures, with what to do about them.
_HINTS = (
    ("no encryption", "the server accepts only TLS: give a CA in tls.ca_file or sslrootcert"),
    (
        "certificate verify failed",
        # libpq gives no reason: the likely ones, without claiming one.
        "the server certificate could not be verified: check that it is signed by the "
        "configured CA (tls.ca_file / sslrootcert) and within its validity dates",
    ),
    ("does not match host name", "connect by a name the server certificate lists"),
    ("requires a valid client certificate", "give a client certificate and key"),
    ("password authentication failed", "check the user name and password"),
)


def _detail(exc: BaseException) -> str:
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return redact_text(text) or type(exc).__name__


class PgClient:
    """Connections for one broker or backend. Thread-safe."""

    def __init__(
        self,
        options: PgOptions,
        *,
        error: type[StemError],
        conn_error: type[StemError],
        timeout_error: type[StemError] | None = None,
        role: str,
    ) -> None:
        self.options = options
        self._error = error
        self._conn_error = conn_error
        self._timeout_error = timeout_error or conn_error
        self._role = role
        self._idle: list[Conn] = []
        self._lock = threading.Lock()
        self._closed = False
        self._schema_ready = threading.Event()
        if not options.migrate:
            self._schema_ready.set()
        self._schema_lock = threading.Lock()
        extra = dict(options.params)
        given = conninfo_to_dict(options.conninfo)
        if "application_name" not in given:
            extra["application_name"] = f"stem-{role}"  # shows in pg_stat_activity
        for key, value in _KEEPALIVES.items():
            if key not in given and key not in extra:
                extra[key] = value
        self._conninfo = make_conninfo(options.conninfo, **extra)

    # -- errors ------------------------------------------------------------------------------

    def connect_error(self, exc: BaseException) -> StemError:
        detail = _detail(exc)
        hints = [hint for needle, hint in _HINTS if needle in detail]
        suffix = f" ({'; '.join(hints)})" if hints else ""
        return self._conn_error(
            f"cannot connect to PostgreSQL at {self.options.target}: {detail}{suffix}"
        )

    def translate(self, exc: psycopg.Error, doing: str, conn: Conn | None = None) -> StemError:
        target = self.options.target
        if conn is not None and (conn.closed or conn.broken):
            return self._conn_error(
                f"lost the connection to PostgreSQL at {target} while {doing}: {_detail(exc)}"
            )
        if isinstance(exc, pgerrors.UndefinedTable | pgerrors.UndefinedFunction):
            return self._error(
                f"the Stem tables are missing in PostgreSQL at {target} ({_detail(exc)}): "
                "run `stem db migrate --url URL`, or drop `migrate=false` from the URL"
            )
        if isinstance(exc, pgerrors.InsufficientPrivilege):
            return self._error(
                f"PostgreSQL at {target} refused {doing}: permission denied ({_detail(exc)})"
            )
        if isinstance(exc, psycopg.OperationalError) and conn is None:
            return self.connect_error(exc)
        return self._error(f"PostgreSQL at {target} failed while {doing}: {_detail(exc)}")

    # -- connections -------------------------------------------------------------------------

    def new_connection(self) -> Conn:
        """A fresh autocommit connection (callers own it and must close it)."""
        try:
            conn = psycopg.connect(self._conninfo, autocommit=True)
        except psycopg.Error as exc:
            raise self.connect_error(exc) from None
        if not self.options.prepare:
            conn.prepare_threshold = None
        return conn

    def _checkout(self) -> tuple[Conn, bool]:
        with self._lock:
            if self._closed:
                raise self._error(f"the PostgreSQL {self._role} is closed")
            if self._idle:
                return self._idle.pop(), True
        return self.new_connection(), False

    def _checkin(self, conn: Conn) -> None:
        reusable = (
            not conn.closed
            and not conn.broken
            and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        )
        if reusable:
            with self._lock:
                if not self._closed and len(self._idle) < self.options.pool_size:
                    self._idle.append(conn)
                    return
        conn.close()

    def _drop_idle(self) -> None:
        with self._lock:
            stale, self._idle = self._idle, []
        for conn in stale:
            conn.close()

    @contextmanager
    def connection(self) -> Iterator[Conn]:
        """A pooled connection for a caller that runs several statements itself."""
        conn, _ = self._checkout()
        try:
            yield conn
        finally:
            self._checkin(conn)

    def run(self, doing: str, fn: Callable[[Conn], T], *, resend: bool = True) -> T:
        """Run ``fn`` on a pooled connection, retrying once if a stale one broke. A call
        that outlives ``call_timeout_s`` has its socket shut down (see _Deadlines); it is
        sent again only if ``resend`` (calls that do no harm twice: acks, renewals,
        reads), else it raises the timeout error at once: the server may still carry it
        out, and a publish sent again would be stored twice."""
        self.ensure_schema()
        retried = False
        while True:
            conn, pooled = self._checkout()
            call = _Call(conn, self.options.call_timeout_s)
            try:
                with _DEADLINES.watch(call):
                    result = fn(conn)
            except psycopg.Error as exc:
                broken = conn.closed or conn.broken
                self._checkin(conn)
                if call.overdue and (not resend or retried):
                    # The server may still carry it out (a statement waiting on a lock
                    # commits once it gets it).
                    raise self._timeout_error(
                        f"PostgreSQL at {self.options.target} did not answer within "
                        f"{self.options.call_timeout_s:g}s while {doing}; it may still have "
                        "been carried out"
                    ) from None
                if broken or call.overdue:
                    self._drop_idle()
                    if (pooled or call.overdue) and not retried:
                        retried = True
                        continue
                raise self.translate(exc, doing, conn) from None
            except BaseException:
                conn.close()
                raise
            self._checkin(conn)
            return result

    def ensure_schema(self) -> None:
        """Apply pending migrations once per client (unless the URL says ``migrate=false``)."""
        if self._schema_ready.is_set():
            return
        with self._schema_lock:
            if self._schema_ready.is_set():
                return
            with self.connection() as conn:
                try:
                    if not migrate.is_current(conn):
                        migrate.apply(conn)
                except psycopg.Error as exc:
                    raise self.translate(exc, "applying migrations", conn) from None
            self._schema_ready.set()

    def ping(self) -> None:
        self.run("pinging", lambda conn: conn.execute(b"SELECT 1"))

    def close(self) -> None:
        with self._lock:
            self._closed = True
        self._drop_idle()


def close_quietly(conn: Conn | None) -> None:
    if conn is not None:
        with suppress(Exception):
            conn.close()


class _Call:
    """One call watched by _Deadlines: ``overdue`` once its connection was shut down."""

    __slots__ = ("conn", "deadline", "overdue")

    def __init__(self, conn: Conn, timeout_s: float) -> None:
        self.conn = conn
        self.deadline = time.monotonic() + timeout_s
        self.overdue = False


class _Deadlines:
    """One watchdog thread for every client in the process. psycopg has no client-side
    deadline for a statement; when a connection goes silent (no reset, no reply) a call
    would wait forever. Shutting the socket down wakes the waiting call with an error
    (a timeout error: the statement may still take effect on the server)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._thread: threading.Thread | None = None

    @contextmanager
    def watch(self, call: _Call) -> Iterator[None]:
        key = id(call.conn)
        with self._lock:
            self._calls[key] = call
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="stem-pg-deadlines", daemon=True
                )
                self._thread.start()
        try:
            yield
        finally:
            with self._lock:
                self._calls.pop(key, None)

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            now = time.monotonic()
            with self._lock:
                overdue = [c for c in self._calls.values() if c.deadline < now]
                for call in overdue:
                    self._calls.pop(id(call.conn), None)
                    call.overdue = True
            for call in overdue:
                log.warning(
                    "PostgreSQL call overdue: shutting its connection down",
                    extra={"event": "pg-call-timeout"},
                )
                try:
                    fd = call.conn.fileno()
                    sock = socket.socket(fileno=os.dup(fd))
                    try:
                        sock.shutdown(socket.SHUT_RDWR)
                    finally:
                        sock.close()
                except (OSError, psycopg.Error):
                    pass  # already closed


_DEADLINES = _Deadlines()
