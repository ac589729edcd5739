"""Producer publish retries, and a worker whose consumer hangs in the broker."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from typing import Any

import pytest

from stem import Stem
from stem.brokers.base import Delivery, Message
from stem.brokers.memory import MemoryBroker
from stem.errors import BrokerConnectionError
from stem.worker.consumer import Worker, WorkerConfig


class FlakyBroker(MemoryBroker):
    """Fails the first ``failures`` publishes like a dropped connection."""

    def __init__(self, url: str, failures: int) -> None:
        super().__init__(url)
        self.failures = failures
        self.attempts = 0

    def publish(self, messages: Sequence[Message]) -> None:
        self.attempts += 1
        if self.attempts <= self.failures:
            raise BrokerConnectionError("connection reset by peer")
        super().publish(messages)


def test_publish_retries_with_backoff_then_succeeds() -> None:
    broker = FlakyBroker("memory://flaky-ok", failures=2)
    app = Stem(
        "p",
        broker=broker,
        backend="memory://flaky-ok",
        publish_retries=3,
        publish_retry_backoff_s=0.01,
    )
    app.send_task("anything", [1])
    assert broker.attempts == 3
    assert broker.stats(["default"])[0].ready == 1


def test_publish_gives_up_with_a_clear_error_and_publishes_nothing() -> None:
    broker = FlakyBroker("memory://flaky-down", failures=99)
    app = Stem(
        "p",
        broker=broker,
        backend="memory://flaky-down",
        publish_retries=2,
        publish_retry_backoff_s=0.01,
    )
    with pytest.raises(BrokerConnectionError, match="connection reset"):
        app.send_task("anything")
    assert broker.attempts == 3
    assert broker.stats(["default"]) == [] or broker.stats(["default"])[0].ready == 0


class HangingBroker(MemoryBroker):
    """reserve() never returns once ``hang`` is set (a half-open TCP connection)."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.hang = threading.Event()
        self.release = threading.Event()

    def reserve(
        self, queues: Sequence[str], max_n: int, lease_s: float, wait_s: float = 0.0
    ) -> list[Delivery]:
        if self.hang.is_set():
            self.release.wait(30)
            return []
        return super().reserve(queues, max_n, lease_s, wait_s)


def test_a_stalled_consumer_is_reported_and_stops_the_worker(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from stem.worker import consumer

    # The stop waits out its whole tail for the consumer stuck in reserve (2 s in service).
    monkeypatch.setattr(consumer, "STOP_TAIL_NOW_S", 0.5)
    broker = HangingBroker("memory://hanging")
    app = Stem("w", broker=broker, backend="memory://hanging")
    worker = Worker(
        app,
        WorkerConfig(
            pool="thread",
            concurrency=1,
            poll_wait_s=0.05,
            stall_s=0.5,
            heartbeat_s=0.1,
            shutdown_budget_s=1,
        ),
    )
    done = threading.Thread(target=worker.run)
    done.start()
    try:
        deadline = time.monotonic() + 5
        while not worker.health()["consuming"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert worker.health()["consuming"]
        broker.hang.set()
        done.join(10)
        assert not done.is_alive()
        assert worker.stalled
        health: dict[str, Any] = worker.health()
        assert health["draining"]
    finally:
        broker.release.set()
        worker.request_stop(now=True)
        done.join(5)


@pytest.mark.parametrize("scheme", ["redis", "postgresql"])
def test_get_without_a_timeout_on_a_store_that_never_answers_is_an_error(
    scheme: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """get() with no timeout waited silently for an hour on a wrong URL or a dead store.
    It rides out an outage for WAIT_OUTAGE_S (shortened here), saying so, then raises."""
    from stem.backends import base
    from stem.errors import BackendConnectionError
    from tests.fixtures.redis_server import free_port

    monkeypatch.setattr(base, "WAIT_OUTAGE_S", 1.0)
    url = f"{scheme}://127.0.0.1:{free_port()}/0"  # nothing listens there
    app = Stem("gone", broker="memory://gone", backend=url)
    try:
        with caplog.at_level("WARNING", logger="stem.backends"):
            with pytest.raises(BackendConnectionError):
                app.AsyncResult("abc").get()
        said = [r.getMessage() for r in caplog.records if r.name == "stem.backends"]
        assert said and said[0].startswith(
            "result store did not answer while waiting for the result of abc"
        )
    finally:
        app.close()


def test_a_long_wait_rides_out_each_outage_with_its_own_allowance(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A wait that rode out one Redis blip must not raise at the first error of the next
    one, hours later (the allowance counted from the first outage)."""
    import redis

    from stem.backends import base
    from stem.backends.redis import RedisBackend
    from stem.errors import BackendConnectionError

    monkeypatch.setattr(base, "WAIT_OUTAGE_S", 1.0)
    backend = RedisBackend("redis://127.0.0.1:1/0")
    waits: list[int] = []

    def wait_subscribed(key: Any, deadline: float, answered: Any) -> Any:
        waits.append(1)
        if len(waits) == 1:
            raise redis.ConnectionError("down")
        if len(waits) == 2:
            answered()  # subscribed: answering for longer than the allowance, then down
            time.sleep(1.5)
            raise redis.ConnectionError("down again")
        return b"SUCCESS", b"done"

    monkeypatch.setattr(backend, "_read", lambda key: (None, None))
    monkeypatch.setattr(backend, "_wait_subscribed", wait_subscribed)
    monkeypatch.setattr(backend._conn, "is_connection_error", lambda exc: True)
    assert backend.wait("t", 30) == b"done"

    # Reads work but subscribing never does (Redis at maxclients): that is an outage too.
    def never_subscribed(key: Any, deadline: float, answered: Any) -> Any:
        raise redis.ConnectionError("max number of clients reached")

    monkeypatch.setattr(backend, "_wait_subscribed", never_subscribed)
    started = time.monotonic()
    with pytest.raises(BackendConnectionError):
        backend.wait("t", 30)
    assert time.monotonic() - started < 10  # raised once the allowance ran out, not at 30 s
