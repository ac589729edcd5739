"""PostgreSQL broker behaviour the contract suite cannot see: NOTIFY wake-ups, the polling
fallback, delayed wake-ups, SKIP LOCKED under concurrency, and error messages."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from stem.brokers.base import Message
from stem.brokers.postgres import PostgresBroker
from stem.envelope import now_ms
from stem.errors import BrokerConnectionError, BrokerError
from tests.fixtures.postgres_server import PostgresServer

pytestmark = pytest.mark.postgres

# Generous margins: a wake-up must come "well before the deadline", not within a tight bound.
WAIT_S = 20.0
PROMPT_S = 5.0


@pytest.fixture
def broker(postgres_url: str) -> Iterator[PostgresBroker]:
    b = PostgresBroker(postgres_url)
    yield b
    b.close()


def _publish_later(broker: PostgresBroker, delay_s: float, *messages: Message) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        broker.publish(list(messages))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_notify_wakes_a_blocked_reserve(postgres_url: str) -> None:
    # A long poll interval proves the wake-up came from NOTIFY, not from polling.
    consumer = PostgresBroker(postgres_url + "?poll_interval_s=60")
    producer = PostgresBroker(postgres_url)
    try:
        thread = _publish_later(producer, 0.3, Message("m1", "q", b"x"))
        started = time.monotonic()
        got = consumer.reserve(["q"], 1, 30, wait_s=WAIT_S)
        elapsed = time.monotonic() - started
        thread.join()
        assert [d.message_id for d in got] == ["m1"]
        assert elapsed < PROMPT_S
    finally:
        consumer.close()
        producer.close()


def test_notify_for_another_queue_does_not_return_early(postgres_url: str) -> None:
    consumer = PostgresBroker(postgres_url + "?poll_interval_s=60")
    producer = PostgresBroker(postgres_url)
    try:
        thread = _publish_later(producer, 0.1, Message("other", "elsewhere", b"x"))
        got = consumer.reserve(["q"], 1, 30, wait_s=1.0)
        thread.join()
        assert got == []
        assert [d.message_id for d in consumer.reserve(["elsewhere"], 1, 30)] == ["other"]
    finally:
        consumer.close()
        producer.close()


def test_polling_fallback_without_notifications(postgres_url: str) -> None:
    consumer = PostgresBroker(postgres_url + "?listen=false&prepare=false&poll_interval_s=0.1")
    producer = PostgresBroker(postgres_url)
    try:
        thread = _publish_later(producer, 0.3, Message("m1", "q", b"x"))
        started = time.monotonic()
        got = consumer.reserve(["q"], 1, 30, wait_s=WAIT_S)
        elapsed = time.monotonic() - started
        thread.join()
        assert [d.message_id for d in got] == ["m1"]
        assert elapsed < PROMPT_S
        assert consumer._notifier._conn is None  # really no LISTEN connection
    finally:
        consumer.close()
        producer.close()


def test_waiter_wakes_when_a_delayed_message_is_due(postgres_url: str) -> None:
    broker = PostgresBroker(postgres_url + "?poll_interval_s=60")
    try:
        broker.publish([Message("later", "q", b"x", not_before_ms=now_ms() + 400)])
        started = time.monotonic()
        got = broker.reserve(["q"], 1, 30, wait_s=WAIT_S)
        elapsed = time.monotonic() - started
        assert [d.message_id for d in got] == ["later"]
        assert 0.3 <= elapsed < PROMPT_S
    finally:
        broker.close()


def test_waiter_wakes_when_a_lease_lapses(postgres_url: str) -> None:
    broker = PostgresBroker(postgres_url + "?poll_interval_s=60")
    try:
        broker.publish([Message("m1", "q", b"x")])
        first = broker.reserve(["q"], 1, 0.4)
        started = time.monotonic()
        again = broker.reserve(["q"], 1, 30, wait_s=WAIT_S)
        assert time.monotonic() - started < PROMPT_S
        assert [d.delivery_count for d in again] == [2]
        assert broker.ack(first) == 0  # the old receipt settles nothing
        assert broker.ack(again) == 1
    finally:
        broker.close()


def test_a_newly_published_earlier_delay_shortens_the_wait(postgres_url: str) -> None:
    consumer = PostgresBroker(postgres_url + "?poll_interval_s=60")
    try:
        consumer.publish([Message("far", "q", b"x", not_before_ms=now_ms() + 60_000)])
        thread = _publish_later(
            consumer, 0.2, Message("near", "q", b"y", not_before_ms=now_ms() + 500)
        )
        started = time.monotonic()
        got = consumer.reserve(["q"], 1, 30, wait_s=WAIT_S)
        thread.join()
        assert [d.message_id for d in got] == ["near"]
        assert time.monotonic() - started < PROMPT_S
    finally:
        consumer.close()


def test_many_threads_share_one_broker(broker: PostgresBroker) -> None:
    broker.publish([Message(f"m{i}", "q", b"x") for i in range(200)])
    seen: list[str] = []
    lock = threading.Lock()

    def drain() -> None:
        while True:
            got = broker.reserve(["q"], 7, 30, wait_s=0.2)
            if not got:
                return
            assert broker.ack(got) == len(got)
            with lock:
                seen.extend(d.message_id for d in got)

    threads = [threading.Thread(target=drain) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == sorted(f"m{i}" for i in range(200))


def test_two_brokers_never_lease_the_same_message(postgres_url: str) -> None:
    producer = PostgresBroker(postgres_url)
    producer.publish([Message(f"m{i}", "q", b"x") for i in range(1000)])
    producer.close()
    taken: list[list[str]] = [[], []]
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def drain(slot: int) -> None:
        broker = PostgresBroker(postgres_url)
        try:
            barrier.wait()
            while True:
                got = broker.reserve(["q"], 10, 60)
                if not got:
                    return
                taken[slot].extend(d.message_id for d in got)
                assert broker.ack(got) == len(got)
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)
        finally:
            broker.close()

    threads = [threading.Thread(target=drain, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    counts = Counter(taken[0] + taken[1])
    assert len(counts) == 1000
    assert set(counts.values()) == {1}
    assert taken[0] and taken[1], "both brokers should have taken a share"


def test_reserve_keeps_priority_order_across_queues(broker: PostgresBroker) -> None:
    broker.publish(
        [
            Message("a0", "a", b"", priority=0),
            Message("b9", "b", b"", priority=9),
            Message("a5", "a", b"", priority=5),
        ]
    )
    got = broker.reserve(["a", "b"], 3, 30)
    assert [d.message_id for d in got] == ["b9", "a5", "a0"]


def test_nack_with_body_restarts_count_and_replaces_body(broker: PostgresBroker) -> None:
    broker.publish([Message("m", "q", b"old")])
    first = broker.reserve(["q"], 1, 30)[0]
    assert broker.nack(first, body=b"new")
    again = broker.reserve(["q"], 1, 30)[0]
    assert (again.body, again.delivery_count) == (b"new", 1)


def test_expired_claims_are_swept(broker: PostgresBroker, postgres_url: str) -> None:
    broker.claim("old", "v", 0.001)
    time.sleep(0.01)
    broker._next_sweep = 0.0
    assert broker.claim("new", "v", 60) == "v"
    with psycopg.connect(postgres_url) as conn:
        keys = {r[0] for r in conn.execute("SELECT key FROM stem_claims").fetchall()}
    assert keys == {"new"}


def test_a_delivery_count_at_the_integer_limit_does_not_stop_the_queue(
    broker: PostgresBroker, postgres_url: str
) -> None:
    """A row written by something else than Stem: every reserve failed with 'integer out
    of range'. It is delivered (a worker dead-letters it past max deliveries)."""
    broker.publish([Message("odd", "maxed", b"{}"), Message("good", "maxed", b"{}")])
    with psycopg.connect(postgres_url) as conn:
        conn.execute(
            "UPDATE stem_messages SET delivery_count = 2147483647 WHERE message_id = 'odd'"
        )
    got = broker.reserve(["maxed"], 10, 30.0)
    assert sorted(d.message_id for d in got) == ["good", "odd"]
    assert max(d.delivery_count for d in got) == 2147483647
    broker.ack(got)


def test_unreachable_server_error_is_clear_and_redacted() -> None:
    with socket_closed_port() as port:
        broker = PostgresBroker(
            f"postgresql://stem:hunter2@127.0.0.1:{port}/stem?connect_timeout=2"
        )
        with pytest.raises(BrokerConnectionError) as info:
            broker.ping()
        broker.close()
    message = str(info.value)
    assert f"cannot connect to PostgreSQL at 127.0.0.1:{port}/stem" in message
    assert "hunter2" not in message


def test_missing_schema_with_migrate_false_says_what_to_run(
    postgres_server: PostgresServer,
) -> None:
    with postgres_server.admin() as conn:
        conn.execute("DROP DATABASE IF EXISTS stem_empty")
        conn.execute("CREATE DATABASE stem_empty")
    broker = PostgresBroker(postgres_server.url_for("stem_empty") + "?migrate=false")
    try:
        with pytest.raises(BrokerError, match="stem db migrate"):
            broker.publish([Message("m", "q", b"")])
    finally:
        broker.close()
        with postgres_server.admin() as conn:
            conn.execute("DROP DATABASE stem_empty")


def test_bad_url_option_is_a_config_error(postgres_url: str) -> None:
    from stem.errors import ConfigError

    with pytest.raises(ConfigError, match="poll_interval_s"):
        PostgresBroker(postgres_url + "?poll_interval_s=soon")


class socket_closed_port:
    """A localhost port with nothing listening (bound, then released)."""

    def __enter__(self) -> int:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    def __exit__(self, *exc: object) -> None:
        return None


def _claim_keys(postgres_url: str) -> set[str]:
    with psycopg.connect(postgres_url) as conn:
        return {r[0] for r in conn.execute("SELECT key FROM stem_claims").fetchall()}


def test_ack_with_claims_is_one_round_trip(
    broker: PostgresBroker, postgres_url: str, tmp_path: Path
) -> None:
    broker.publish([Message("m1", "q", b"x"), Message("m2", "q", b"y")])
    got = broker.reserve(["q"], 2, 30)
    trace = tmp_path / "trace"
    run = broker._client.run

    def traced(doing: str, fn: Any) -> Any:
        def go(c: Any) -> Any:
            with trace.open("w") as f:
                c.pgconn.trace(f.fileno())
                try:
                    return fn(c)
                finally:
                    c.pgconn.untrace()

        return run(doing, go)

    broker._client.run = traced  # type: ignore[method-assign]
    try:
        assert broker.ack(got, [("nonce:a", "1", 60), ("nonce:b", "1", 60)]) == 2
    finally:
        broker._client.run = run  # type: ignore[method-assign]
    rows = [line.split("\t") for line in trace.read_text().splitlines()]
    sides = [row[1] for row in rows if len(row) > 2 and row[1] in ("F", "B")]
    turns = [side for i, side in enumerate(sides) if i == 0 or sides[i - 1] != side]
    assert turns == ["F", "B"], trace.read_text()  # sent everything, then read every reply
    assert {"nonce:a", "nonce:b"} <= _claim_keys(postgres_url)


def test_ack_that_fails_records_none_of_its_claims(
    broker: PostgresBroker, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    broker.publish([Message("m1", "q", b"x")])
    got = broker.reserve(["q"], 1, 30)
    from stem.brokers import postgres as module

    monkeypatch.setitem(module._Q, "ack", "SELECT 1 / 0, %(ids)s, %(tokens)s")
    with pytest.raises(BrokerError):
        broker.ack(got, [("nonce:lost", "1", 60)])
    assert "nonce:lost" not in _claim_keys(postgres_url)
    monkeypatch.undo()
    assert broker.ack(got, [("nonce:kept", "1", 60)]) == 1  # the connection is usable again
    assert "nonce:kept" in _claim_keys(postgres_url)


def test_ack_with_claims_refuses_a_connection_outside_autocommit(
    broker: PostgresBroker, postgres_url: str
) -> None:
    broker.publish([Message("m1", "q", b"x")])
    got = broker.reserve(["q"], 1, 30)
    run = broker._client.run

    def not_autocommit(doing: str, fn: Any) -> Any:
        def go(c: Any) -> Any:
            c.autocommit = False  # nothing in Stem does this; the ack must not trust it
            return fn(c)

        return run(doing, go)

    broker._client.run = not_autocommit  # type: ignore[method-assign]
    try:
        with pytest.raises(BrokerError, match="autocommit"):
            broker.ack(got, [("nonce:never", "1", 60)])
    finally:
        broker._client.run = run  # type: ignore[method-assign]
    assert "nonce:never" not in _claim_keys(postgres_url)
    assert broker.ack(got, [("nonce:later", "1", 60)]) == 1  # still leased, acked now


def test_connections_keep_alive_unless_the_url_says_otherwise(postgres_url: str) -> None:
    """TCP keepalives: a LISTEN connection whose peer vanished silently (a NAT or
    firewall dropped it) fails and is made again, instead of waiting for good."""
    sep = "&" if "?" in postgres_url else "?"
    for url, idle in ((postgres_url, "10"), (f"{postgres_url}{sep}keepalives_idle=30", "30")):
        broker = PostgresBroker(url)
        try:
            conn = broker._client.new_connection()
            try:
                params = conn.info.get_parameters()
            finally:
                conn.close()
        finally:
            broker.close()
        assert (params["keepalives"], params["keepalives_idle"]) == ("1", idle)


def test_a_sweep_keeps_up_with_many_expired_claims(postgres_url: str) -> None:
    """One replay nonce per signed message: one bounded batch per sweep fell behind
    above about 33 messages a second. A sweep now deletes batches until none is left."""
    broker = PostgresBroker(postgres_url)
    try:
        conn = broker._client.new_connection()
        try:
            conn.execute(
                "INSERT INTO stem_claims (key, value, expires_at) "
                "SELECT 'nonce:sweep-test:' || g, 'x', 1 FROM generate_series(1, 2500) AS g"
            )
            assert broker.sweep() >= 2500
            left = conn.execute(
                "SELECT count(*) FROM stem_claims WHERE key LIKE 'nonce:sweep-test:%'"
            ).fetchone()
        finally:
            conn.close()
        assert left == (0,)
    finally:
        broker.close()


def test_a_publish_that_outlives_its_deadline_is_not_sent_again(postgres_url: str) -> None:
    """A publish stuck behind a lock had its connection shut at the call deadline and was
    sent again on a fresh one (and again by the producer's retries); the stuck statements
    still committed once the lock went: one delay() stored the message several times. It
    fails with BrokerTimeoutError now, sent once."""
    from stem.errors import BrokerTimeoutError

    b = PostgresBroker(postgres_url + "?call_timeout_s=1")
    b.publish([Message("warm-up", "q", b"x")])  # the schema exists, the pool is warm
    locker = psycopg.connect(postgres_url.split("?")[0], autocommit=False)
    try:
        locker.execute("LOCK TABLE stem_messages IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(BrokerTimeoutError, match="may still have been carried out"):
            b.publish([Message("once", "q", b"body")])
    finally:
        locker.rollback()  # the lock goes: a stuck insert may commit now
        locker.close()

    def stored() -> int:
        with psycopg.connect(postgres_url.split("?")[0]) as conn:
            row = conn.execute(
                "SELECT count(*) FROM stem_messages WHERE message_id = 'once'"
            ).fetchone()
        return int(row[0]) if row else 0

    deadline = time.monotonic() + 10
    while stored() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1.0)  # any second copy, released by the same lock, has committed by now
    count = stored()
    assert count <= 1, f"one publish stored {count} times"
    b.close()
