"""The result backend contract (stem/backends/base.py), run against every backend."""

from __future__ import annotations

import threading
import time

from stem import states
from stem.backends.base import ResultBackend
from tests.contract.conftest import Names

SHORT_TTL_S = 0.3
LONG_TTL_S = 3600.0


def _store_later(
    backend: ResultBackend, steps: list[tuple[float, str, str, bytes]]
) -> threading.Thread:
    """Store ``(at_s, task_id, state, body)`` steps from another thread."""

    def run() -> None:
        started = time.monotonic()
        for at_s, task_id, state, body in steps:
            time.sleep(max(0.0, started + at_s - time.monotonic()))
            backend.store(task_id, state, body, LONG_TTL_S)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_is_a_backend_that_answers(backend: ResultBackend) -> None:
    assert isinstance(backend, ResultBackend)
    assert isinstance(backend.url, str) and backend.url
    backend.ping()


def test_store_and_fetch(
    backend: ResultBackend, other_backend: ResultBackend, names: Names
) -> None:
    tid = names.key("task")
    assert backend.fetch(tid) is None
    body = b'{"state":"SUCCESS"}\x00\xff binary'
    backend.store(tid, states.SUCCESS, body, LONG_TTL_S)
    assert backend.fetch(tid) == body
    assert other_backend.fetch(tid) == body  # another instance on the same store


def test_store_replaces_the_record(backend: ResultBackend, names: Names) -> None:
    tid = names.key("task")
    backend.store(tid, states.STARTED, b"started", LONG_TTL_S)
    backend.store(tid, states.SUCCESS, b"done", LONG_TTL_S)
    assert backend.fetch(tid) == b"done"
    backend.store(tid, states.RETRY, b"retry", None)
    assert backend.fetch(tid) == b"retry"


def test_large_record_round_trips(backend: ResultBackend, names: Names) -> None:
    tid = names.key("task")
    body = bytes(range(256)) * 4096  # 1 MiB, every byte value
    backend.store(tid, states.SUCCESS, body, LONG_TTL_S)
    assert backend.fetch(tid) == body


def test_records_expire_after_their_ttl(backend: ResultBackend, names: Names) -> None:
    short, kept, forever = names.key("short"), names.key("kept"), names.key("forever")
    zero = names.key("zero")
    backend.store(short, states.SUCCESS, b"short", SHORT_TTL_S)
    backend.store(kept, states.SUCCESS, b"kept", LONG_TTL_S)
    backend.store(forever, states.SUCCESS, b"forever", None)
    backend.store(zero, states.SUCCESS, b"zero", 0)  # not positive: kept, as None
    assert backend.fetch(short) == b"short"
    time.sleep(SHORT_TTL_S + 0.25)
    assert backend.fetch(short) is None  # honoured on read, before any cleanup
    assert backend.fetch_many([short, kept, forever, zero]) == [None, b"kept", b"forever", b"zero"]
    assert backend.wait(short, 0.0) is None


def test_a_new_store_renews_the_ttl(backend: ResultBackend, names: Names) -> None:
    tid = names.key("task")
    backend.store(tid, states.STARTED, b"started", SHORT_TTL_S)
    backend.store(tid, states.SUCCESS, b"done", LONG_TTL_S)
    time.sleep(SHORT_TTL_S + 0.25)
    assert backend.fetch(tid) == b"done"


def test_fetch_many_keeps_the_order_asked(backend: ResultBackend, names: Names) -> None:
    a, b, missing = names.key("a"), names.key("b"), names.key("missing")
    backend.store(a, states.SUCCESS, b"A", LONG_TTL_S)
    backend.store(b, states.FAILURE, b"B", LONG_TTL_S)
    assert backend.fetch_many([b, missing, a, b]) == [b"B", None, b"A", b"B"]
    assert backend.fetch_many([]) == []


def test_wait_returns_as_soon_as_a_ready_state_is_stored(
    backend: ResultBackend, names: Names
) -> None:
    tid = names.key("task")
    writer = _store_later(
        backend, [(0.1, tid, states.STARTED, b"started"), (0.4, tid, states.SUCCESS, b"done")]
    )
    started = time.monotonic()
    got = backend.wait(tid, 10.0)
    elapsed = time.monotonic() - started
    writer.join()
    assert got == b"done"  # not the STARTED record: that state is not ready
    assert 0.3 <= elapsed < 5.0


def test_wait_wakes_for_a_store_through_another_instance(
    backend: ResultBackend, other_backend: ResultBackend, names: Names
) -> None:
    tid = names.key("task")
    writer = _store_later(other_backend, [(0.2, tid, states.FAILURE, b"failed")])
    started = time.monotonic()
    got = backend.wait(tid, 10.0)
    writer.join()
    assert got == b"failed"
    assert time.monotonic() - started < 5.0


def test_wait_returns_at_once_when_already_ready(backend: ResultBackend, names: Names) -> None:
    tid = names.key("task")
    backend.store(tid, states.REVOKED, b"revoked", LONG_TTL_S)
    started = time.monotonic()
    assert backend.wait(tid, 10.0) == b"revoked"
    assert time.monotonic() - started < 2.0


def test_wait_times_out_with_what_is_stored(backend: ResultBackend, names: Names) -> None:
    tid, missing = names.key("task"), names.key("missing")
    backend.store(tid, states.STARTED, b"started", LONG_TTL_S)
    started = time.monotonic()
    assert backend.wait(tid, 0.3) == b"started"
    assert 0.25 <= time.monotonic() - started < 5.0
    started = time.monotonic()
    assert backend.wait(missing, 0.3) is None
    assert 0.25 <= time.monotonic() - started < 5.0


def test_add_member_is_an_idempotent_set(
    backend: ResultBackend, other_backend: ResultBackend, names: Names
) -> None:
    key, other = names.key("group"), names.key("group")
    assert backend.add_member(key, "m1", LONG_TTL_S) == 1
    assert backend.add_member(key, "m1", LONG_TTL_S) == 1
    assert other_backend.add_member(key, "m2", LONG_TTL_S) == 2
    assert backend.add_member(key, "m2", None) == 2
    assert backend.add_member(other, "m1", LONG_TTL_S) == 1
    assert backend.add_member(key, "m3", LONG_TTL_S) == 3


def test_concurrent_add_member_counts_each_member_once(
    backend: ResultBackend, other_backend: ResultBackend, names: Names
) -> None:
    key = names.key("chord")
    sizes: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def add(b: ResultBackend, start: int) -> None:
        try:
            for i in range(start, start + 30):
                size = b.add_member(key, f"m{i % 40}", LONG_TTL_S)  # overlapping members
                with lock:
                    sizes.append(size)
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [
        threading.Thread(target=add, args=(b, s))
        for b, s in [(backend, 0), (other_backend, 10), (backend, 20)]
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert len(sizes) == 90
    assert max(sizes) == 40
    assert backend.add_member(key, "m0", LONG_TTL_S) == 40


def test_member_sets_expire(backend: ResultBackend, names: Names) -> None:
    key = names.key("group")
    assert backend.add_member(key, "m1", SHORT_TTL_S) == 1
    assert backend.add_member(key, "m2", SHORT_TTL_S) == 2
    time.sleep(SHORT_TTL_S + 0.25)
    assert backend.add_member(key, "m3", LONG_TTL_S) == 1


def test_delete(backend: ResultBackend, names: Names) -> None:
    tid, kept = names.key("task"), names.key("kept")
    backend.store(tid, states.SUCCESS, b"x", LONG_TTL_S)
    backend.store(kept, states.SUCCESS, b"y", LONG_TTL_S)
    backend.delete(tid)
    assert backend.fetch(tid) is None
    assert backend.fetch(kept) == b"y"
    backend.delete(tid)  # deleting nothing is fine
    backend.delete(names.key("never-stored"))


def test_cleanup_removes_expired_records_only(
    backend: ResultBackend, names: Names, kind: str
) -> None:
    gone = [names.key("gone"), names.key("gone")]
    kept, forever = names.key("kept"), names.key("forever")
    for tid in gone:
        backend.store(tid, states.SUCCESS, b"old", SHORT_TTL_S)
    backend.store(kept, states.SUCCESS, b"kept", LONG_TTL_S)
    backend.store(forever, states.SUCCESS, b"forever", None)
    time.sleep(SHORT_TTL_S + 0.25)
    removed = backend.cleanup()
    # A store that expires records natively (Redis) has nothing left for cleanup to do.
    assert removed == (0 if kind == "redis" else 2)
    assert backend.fetch_many([*gone, kept, forever]) == [None, None, b"kept", b"forever"]
    assert backend.cleanup() == 0
