"""PostgreSQL result backend: NOTIFY-driven wait, the polling fallback, expiry, and
concurrent set members."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from stem.backends.postgres import PostgresBackend
from stem.states import STARTED, SUCCESS

pytestmark = pytest.mark.postgres

WAIT_S = 20.0
PROMPT_S = 5.0


@pytest.fixture
def backend(postgres_url: str) -> Iterator[PostgresBackend]:
    b = PostgresBackend(postgres_url)
    yield b
    b.close()


def _store_later(
    backend: PostgresBackend, delay_s: float, *records: tuple[str, str, bytes]
) -> threading.Thread:
    def run() -> None:
        time.sleep(delay_s)
        for task_id, state, body in records:
            backend.store(task_id, state, body, None)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.parametrize("options", ["?poll_interval_s=60", "?listen=false&poll_interval_s=0.1"])
def test_wait_returns_promptly_when_the_result_is_stored(postgres_url: str, options: str) -> None:
    waiter = PostgresBackend(postgres_url + options)
    writer = PostgresBackend(postgres_url)
    try:
        writer.store("t1", STARTED, b"running", None)
        thread = _store_later(writer, 0.3, ("t1", SUCCESS, b"done"))
        started = time.monotonic()
        assert waiter.wait("t1", WAIT_S) == b"done"
        thread.join()
        assert time.monotonic() - started < PROMPT_S
    finally:
        waiter.close()
        writer.close()


def test_wait_ignores_non_ready_states_and_other_tasks(postgres_url: str) -> None:
    waiter = PostgresBackend(postgres_url + "?poll_interval_s=60")
    writer = PostgresBackend(postgres_url)
    try:
        thread = _store_later(writer, 0.05, ("t1", STARTED, b"running"), ("t2", SUCCESS, b"other"))
        assert waiter.wait("t1", 0.6) == b"running"  # timed out: whatever is stored
        thread.join()
    finally:
        waiter.close()
        writer.close()


def test_many_threads_wait_on_one_backend(postgres_url: str) -> None:
    waiter = PostgresBackend(postgres_url + "?poll_interval_s=60")
    writer = PostgresBackend(postgres_url)
    results: dict[str, bytes | None] = {}

    def wait(task_id: str) -> None:
        results[task_id] = waiter.wait(task_id, WAIT_S)

    try:
        threads = [threading.Thread(target=wait, args=(f"t{i}",)) for i in range(5)]
        for t in threads:
            t.start()
        time.sleep(0.2)
        started = time.monotonic()
        for i in range(5):
            writer.store(f"t{i}", SUCCESS, f"r{i}".encode(), None)
        for t in threads:
            t.join()
        assert results == {f"t{i}": f"r{i}".encode() for i in range(5)}
        assert time.monotonic() - started < PROMPT_S
    finally:
        waiter.close()
        writer.close()


def test_records_and_sets_expire(backend: PostgresBackend) -> None:
    backend.store("short", SUCCESS, b"x", 0.05)
    backend.store("long", SUCCESS, b"y", 60)
    assert backend.add_member("g", "a", 0.05) == 1
    time.sleep(0.1)
    assert backend.fetch("short") is None
    assert backend.fetch_many(["short", "long"]) == [None, b"y"]
    assert backend.cleanup() == 2  # the record and the set
    assert backend.add_member("g", "a", 60) == 1  # an expired set starts over


def test_add_member_counts_each_member_once_under_concurrency(postgres_url: str) -> None:
    backends = [PostgresBackend(postgres_url) for _ in range(4)]
    sizes: list[int] = []
    lock = threading.Lock()

    def add(b: PostgresBackend) -> None:
        for i in range(50):  # every thread adds the same 50 members
            size = b.add_member("group", f"m{i}", 60)
            with lock:
                sizes.append(size)

    try:
        threads = [threading.Thread(target=add, args=(b,)) for b in backends]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert max(sizes) == 50
        assert backends[0].add_member("group", "m0", 60) == 50
    finally:
        for b in backends:
            b.close()


def test_store_replaces_and_delete_removes(backend: PostgresBackend) -> None:
    backend.store("t", STARTED, b"1", None)
    backend.store("t", SUCCESS, b"2", None)
    assert backend.fetch("t") == b"2"
    backend.delete("t")
    assert backend.fetch("t") is None
    assert backend.wait("t", 0) is None
