"""The Redis result backend against real servers: waking waiters across connections and
restarts, expiry across restarts, and errors while the server is down."""

from __future__ import annotations

import gc
import os
import threading
import time
from collections.abc import Iterator

import pytest

from stem.backends.redis import RedisBackend
from stem.errors import BackendConnectionError, BackendError
from stem.states import STARTED, SUCCESS
from tests.fixtures.redis_server import RedisServer

pytestmark = pytest.mark.redis


@pytest.fixture
def pair(redis_url: str) -> Iterator[tuple[RedisBackend, RedisBackend]]:
    a, b = RedisBackend(redis_url), RedisBackend(redis_url)
    yield a, b
    a.close()
    b.close()


def _wait_in_thread(
    backend: RedisBackend, task_id: str, timeout_s: float
) -> tuple[threading.Thread, list[bytes | None], list[BaseException]]:
    out: list[bytes | None] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            out.append(backend.wait(task_id, timeout_s))
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=run)
    t.start()
    return t, out, errors


def test_wait_wakes_on_a_store_from_another_connection(
    pair: tuple[RedisBackend, RedisBackend],
) -> None:
    waiter, writer = pair
    threads = [_wait_in_thread(waiter, "t1", 20.0) for _ in range(5)]
    time.sleep(0.3)
    writer.store("t1", STARTED, b"started", 60)  # not ready: nobody wakes for good
    time.sleep(0.2)
    assert all(not out for _, out, _ in threads)
    started = time.monotonic()
    writer.store("t1", SUCCESS, b"done", 60)
    for t, out, errors in threads:
        t.join(10)
        assert not errors, errors
        assert out == [b"done"]
    assert time.monotonic() - started < 5.0


def test_a_wait_cut_short_by_close_raises_a_backend_error(redis_url: str) -> None:
    backend = RedisBackend(redis_url)
    threads = [_wait_in_thread(backend, f"closing-{i}", 20.0) for i in range(3)]
    time.sleep(0.5)  # subscribed and waiting
    backend.close()
    for t, out, errors in threads:
        t.join(10)
        assert not t.is_alive()
        assert out == []
        assert [type(e) for e in errors] == [BackendError], errors
        assert "was closed while waiting for the result of closing-" in str(errors[0])


def test_wait_times_out_with_a_not_ready_record(pair: tuple[RedisBackend, RedisBackend]) -> None:
    waiter, writer = pair
    writer.store("t2", STARTED, b"started", 60)
    started = time.monotonic()
    assert waiter.wait("t2", 0.4) == b"started"
    assert 0.35 <= time.monotonic() - started < 5.0
    assert waiter.wait("missing", 0.0) is None


def test_a_thread_keeps_its_subscriber_and_ignores_channels_it_left(
    pair: tuple[RedisBackend, RedisBackend],
) -> None:
    waiter, writer = pair
    assert waiter.wait("old", 0.2) is None  # subscribed to "old", then left it
    subscriber = waiter._local.pubsub
    assert subscriber is not None
    writer.store("old", SUCCESS, b"old result", 60)  # announced on a channel nobody waits on
    t, out, errors = _wait_in_thread(waiter, "new", 0.5)  # another thread: its own subscriber
    t.join(10)
    assert not errors and out == [None]
    writer.store("other", SUCCESS, b"x", 60)
    threading.Timer(0.3, lambda: writer.store("new2", SUCCESS, b"new result", 60)).start()
    assert waiter.wait("new2", 10.0) == b"new result"  # not "old result", read from the socket
    assert waiter._local.pubsub is subscriber  # the same connection, no reconnect


def test_a_subscriber_the_server_dropped_is_replaced(fresh_redis_server: RedisServer) -> None:
    waiter = RedisBackend(fresh_redis_server.url)
    writer = RedisBackend(fresh_redis_server.url)
    try:
        assert waiter.wait("a", 0.1) is None
        with fresh_redis_server.admin() as admin:
            # every other connection, the idle subscriber among them (no channel: "normal")
            assert admin.client_kill_filter(_type="normal", skipme=True) >= 2
        threading.Timer(0.3, lambda: writer.store("b", SUCCESS, b"b done", 60)).start()
        assert waiter.wait("b", 10.0) == b"b done"
    finally:
        waiter.close()
        writer.close()


def test_a_channel_resubscribed_by_a_reconnect_is_left_on_the_next_wait(redis_url: str) -> None:
    waiter = RedisBackend(redis_url)
    writer = RedisBackend(redis_url)
    try:
        assert waiter.wait("a", 0.1) is None  # "a" left, its confirmation not read yet
        # the connection drops; redis-py's reconnect hook subscribes to "a" again and
        # forgets that it was being left
        waiter._local.pubsub.connection.disconnect()
        threading.Timer(0.3, lambda: writer.store("b", SUCCESS, b"b done", 60)).start()
        assert waiter.wait("b", 10.0) == b"b done"
        assert waiter.wait("c", 0.1) is None
        subscribed = dict(writer._conn.client.pubsub_numsub(waiter._key("a"), waiter._key("b")))
        assert list(subscribed.values()) == [0, 0]
    finally:
        waiter.close()
        writer.close()


def test_a_finished_thread_gives_its_subscriber_back(redis_url: str) -> None:
    waiter = RedisBackend(redis_url)
    try:
        assert waiter.wait("warm", 0.05) is None  # this thread's subscriber, kept
        t, out, errors = _wait_in_thread(waiter, "gone", 0.1)
        t.join(10)
        assert not errors and out == [None]
        gc.collect()
        assert len(waiter._subscribers) == 1  # only this thread's

        def subscribers_on_server() -> int:  # connections whose last command was a (un)sub
            clients = waiter._conn.client.client_list()
            return sum(c["cmd"] in ("subscribe", "unsubscribe") for c in clients)

        deadline = time.monotonic() + 5.0  # the server sees the close a moment later
        while subscribers_on_server() > 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert subscribers_on_server() == 1  # the ended thread's connection is closed
    finally:
        waiter.close()


def test_a_forked_child_makes_its_own_subscriber(
    pair: tuple[RedisBackend, RedisBackend],
) -> None:
    waiter, writer = pair
    assert waiter.wait("before", 0.1) is None
    parents = waiter._local.pubsub
    writer.store("child", SUCCESS, b"child done", 60)
    pid = os.fork()
    if pid == 0:  # the child: waits on a subscriber of its own, leaves the parent's alone
        ok = False
        try:
            threading.Timer(0.2, lambda: writer.store("c2", SUCCESS, b"c2", 60)).start()
            ok = waiter.wait("c2", 10.0) == b"c2" and waiter._local.pubsub is not parents
        finally:
            os._exit(0 if ok else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    threading.Timer(0.2, lambda: writer.store("after", SUCCESS, b"after", 60)).start()
    assert waiter.wait("after", 10.0) == b"after"
    assert waiter._local.pubsub is parents  # the parent's connection was not disturbed


def test_wait_survives_a_restart(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    waiter = RedisBackend(server.url)
    try:
        t, out, errors = _wait_in_thread(waiter, "t3", 20.0)
        time.sleep(0.3)
        server.restart()
        writer = RedisBackend(server.url)
        try:
            writer.store("t3", SUCCESS, b"after restart", 60)
        finally:
            writer.close()
        t.join(20)
        assert not errors, errors
        assert out == [b"after restart"]
    finally:
        waiter.close()


def test_records_and_member_sets_survive_a_kill(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    b = RedisBackend(server.url)
    try:
        b.store("t4", SUCCESS, b"kept", 600)
        b.store("t5", SUCCESS, b"short", 0.3)
        assert b.add_member("g", "0", 600) == 1
        server.kill()
        server.start()
        assert b.fetch("t4") == b"kept"
        assert b.add_member("g", "0", 600) == 1
        assert b.add_member("g", "1", 600) == 2
        time.sleep(0.4)
        assert b.fetch("t5") is None
    finally:
        b.close()


def test_errors_name_the_server_while_it_is_down(fresh_redis_server: RedisServer) -> None:
    server = fresh_redis_server
    b = RedisBackend(server.url)
    try:
        server.stop()
        with pytest.raises(BackendConnectionError, match=f"127.0.0.1:{server.port}/0"):
            b.fetch("t")
        with pytest.raises(BackendConnectionError):
            b.wait("t", 0.2)
        server.start()
        assert b.fetch("t") is None
    finally:
        b.close()
