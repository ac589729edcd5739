"""Several processes on one SQLite file: every message is acked exactly once, waits see
other processes' publishes, and the file's failure modes are reported by name."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from stem.backends.sqlite import SQLiteBackend
from stem.brokers.base import Message
from stem.brokers.sqlite import POLL_MAX_S, POLL_MIN_S, SQLiteBroker, Wake
from stem.errors import BackendConnectionError, BackendError, BrokerConnectionError, BrokerError

ROOT = Path(__file__).resolve().parents[2]
TOTAL = 1500
PROCESSES = 3

# A consumer: opens the file at once (schema creation races with the others), waits for the
# start flag so all consumers compete, then reserves, acks and records what it saw. It reads
# the "done" flag before reserving, so an empty reserve after the flag means the queue is
# drained.
CONSUMER = """
import json, os, sys, time
from stem.brokers.sqlite import SQLiteBroker
url, out, start_flag, done_flag = sys.argv[1:5]
broker = SQLiteBroker(url)
broker.ping()
open(out + ".ready", "w").close()
while not os.path.exists(start_flag):
    time.sleep(0.01)
ids, counts, held = [], [], 0
while True:
    finished = os.path.exists(done_flag)
    got = broker.reserve(["work"], 10, 60.0, wait_s=0.1)
    if not got:
        if finished:
            break
        continue
    held += broker.ack(got)
    ids.extend(d.message_id for d in got)
    counts.extend(d.delivery_count for d in got)
broker.close()
with open(out, "w") as f:
    json.dump({"ids": ids, "counts": counts, "held": held}, f)
"""


def test_processes_share_one_file_without_losing_or_doubling(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db' / 'stem.db'}"  # a fresh file: schema creation races too
    start_flag, done_flag = tmp_path / "start", tmp_path / "done"
    outs = [tmp_path / f"out-{i}.json" for i in range(PROCESSES)]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONSUMER, url, str(out), str(start_flag), str(done_flag)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for out in outs
    ]
    try:
        producer = SQLiteBroker(url)
        try:
            producer.publish([Message(f"m{i:05}", "work", b"x") for i in range(TOTAL // 2)])
            deadline = time.monotonic() + 60
            while not all(Path(f"{out}.ready").exists() for out in outs):
                assert time.monotonic() < deadline, "consumers did not start"
                assert all(p.poll() is None for p in procs), "a consumer died"
                time.sleep(0.01)
            start_flag.touch()
            sent = TOTAL // 2
            size = 1
            while sent < TOTAL:  # then batches of 1, 2, 4 ... 64 while the consumers run
                n = min(size, TOTAL - sent)
                producer.publish([Message(f"m{i:05}", "work", b"x") for i in range(sent, sent + n)])
                sent += n
                size = 1 if size >= 64 else size * 2
                if sent % 100 < n:
                    time.sleep(0.01)
        finally:
            producer.close()
        done_flag.touch()
        logs = [p.communicate(timeout=90)[0].decode(errors="replace") for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    assert [p.returncode for p in procs] == [0] * PROCESSES, "\n".join(logs)

    results = [json.loads(out.read_text()) for out in outs]
    ids = [m for r in results for m in r["ids"]]
    assert len(ids) == TOTAL  # nothing delivered twice
    assert sorted(ids) == [f"m{i:05}" for i in range(TOTAL)]  # nothing lost
    assert sum(r["held"] for r in results) == TOTAL  # every ack found its lease
    assert {c for r in results for c in r["counts"]} == {1}  # never leased twice
    check = SQLiteBroker(url)
    try:
        [stats] = check.stats(["work"])
        assert (stats.ready, stats.delayed, stats.reserved, stats.dead) == (0, 0, 0, 0)
    finally:
        check.close()


def test_waiting_reserve_sees_a_publish_from_another_process(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    broker = SQLiteBroker(url)
    try:
        broker.ping()  # the schema exists before the publisher starts
        publisher = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import sys, time\n"
                "from stem.brokers.base import Message\n"
                "from stem.brokers.sqlite import SQLiteBroker\n"
                "time.sleep(0.3)\n"
                "b = SQLiteBroker(sys.argv[1])\n"
                "b.publish([Message('from-afar', 'q', b'x')])\n"
                "b.close()\n",
                url,
            ],
            env={**os.environ, "PYTHONPATH": str(ROOT)},
        )
        try:
            got = broker.reserve(["q"], 1, 30.0, wait_s=30.0)
        finally:
            publisher.wait(60)
        assert publisher.returncode == 0
        assert [d.message_id for d in got] == ["from-afar"]
    finally:
        broker.close()


def record_waits(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """From now on, the sleeps of waits (each is still slept), in order."""
    slept: list[float] = []

    def record(self: Wake, seen: int, timeout_s: float) -> None:
        slept.append(timeout_s)
        time.sleep(timeout_s)

    monkeypatch.setattr(Wake, "wait", record)
    return slept


@pytest.mark.parametrize("store", ["broker", "backend"])
def test_waits_look_often_at_first_then_less_often(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, store: str
) -> None:
    """Another process's write is seen by polling: soon after a wait starts (a reply is
    often on its way, as when a caller waits on each result in turn), rarely later."""
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    client = SQLiteBroker(url) if store == "broker" else SQLiteBackend(url)
    client.ping()  # the connection opened first: opening it is no part of the wait
    slept = record_waits(monkeypatch)
    try:
        if isinstance(client, SQLiteBroker):
            assert client.reserve(["q"], 1, 30.0, wait_s=0.3) == []
        else:
            assert client.wait("no-such-task", 0.3) is None
    finally:
        client.close()
    # Soon at first (the first look's own time counts: a busy machine may take a few ms).
    assert POLL_MIN_S <= slept[0] <= POLL_MAX_S / 4
    assert slept == sorted(slept[:-1]) + slept[-1:]  # growing (the last is what was left)
    assert max(slept) == POLL_MAX_S


def test_an_idle_worker_polls_less_and_less_across_its_reserves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker reserves again and again: each call started over at the shortest sleep,
    so an idle worker looked 60-70 times a second per queue set. Now the idle time runs
    across calls (and past POLL_IDLE_AFTER_S the sleeps are POLL_IDLE_S), until a message
    comes."""
    import stem.brokers.sqlite as sqlite_broker

    monkeypatch.setattr(sqlite_broker, "POLL_IDLE_AFTER_S", 0.4)
    monkeypatch.setattr(sqlite_broker, "POLL_IDLE_S", 0.05)
    broker = SQLiteBroker(f"sqlite:///{tmp_path / 'stem.db'}")
    broker.ping()
    slept = record_waits(monkeypatch)
    try:
        assert broker.reserve(["q"], 1, 30.0, wait_s=0.2) == []
        slept.clear()
        assert broker.reserve(["q"], 1, 30.0, wait_s=0.6) == []
        assert slept[0] >= POLL_MAX_S  # not back to the shortest sleep
        assert 0.05 in slept  # idle past POLL_IDLE_AFTER_S
        broker.publish([Message("m", "q", b"x")])
        assert [d.message_id for d in broker.reserve(["q"], 1, 30.0, wait_s=1.0)] == ["m"]
        slept.clear()
        assert broker.reserve(["q"], 1, 30.0, wait_s=0.1) == []
        assert slept[0] <= POLL_MAX_S / 4  # a message came: soon again
    finally:
        broker.close()


def test_a_result_wait_keeps_looking_often_however_long_it_waits(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a worker's wait for messages slows down when idle: get() on a long task saw
    its result up to POLL_IDLE_S late."""
    import stem.brokers.sqlite as sqlite_broker

    monkeypatch.setattr(sqlite_broker, "POLL_IDLE_AFTER_S", 0.1)
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'stem.db'}")
    backend.ping()
    slept = record_waits(monkeypatch)
    try:
        assert backend.wait("no-such-task", 0.4) is None
    finally:
        backend.close()
    assert max(slept) == POLL_MAX_S


def test_broker_and_backend_share_one_file(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    broker, backend = SQLiteBroker(url), SQLiteBackend(url)
    try:
        broker.publish([Message("m", "q", b"x")])
        backend.store("t", "SUCCESS", b"result", None)
        assert [d.message_id for d in broker.reserve(["q"], 1, 30.0)] == ["m"]
        assert backend.fetch("t") == b"result"
    finally:
        broker.close()
        backend.close()


def test_an_unusable_path_is_named_in_the_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    url = f"sqlite:///{blocker / 'sub' / 'stem.db'}"
    with pytest.raises(BrokerConnectionError, match=re.escape(str(blocker))):
        SQLiteBroker(url).ping()
    with pytest.raises(BackendConnectionError, match=re.escape(str(blocker))):
        SQLiteBackend(url).ping()
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not an SQLite database, not at all" * 10)
    with pytest.raises(BrokerConnectionError, match=re.escape(str(garbage))):
        SQLiteBroker(f"sqlite:///{garbage}").ping()


def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'stem.db'}"
    first = SQLiteBroker(url)
    first.ping()
    first.close()
    with sqlite3.connect(tmp_path / "stem.db") as conn:
        conn.execute("UPDATE stem_schema SET version = 99 WHERE component = 'broker'")
    conn.close()
    with pytest.raises(BrokerError, match="schema version 99"):
        SQLiteBroker(url).ping()


def test_a_row_with_mistyped_columns_does_not_stop_other_queues(tmp_path: Path) -> None:
    """A row written by something else than Stem (a text priority and delivery count)
    used to fail every reserve of a worker serving several queues."""
    db = tmp_path / "stem.db"
    broker = SQLiteBroker(f"sqlite:///{db}")
    try:
        broker.publish([Message("good-a", "a", b"{}"), Message("good-b", "b", b"{}")])
        raw = sqlite3.connect(db)
        raw.execute(
            "INSERT INTO stem_messages (message_id, queue, priority, visible_ms, "
            "delivery_count, body) VALUES ('odd', 'a', 'high', 0, 'x', x'78')"
        )
        raw.commit()
        raw.close()
        got = broker.reserve(["a", "b"], 10, 30.0)
        assert sorted(d.message_id for d in got) == ["good-a", "good-b", "odd"]
        assert all(isinstance(d.delivery_count, int) for d in got)
    finally:
        broker.close()


def test_rows_whose_text_is_not_utf8_are_delivered_and_dead_lettered(tmp_path: Path) -> None:
    """A row (or a dead letter) written by something else than Stem whose message id or
    body is not UTF-8 text made every reserve of its queue fail (and dlq list): the
    queue stood still, nothing reached the worker to be dead-lettered. One whose time is
    not a number was never due."""
    db = tmp_path / "stem.db"
    broker = SQLiteBroker(f"sqlite:///{db}")
    try:
        broker.publish([Message("good", "a", b"{}")])
        raw = sqlite3.connect(db)
        raw.execute(
            "INSERT INTO stem_messages (message_id, queue, priority, visible_ms, body) "
            "VALUES (CAST(x'fffe' AS TEXT), 'a', 0, 0, x'7b7d'), "
            "('bad-body', 'a', 0, 0, CAST(x'7bff7d' AS TEXT)), "
            "('text-time', 'a', 0, 'soon', x'7b7d'), "
            "(CAST(x'fe' AS TEXT), 'a', 0, 0, x'7b7d')"  # not to be taken for another
        )
        raw.execute("INSERT INTO stem_queues (name) VALUES (CAST(x'71ff' AS TEXT))")
        raw.execute(
            "INSERT INTO stem_dead_letters (message_id, queue, priority, body, reason, "
            "detail, dead_ms, delivery_count) VALUES (CAST(x'ff' AS TEXT), 'b', 0, x'7b7d', "
            "CAST(x'ff72' AS TEXT), CAST(x'ff64' AS TEXT), 0, 1)"
        )
        raw.commit()
        raw.close()
        assert [(s.ready, s.delayed) for s in broker.stats(["a"])] == [(5, 0)]
        assert "q\\xff" in {s.queue for s in broker.stats()}  # failed every queue's depths
        got = broker.reserve(["a"], 10, 30.0)
        ids = sorted(d.message_id for d in got)
        assert ids == ["\\xfe", "\\xff\\xfe", "bad-body", "good", "text-time"]
        assert {d.message_id: d.body for d in got}["bad-body"] == b"{\xff}"
        for d in got:
            if d.message_id not in ("good", "text-time", "\\xfe"):
                assert broker.dead_letter(d, "malformed", "not a Stem message")
        letters = {d.message_id: d for d in broker.dlq_list()}
        assert sorted(letters) == ["\\xff", "\\xff\\xfe", "bad-body"]
        assert letters["\\xff"].reason == "\\xffr" and letters["\\xff"].detail == "\\xffd"
        assert letters["bad-body"].body == b"{\xff}" and letters["bad-body"].reason == "malformed"
        assert broker.dlq_get(letters["\\xff"].id) is not None
        assert broker.dlq_replay(queue="a") == 2
    finally:
        broker.close()


def test_claims_written_by_swap_are_swept_too_and_queue_names_are_not_hoarded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Heartbeats, rate and concurrency limits write claims with swap: an unsigned
    deployment (no claim() at all) must still drop them once expired. And one-off queues
    (a control request's replies) must not pile up in an instance's memory."""
    from stem.brokers import sqlite as sqlite_mod

    broker = SQLiteBroker(f"sqlite:///{tmp_path / 'stem.db'}")
    try:
        for i in range(5):
            assert broker.swap(f"rate:k{i}", None, "1", 0.01)
        time.sleep(0.05)
        broker._next_claim_sweep = 0.0
        assert broker.swap("workers:n", None, "{}", 60.0)
        rows = sqlite3.connect(tmp_path / "stem.db").execute("SELECT count(*) FROM stem_claims")
        assert rows.fetchone()[0] == 1

        monkeypatch.setattr(sqlite_mod, "_KNOWN_MAX", 10)
        caller = SQLiteBroker(f"sqlite:///{tmp_path / 'stem.db'}")  # drops the replies
        try:
            for i in range(50):
                broker.publish([Message(f"m{i}", f"stem.reply.{i}", b"x")])
                caller.drop(f"stem.reply.{i}")
        finally:
            caller.close()
        broker.publish([Message("m", "kept", b"x")])
        assert len(broker._known) <= 11
        assert "kept" in {s.queue for s in broker.stats()}
    finally:
        broker.close()


def _hold_and_queue(backend: SQLiteBackend, rows: list[tuple[str, str]]) -> tuple[Any, list[Any]]:
    """Hold the backend's connection, and start a thread storing each (task_id, state):
    all of them wait their turn, queued for one commit. Returns (the held lock, results),
    results filling with None or the exception each store raised."""
    import threading

    lock = backend._db._lock
    lock.acquire()
    results: list[Any] = []

    def store(task_id: str, state: str) -> None:
        try:
            backend.store(task_id, state, f"body-{task_id}".encode(), None)
            results.append(None)
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=store, args=row) for row in rows]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 10
    while len(backend._pending) < len(rows):
        assert time.monotonic() < deadline, "the stores never queued"
        time.sleep(0.005)
    return (lock, threads), results


def test_results_stored_at_once_share_one_commit(tmp_path: Path) -> None:
    from stem.backends import sqlite as backend_mod

    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'stem.db'}")
    commits: list[int] = []
    original = backend_mod.SQLiteBackend._commit_pending

    def counting(self: SQLiteBackend, conn: sqlite3.Connection) -> None:
        commits.append(len(self._pending))
        original(self, conn)

    try:
        backend.ping()
        backend_mod.SQLiteBackend._commit_pending = counting  # type: ignore[method-assign]
        (lock, threads), results = _hold_and_queue(
            backend, [(f"t{i}", "SUCCESS") for i in range(5)]
        )
        lock.release()
        for t in threads:
            t.join(10)
        assert results == [None] * 5
        assert commits == [5]  # one transaction; the four others found theirs written
        reader = sqlite3.connect(tmp_path / "stem.db")
        rows = dict(reader.execute("SELECT task_id, body FROM stem_results").fetchall())
        reader.close()
        assert rows == {f"t{i}": f"body-t{i}".encode() for i in range(5)}
    finally:
        backend_mod.SQLiteBackend._commit_pending = original  # type: ignore[method-assign]
        backend.close()


def test_a_failed_group_commit_fails_every_store_in_it_and_writes_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stem.backends import sqlite as backend_mod

    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'stem.db'}")
    try:
        backend.store("before", "SUCCESS", b"kept", None)
        (lock, threads), results = _hold_and_queue(
            backend, [(f"t{i}", "SUCCESS") for i in range(3)]
        )
        broken = dict(backend_mod._Q, store="INSERT INTO no_such_table VALUES (?, ?, ?, ?)")
        monkeypatch.setattr(backend_mod, "_Q", broken)
        lock.release()
        for t in threads:
            t.join(10)
        assert not any(t.is_alive() for t in threads), "a store waits forever"
        assert len(results) == 3
        assert all(isinstance(r, BackendError) and "no_such_table" in str(r) for r in results)
        assert len({id(r) for r in results}) == 3  # each caller raises its own exception
        monkeypatch.undo()
        assert [backend.fetch(f"t{i}") for i in range(3)] == [None] * 3
        backend.store("after", "SUCCESS", b"fine", None)  # the connection is still usable
        assert backend.fetch("after") == b"fine" and backend.fetch("before") == b"kept"
    finally:
        backend.close()


def test_connections_to_one_file_in_a_process_take_turns(tmp_path: Path) -> None:
    """The broker and the result backend on one file (the default) share a lock: their
    writes take turns here instead of meeting SQLite's busy handler, which sleeps for
    milliseconds at a time. However the path is spelled."""
    (tmp_path / "link").symlink_to(tmp_path)
    broker = SQLiteBroker(f"sqlite:///{tmp_path / 'stem.db'}")
    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'link' / 'stem.db'}")
    other = SQLiteBackend(f"sqlite:///{tmp_path / 'other.db'}")
    try:
        assert broker._db._lock is backend._db._lock
        assert other._db._lock is not broker._db._lock
    finally:
        for closing in (broker, backend, other):
            closing.close()


def test_a_publish_wakes_a_waiting_reserve_however_the_path_is_spelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Waiters in this process are woken by a publish to the same file through another
    spelling of its path, not only by polling (made a minute long here)."""
    import stem.brokers.sqlite as sqlite_broker

    monkeypatch.setattr(sqlite_broker, "POLL_MIN_S", 60.0)
    monkeypatch.setattr(sqlite_broker, "POLL_MAX_S", 60.0)
    (tmp_path / "link").symlink_to(tmp_path)
    consumer = SQLiteBroker(f"sqlite:///{tmp_path / 'link' / 'stem.db'}")
    producer = SQLiteBroker(f"sqlite:///{tmp_path / 'stem.db'}")
    got: list[Any] = []
    try:
        consumer.ping()
        waiting = threading.Thread(
            target=lambda: got.extend(consumer.reserve(["work"], 1, 60.0, wait_s=60.0))
        )
        waiting.start()
        time.sleep(0.2)  # let the reserve find the queue empty and start waiting
        producer.publish([Message("m1", "work", b"{}")])
        waiting.join(timeout=10)  # a hang bound: polling alone would take a minute
        assert not waiting.is_alive()
        assert [d.message_id for d in got] == ["m1"]
    finally:
        consumer.close()
        producer.close()


def test_a_store_whose_connection_failed_is_not_written_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A record whose store raised (the file could not be opened) must not be committed by
    the next store: by then it may be stale (another worker ran the task to SUCCESS)."""
    from stem.brokers.sqlite import SQLiteDatabase

    backend = SQLiteBackend(f"sqlite:///{tmp_path / 'stem.db'}")
    try:
        backend.ping()
        real_connect = SQLiteDatabase._connect

        def broken(self: SQLiteDatabase) -> sqlite3.Connection:
            raise sqlite3.OperationalError("unable to open database file")

        monkeypatch.setattr(SQLiteDatabase, "_connect", broken)
        with pytest.raises(BackendConnectionError):
            backend.store("t", "STARTED", b"stale", None)
        monkeypatch.setattr(SQLiteDatabase, "_connect", real_connect)
        backend.store("other", "SUCCESS", b"fine", None)
        assert backend.fetch("t") is None
    finally:
        backend.close()
