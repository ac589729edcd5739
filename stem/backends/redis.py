"""The Redis result backend.

``redis://host:port/db?prefix=stem:`` (``rediss://`` for TLS; options in
:mod:`stem.redis_conn`). One hash per task id holds the state and the record, expiring with
its ttl; ``redis_results.lua`` (whose header documents the key layout) writes it and, for a
ready state, publishes on the task's channel in the same atomic call.

``wait`` reads the record first (a finished task costs one round trip). Otherwise it
subscribes, waits for the subscription to be confirmed, and only then reads again, so a
record stored at any moment is either seen by that read or announced on the channel: no
polling and no lost wake-up. Each waiting thread keeps its subscriber connection between
waits (a fresh one costs a connect and a handshake, several times a round trip), subscribes
to one task's channel at a time, and ignores what arrives for channels it left. Redis
expires records itself, so ``cleanup`` has nothing to do.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import redis

from stem.backends.base import WaitRetry, ttl_ms
from stem.errors import BackendConnectionError, BackendError
from stem.observability.redact import redact_url
from stem.redis_conn import RedisConn
from stem.security.tls import TLSSettings
from stem.states import READY_STATES

__all__ = ["RedisBackend"]

_HERE = Path(__file__).parent
_READY = frozenset(s.encode() for s in READY_STATES)


def _ttl_ms(ttl_s: float | None) -> str:
    """:func:`~stem.backends.base.ttl_ms` as the scripts take it ("" keeps the record)."""
    ms = ttl_ms(ttl_s)
    return "" if ms is None else str(ms)


class RedisBackend:
    """A :class:`~stem.backends.base.ResultBackend` on Redis (see the module docstring)."""

    def __init__(self, url: str, *, tls: TLSSettings | None = None) -> None:
        self.url = url
        self._conn = RedisConn(url, tls, error=BackendError, conn_error=BackendConnectionError)
        self._prefix = self._conn.prefix
        self._script = self._conn.load_script(_HERE / "redis_results.lua")
        self._local = threading.local()  # each waiting thread's subscriber (see wait)
        # Weak: a thread that ends drops its subscriber, and redis-py closes it.
        self._subscribers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._subscribers_lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"<RedisBackend {redact_url(self.url)}>"

    def _key(self, task_id: str) -> str:
        return f"{self._prefix}result:{task_id}"

    def store(self, task_id: str, state: str, body: bytes, ttl_s: float | None) -> None:
        key = self._key(task_id)
        ready = "1" if state in READY_STATES else "0"
        args: list[Any] = ["store", state, bytes(body), _ttl_ms(ttl_s), ready]
        args.append(key)
        self._conn.run("storing a result", lambda c: self._conn.evalsha(self._script, [key], args))

    def fetch(self, task_id: str) -> bytes | None:
        key = self._key(task_id)
        value: Any = self._conn.run("fetching a result", lambda c: c.hget(key, "b"))
        return None if value is None else bytes(value)

    def fetch_many(self, task_ids: Sequence[str]) -> list[bytes | None]:
        if not task_ids:
            return []

        def go(c: redis.Redis) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for task_id in task_ids:
                pipe.hget(self._key(task_id), "b")
            return list(pipe.execute())

        values = self._conn.run("fetching results", go)
        return [None if v is None else bytes(v) for v in values]

    def _read(self, key: str) -> tuple[bytes | None, bytes | None]:
        found: Any = self._conn.client.hmget(key, ["s", "b"])
        return found[0], found[1]

    def wait(self, task_id: str, timeout_s: float) -> bytes | None:
        key = self._key(task_id)
        deadline = time.monotonic() + max(0.0, timeout_s)
        state: bytes | None = None
        body: bytes | None = None
        checked = False
        retry = WaitRetry(deadline, f"waiting for the result of {task_id}")
        while True:
            try:
                if not checked:  # a finished task costs one round trip, no subscription
                    state, body = self._read(key)
                    checked = True
                if state in _READY or time.monotonic() >= deadline:
                    return None if body is None else bytes(body)
                state, body = self._wait_subscribed(key, deadline, retry.answered)
            except Exception as exc:
                # Once it answers again, read first: the result may have come meanwhile.
                # Only a working subscription starts the next outage's allowance afresh
                # (reads alone may work while subscribing fails, at maxclients say).
                checked = False
                if self._closed:  # close() took the subscriber from under this thread
                    raise BackendError(
                        f"{self!r} was closed while waiting for the result of {task_id}"
                    ) from None
                if not isinstance(exc, redis.RedisError | OSError):
                    raise
                # Redis restarting: try again, for a while.
                if not self._conn.is_connection_error(exc) or not retry.pause(exc):
                    raise self._conn.fail(exc, "waiting for a result") from None

    def _subscriber(self) -> Any:
        """This thread's subscriber connection, made on first use.

        One made before a fork belongs to the parent: the child leaves its socket alone
        (redis-py closes it without a shutdown) and makes its own.
        """
        ps = getattr(self._local, "pubsub", None)
        if ps is not None and getattr(self._local, "pid", None) != os.getpid():
            ps = self._local.pubsub = None
        if ps is None:
            ps = self._conn.client.pubsub()  # type: ignore[no-untyped-call]
            with self._subscribers_lock:
                if self._closed:
                    raise BackendError(f"{self!r} is closed")
                self._subscribers.add(ps)
            self._local.pubsub, self._local.pid = ps, os.getpid()
        return ps

    def _drop_subscriber(self) -> None:
        ps = getattr(self._local, "pubsub", None)
        self._local.pubsub = None
        if ps is not None:
            with self._subscribers_lock:
                owned = ps in self._subscribers  # else close() took it, and closes it
                self._subscribers.discard(ps)
            if owned:  # never two threads closing one PubSub (it is not thread-safe)
                ps.close()

    def _wait_subscribed(
        self, key: str, deadline: float, answered: Callable[[], None]
    ) -> tuple[bytes | None, bytes | None]:
        """Subscribe and wait for the record to be ready (or the deadline); ``answered`` is
        called whenever the subscription is confirmed or a read in it succeeds."""
        ps = self._subscriber()
        channel = key.encode()
        try:
            # A channel left just before a reconnect is subscribed again by redis-py's
            # reconnect hook, and its unsubscribe is forgotten: leave it now.
            stale = [c for c in ps.channels if c not in ps.pending_unsubscribe_channels]
            if stale:
                ps.unsubscribe(*stale)
            ps.subscribe(key)
            while True:  # the confirmation means the server will tell us of any later store
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return self._read(key)
                msg = ps.get_message(timeout=min(remaining_s, self._conn.max_block_s))
                if msg is not None and msg["type"] == "subscribe" and msg["channel"] == channel:
                    break
            answered()
            while True:
                state, body = self._read(key)
                answered()
                remaining_s = deadline - time.monotonic()
                if state in _READY or remaining_s <= 0:
                    return state, body
                msg = ps.get_message(timeout=min(remaining_s, self._conn.max_block_s))
                if msg is not None and msg["type"] == "message" and msg["channel"] == channel:
                    # "state\nbody": the record as stored, no read needed. A bare state
                    # (an older worker) falls through to the read above.
                    state, sep, body = bytes(msg["data"]).partition(b"\n")
                    if sep and state in _READY:
                        return state, body
        except BaseException:
            self._drop_subscriber()  # a broken or half-read connection is not kept
            raise
        finally:
            if self._local.pubsub is ps:
                try:
                    ps.unsubscribe(key)  # its confirmation is skipped by the next wait
                except (redis.RedisError, OSError):
                    self._drop_subscriber()

    def add_member(self, key: str, member: str, ttl_s: float | None) -> int:
        full = f"{self._prefix}members:{key}"
        args: list[Any] = ["member", member, _ttl_ms(ttl_s)]
        size = self._conn.run(
            "counting a group member", lambda c: self._script(keys=[full], args=args)
        )
        return int(size)

    def delete(self, task_id: str) -> None:
        key = self._key(task_id)
        self._conn.run("deleting a result", lambda c: c.delete(key))

    def cleanup(self) -> int:
        return 0  # Redis drops expired records by itself

    def ping(self) -> None:
        self._conn.ping()

    def close(self) -> None:
        """Close the connections. A thread still in :meth:`wait` gets a BackendError."""
        with self._subscribers_lock:
            self._closed = True
            subscribers = list(self._subscribers)
            self._subscribers.clear()
        for ps in subscribers:
            ps.close()
        self._conn.close()
