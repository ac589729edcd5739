"""Wait for NOTIFY payloads on one channel, shared by every thread of a broker or backend.

One dedicated connection LISTENs on the channel. There is no background thread: a waiting
thread that finds nobody reading the connection becomes the reader ("pump") for a while,
records each payload it receives with a generation number and wakes the others; when it
leaves it wakes them too so one of them takes over.

Waiting is race-free when the caller follows the check-after-listen pattern::

    since = notifier.mark()           # LISTEN is active from here on
    if check_the_database(): return   # sees everything committed before the NOTIFY
    notifier.wait(keys, since, t)     # returns early if a key was notified after mark()

Notifications are only sent on commit, so one that ``check_the_database`` missed carries a
generation above ``since``. When the listening connection is lost (server restart),
notifications may have been missed: every waiter is woken to check again, and the next
``mark`` reconnects. Each wait is also capped by the caller (the poll interval), so a
pooler that drops notifications costs latency, never correctness.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import Any

import psycopg
from psycopg import sql

from stem.pg.client import close_quietly

log = logging.getLogger("stem.postgres")

_MAX_SEEN = 10_000  # payloads remembered; older ones fall back to the poll interval
_RECONNECT_EVERY_S = 1.0


class Notifier:
    def __init__(
        self, connect: Callable[[], psycopg.Connection[Any]], channel: str, *, enabled: bool
    ) -> None:
        self._connect = connect
        self._channel = channel
        self.enabled = enabled
        self._cond = threading.Condition()
        self._conn: psycopg.Connection[Any] | None = None
        self._gen = 0
        self._reset_gen = 0  # generation of the last (re)connect or loss
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._pumping = False
        self._closed = False
        self._next_connect = 0.0
        self._orphan: psycopg.Connection[Any] | None = None

    def mark(self) -> int:
        """Make sure LISTEN is active (when possible) and return the current generation."""
        with self._cond:
            if (
                self.enabled
                and not self._closed
                and self._conn is None
                and not self._pumping
                and time.monotonic() >= self._next_connect
            ):
                self._listen()
            return self._gen

    def _listen(self) -> None:
        # Called with the condition held; a failure leaves us polling until the next try.
        self._next_connect = time.monotonic() + _RECONNECT_EVERY_S
        try:
            conn = self._connect()
        except Exception as exc:
            log.debug("cannot LISTEN, polling instead: %s", exc)
            return
        try:
            conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self._channel)))
        except psycopg.Error as exc:
            log.debug("LISTEN failed, polling instead: %s", exc)
            close_quietly(conn)
            return
        self._conn = conn
        self._gen += 1
        self._reset_gen = self._gen

    def _fired(self, keys: Collection[str], since: int) -> bool:
        if self._reset_gen > since:
            return True
        return any(self._seen.get(k, -1) > since for k in keys)

    def wait(self, keys: Collection[str], since: int, timeout_s: float) -> bool:
        """Block until one of ``keys`` is notified after generation ``since`` (True), or
        ``timeout_s`` passes (False)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        while True:
            with self._cond:
                if self._fired(keys, since):
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                conn = self._conn
                if self._pumping or self._closed or not self.enabled:
                    self._cond.wait(remaining)
                    continue
                if conn is None:
                    # LISTEN is down (server restarting): return when a reconnect is due,
                    # so the caller re-checks and mark() tries LISTEN again.
                    retry_in = self._next_connect - time.monotonic()
                    self._cond.wait(min(remaining, max(0.0, retry_in)))
                    return self._fired(keys, since)
                self._pumping = True
            try:
                self._pump(conn, remaining)
            finally:
                with self._cond:
                    self._pumping = False
                    orphan, self._orphan = self._orphan, None
                    self._cond.notify_all()
                close_quietly(orphan)

    def _pump(self, conn: psycopg.Connection[Any], timeout_s: float) -> None:
        try:
            # stop_after=1 returns after the first packet; the generator is always run to
            # its end, because closing it early drops the rest of a packet's notifications.
            for note in conn.notifies(timeout=timeout_s, stop_after=1):
                with self._cond:
                    self._gen += 1
                    self._seen[note.payload] = self._gen
                    self._seen.move_to_end(note.payload)
                    while len(self._seen) > _MAX_SEEN:
                        self._seen.popitem(last=False)
                    self._cond.notify_all()
        except psycopg.Error as exc:
            log.info("lost the LISTEN connection, will reconnect: %s", exc)
            close_quietly(conn)
            with self._cond:
                if self._conn is conn:
                    self._conn = None
                self._gen += 1
                self._reset_gen = self._gen
                self._next_connect = 0.0

    def close(self) -> None:
        # A pumping thread is inside notifies() on the connection: closing it from here
        # would pull the socket from under it, so the pump closes it when its wait ends (at
        # most one poll interval later).
        with self._cond:
            self._closed = True
            conn, self._conn = self._conn, None
            if self._pumping:
                self._orphan, conn = conn, None
            self._cond.notify_all()
        close_quietly(conn)
