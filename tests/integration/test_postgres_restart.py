"""The broker and backend across a PostgreSQL restart and a crash (SIGKILL of the
postmaster), on a private server so the shared one stays up for other tests."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from stem.backends.postgres import PostgresBackend
from stem.brokers.base import Delivery, Message
from stem.brokers.postgres import PostgresBroker
from stem.errors import BrokerConnectionError, BrokerError
from stem.states import SUCCESS
from tests.fixtures.postgres_server import PostgresServer, migrate_database, start_server

pytestmark = pytest.mark.postgres


@pytest.fixture(scope="module")
def server() -> Iterator[PostgresServer]:
    srv = start_server()
    migrate_database(srv, "stem")
    yield srv
    srv.destroy()


@pytest.fixture
def url(server: PostgresServer) -> str:
    if server.postmaster_pid() is None:
        server.start()
    with server.admin("stem") as conn:
        conn.execute("TRUNCATE stem_messages, stem_dead_letters, stem_claims, stem_results")
    return server.url_for("stem")


def _drain(broker: PostgresBroker, n: int) -> list[Delivery]:
    got: list[Delivery] = []
    while len(got) < n:
        batch = broker.reserve(["q"], n, 30, wait_s=5)
        if not batch:
            break
        got.extend(batch)
    return got


def test_messages_survive_a_restart_and_pooled_connections_recover(
    server: PostgresServer, url: str
) -> None:
    broker = PostgresBroker(url)
    try:
        broker.publish([Message(f"m{i}", "q", b"x") for i in range(10)])
        broker.ping()  # leaves idle pooled connections that the restart kills
        server.restart()
        got = _drain(broker, 10)
        assert sorted(d.message_id for d in got) == sorted(f"m{i}" for i in range(10))
        assert broker.ack(got) == 10
    finally:
        broker.close()


def test_messages_survive_a_crash(server: PostgresServer, url: str) -> None:
    broker = PostgresBroker(url)
    try:
        broker.publish([Message(f"m{i}", "q", b"x") for i in range(10)])
        server.kill()
        with pytest.raises(BrokerConnectionError, match=r"PostgreSQL at 127\.0\.0\.1"):
            broker.reserve(["q"], 1, 30)
        server.start()
        got = _drain(broker, 10)
        assert len({d.message_id for d in got}) == 10
    finally:
        broker.close()


def test_a_waiting_worker_recovers_across_a_restart(server: PostgresServer, url: str) -> None:
    """A consumer loop like the worker's (retry on BrokerError) keeps working through a
    restart, and its LISTEN connection comes back: the wake-up after the restart is prompt."""
    consumer = PostgresBroker(url + "?poll_interval_s=60")
    got: list[Delivery] = []
    failures: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set() and not got:
            try:
                got.extend(consumer.reserve(["q"], 1, 30, wait_s=30))
            except BrokerError as exc:
                failures.append(str(exc))
                time.sleep(0.1)

    thread = threading.Thread(target=consume)
    thread.start()
    try:
        time.sleep(0.3)
        server.restart()
        time.sleep(0.6)  # the consumer has re-armed LISTEN on the new server
        producer = PostgresBroker(url)
        started = time.monotonic()
        producer.publish([Message("after", "q", b"x")])
        producer.close()
        thread.join(timeout=20)
        assert [d.message_id for d in got] == ["after"]
        assert time.monotonic() - started < 5.0
    finally:
        stop.set()
        thread.join()
        consumer.close()


def test_backend_recovers_across_a_restart(server: PostgresServer, url: str) -> None:
    backend = PostgresBackend(url)
    try:
        backend.store("t", SUCCESS, b"done", None)
        server.restart()
        assert backend.wait("t", 5) == b"done"
    finally:
        backend.close()


def test_a_wait_rides_through_the_store_being_down_for_a_while(
    server: PostgresServer, url: str
) -> None:
    """get() with time left must not fail because the server is restarting: it waits
    for the result once the store is back (as on Redis)."""
    backend = PostgresBackend(url)
    writer = PostgresBackend(url)
    got: list[bytes | None] = []
    try:
        backend.store("w", "STARTED", b"", None)
        server.stop()
        waiter = threading.Thread(target=lambda: got.append(backend.wait("w", 60)))
        waiter.start()
        time.sleep(1.5)  # the wait meets a store that is down, more than once
        server.start()
        writer.store("w", SUCCESS, b"late", None)
        waiter.join(60)
        assert got == [b"late"]
    finally:
        backend.close()
        writer.close()
