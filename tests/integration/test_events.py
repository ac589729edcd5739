"""The events stream and worker heartbeats, on the in-memory and the SQLite broker, through
the functions behind ``stem events`` and ``stem workers``."""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from stem import Stem
from stem.brokers.base import Message
from stem.cli import observe_cmd
from stem.cli.context import CLIState
from stem.control import revoke
from stem.envelope import dumps, now_ms
from stem.observability.events import (
    EVENTS_QUEUE,
    TASK_EVENTS,
    WORKER_EVENTS,
    EventPublisher,
    enable_events,
    tail,
)
from stem.observability.heartbeats import attach_heartbeats, list_workers, worker_key
from stem.testing import memory_app
from stem.worker.consumer import Worker, WorkerConfig


def _wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.02)


@pytest.fixture(params=["memory", "sqlite"])
def app(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Stem]:
    if request.param == "memory":
        a = memory_app()
    else:
        url = f"sqlite:///{tmp_path / 'stem.db'}"
        a = Stem("events-test", broker=url, backend=url)
    yield a
    a.close()


@contextlib.contextmanager
def observed_worker(app: Stem, **cfg: Any) -> Iterator[Worker]:
    """A worker with events and heartbeats attached before it starts (as the CLI does)."""
    cfg.setdefault("pool", "thread")
    cfg.setdefault("concurrency", 2)
    cfg.setdefault("lease_s", 5.0)
    cfg.setdefault("poll_wait_s", 0.1)
    cfg.setdefault("heartbeat_s", 0.2)
    cfg.setdefault("node_name", "w1@test")
    worker = Worker(app, WorkerConfig(**cfg))
    enable_events(worker)
    attach_heartbeats(worker)
    worker.start()
    try:
        yield worker
    finally:
        worker.request_stop()
        worker.shutdown()


def _register(app: Stem) -> Any:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("password=hunter2")

    @app.task(name="flaky", bind=True, max_retries=2, default_retry_delay=0.01, retry_jitter=False)
    def flaky(ctx: Any) -> str:
        if ctx.attempt == 0:
            raise ctx.retry()
        return "ok"

    @app.task(name="never")
    def never() -> None:
        raise AssertionError("revoked task ran")

    return add, boom, flaky, never


def test_stream_carries_every_task_and_worker_event(app: Stem) -> None:
    add, boom, flaky, never = _register(app)
    revoked = never.delay()
    revoke(app, [revoked.id])
    expired = add.enqueue(args=(1, 1), expires=-1)
    with observed_worker(app) as worker:
        ok = add.delay(1, 2)
        bad = boom.delay()
        retried = flaky.delay()
        stray = app.send_task("not.registered")
        assert ok.get(timeout=5) == 3
        assert retried.get(timeout=5) == "ok"
        bad.get(timeout=5, propagate=False)
        _wait_for(lambda: len(app.broker.dlq_list()) == 1 and not worker.inflight)
        time.sleep(0.5)  # at least one heartbeat after the work
    events = list(tail(app.broker, follow=False))

    assert {e["type"] for e in events} == set(TASK_EVENTS) | set(WORKER_EVENTS)
    by_task: dict[str, list[dict[str, Any]]] = {}
    for e in events:
        assert isinstance(e["ts_ms"], int)
        assert len(dumps(e)) < 1024  # small
        if "task_id" in e:
            by_task.setdefault(e["task_id"], []).append(e)

    kinds = [e["type"] for e in by_task[ok.id]]
    assert kinds == ["task-sent", "task-received", "task-started", "task-succeeded"]
    done = by_task[ok.id][-1]
    assert {k: done[k] for k in ("task", "worker", "queue", "attempt", "state")} == {
        "task": "add",
        "worker": "w1@test",
        "queue": "default",
        "attempt": 0,
        "state": "SUCCESS",
    }
    assert "args" not in done and "result" not in done

    failed = next(e for e in by_task[bad.id] if e["type"] == "task-failed")
    assert failed["error"] == "ValueError" and failed["state"] == "FAILURE"
    assert "hunter2" not in json.dumps(events)

    retry = next(e for e in by_task[retried.id] if e["type"] == "task-retried")
    assert (retry["attempt"], retry["state"], retry["delay_s"]) == (0, "RETRY", 0.01)
    assert [e["attempt"] for e in by_task[retried.id] if e["type"] == "task-succeeded"] == [1]

    dead = next(e for e in by_task[stray.id] if e["type"] == "task-dead-lettered")
    assert (dead["reason"], dead["task"]) == ("unknown-task", "not.registered")
    assert [e["type"] for e in by_task[revoked.id]][-1] == "task-revoked"
    gone = by_task[expired.id][-1]
    assert (gone["type"], gone["state"]) == ("task-expired", "EXPIRED")

    worker_events = [e for e in events if e["type"].startswith("worker-")]
    assert worker_events[0]["type"] == "worker-online"
    assert worker_events[-1]["type"] == "worker-offline"
    beat = next(e for e in worker_events if e["type"] == "worker-heartbeat")
    assert beat["worker"] == "w1@test" and beat["concurrency"] == 2
    assert {"running", "processed", "pid", "host"} <= set(beat)
    assert worker_events[-1]["worker"] == "w1@test"


def test_each_event_goes_to_one_tailer(app: Stem) -> None:
    pub = EventPublisher(app, source="p")
    for i in range(7):
        pub.emit({"type": "custom", "n": i})
    pub.close()  # flushes
    first = list(tail(app.broker, follow=False, limit=3))
    second = list(tail(app.broker, follow=False))
    assert [e["n"] for e in first] == [0, 1, 2]
    assert [e["n"] for e in second] == [3, 4, 5, 6]
    assert list(tail(app.broker, follow=False)) == []


def test_a_reader_that_stops_early_leaves_the_rest_for_the_next(app: Stem) -> None:
    """A reader that stops (--limit, Ctrl-C, a pipe closed while writing) used to take a
    whole batch off the stream and show part of it."""
    pub = EventPublisher(app, source="p")
    for i in range(7):
        pub.emit({"type": "custom", "n": i})
    pub.close()
    reader = tail(app.broker, follow=False)
    assert [next(reader)["n"] for _ in range(3)] == [0, 1, 2]
    reader.close()  # what a consumer that stops does
    assert sorted(e["n"] for e in tail(app.broker, follow=False)) == [3, 4, 5, 6]


def test_follow_waits_for_new_events_and_skips_junk(app: Stem) -> None:
    got: list[dict[str, Any]] = []
    stop = threading.Event()

    def reader() -> None:
        for e in tail(app.broker, follow=True, limit=2, wait_s=0.1, stop=stop):
            got.append(e)

    t = threading.Thread(target=reader)
    t.start()
    try:
        time.sleep(0.2)
        app.broker.publish(
            [
                Message(id="j1", queue=EVENTS_QUEUE, body=b"\xff junk"),
                Message(id="j2", queue=EVENTS_QUEUE, body=b"[1, 2]"),
                Message(id="e1", queue=EVENTS_QUEUE, body=dumps({"type": "a"})),
            ]
        )
        time.sleep(0.2)
        app.broker.publish([Message(id="e2", queue=EVENTS_QUEUE, body=dumps({"type": "b"}))])
        t.join(timeout=5)
    finally:
        stop.set()
        t.join(timeout=5)
    assert [e["type"] for e in got] == ["a", "b"]


def test_unread_backlog_is_capped(app: Stem) -> None:
    pub = EventPublisher(app, source="p", max_backlog=5)
    for i in range(8):
        pub.emit({"type": "x", "n": i})
    pub.close()
    (stats,) = app.broker.stats([EVENTS_QUEUE])
    assert stats.ready == 0  # purged: nobody read it and it outgrew max_backlog


def test_a_full_buffer_drops_oldest_counts_and_says_so(
    app: Stem, caplog: pytest.LogCaptureFixture
) -> None:
    pub = EventPublisher(app, source="p", max_buffer=3, flush_interval_s=60.0)
    try:
        for i in range(5):
            pub.emit({"type": "x", "n": i})
        assert pub.dropped == 2
    finally:
        with caplog.at_level("WARNING", logger="stem"):
            pub.close()
    assert [e["n"] for e in tail(app.broker, follow=False)] == [2, 3, 4]
    [line] = [r for r in caplog.records if getattr(r, "event", None) == "events-degraded"]
    assert "2 events dropped" in line.getMessage()


def test_dropped_events_are_told_once_the_warning_limit_allows(
    app: Stem, caplog: pytest.LogCaptureFixture
) -> None:
    """Another warning in the last 30 s holds the count back; it is told later, not lost."""
    pub = EventPublisher(app, source="p", max_buffer=1, flush_interval_s=60.0)
    try:
        with caplog.at_level("WARNING", logger="stem"):
            assert pub._warn("something else") is True
            pub.emit({"type": "x", "n": 0})
            pub.emit({"type": "x", "n": 1})
            pub.flush()
            told = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
            assert told == []
            pub._warned_at -= 31.0
            pub.emit({"type": "x", "n": 2})
            pub.flush()
            told = [r.getMessage() for r in caplog.records if "dropped" in r.getMessage()]
            assert len(told) == 1 and told[0].startswith("1 events dropped")
    finally:
        pub.close()


# -- heartbeats ------------------------------------------------------------------------------


def test_workers_listed_online_then_offline(app: Stem) -> None:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    with observed_worker(app, concurrency=3) as worker:
        add.delay(1, 1).get(timeout=5)
        _wait_for(
            lambda: any(
                (r.get("processed") or {}).get("succeeded") == 1 for r in list_workers(app.broker)
            )
        )
        (row,) = list_workers(app.broker)
        assert row["status"] == "online" and row["offline"] is False
        assert row["worker"] == "w1@test"
        assert (row["host"], row["pid"]) == (worker.health()["host"], worker.health()["pid"])
        assert (row["pool"], row["concurrency"], row["running"]) == ("thread", 3, 0)
        assert row["last_consume_ms"] > 0
        assert row["heartbeat_s"] == 0.2 and row["age_s"] < 1
    (row,) = list_workers(app.broker)
    assert row["status"] == "offline" and row["offline"] is True and row["running"] == 0


def test_a_silent_worker_is_lost_then_gone(app: Stem) -> None:
    worker = Worker(app, WorkerConfig(node_name="ghost", heartbeat_s=0.1, pool="solo"))
    writer = attach_heartbeats(worker, lost_ttl_s=0)  # gone after three beats
    try:
        assert writer.write(worker.health())
        assert [r["status"] for r in list_workers(app.broker)] == ["online"]
        time.sleep(0.22)  # two heartbeats without a beat
        assert [r["status"] for r in list_workers(app.broker)] == ["lost"]
        time.sleep(0.15)  # past the TTL of three heartbeats
        assert list_workers(app.broker) == []
    finally:
        writer.detach()
        worker.pool.stop(kill=True)


def test_a_lost_worker_stays_listed_for_a_minute_but_gets_no_control_requests(
    app: Stem,
) -> None:
    """With fast heartbeats a crashed node would vanish from `stem workers` within a
    second; it stays listed as lost (TTL at least 60 s), and remote control skips it."""
    from stem import control

    worker = Worker(app, WorkerConfig(node_name="crashed", heartbeat_s=0.1, pool="solo"))
    writer = attach_heartbeats(worker)
    try:
        assert writer.write(worker.health())
        assert control.live_nodes(app) == ["crashed"]
        time.sleep(0.5)  # five heartbeats without a beat: past three, the old TTL
        assert [r["status"] for r in list_workers(app.broker)] == ["lost"]
        assert control.live_nodes(app) == []
    finally:
        writer.detach()
        worker.pool.stop(kill=True)


def test_list_workers_skips_junk_and_uses_the_callers_heartbeat(app: Stem) -> None:
    app.broker.swap(worker_key("junk"), None, "not json", 60)
    app.broker.swap(worker_key("old"), None, dumps({"at_ms": now_ms() - 30_000}).decode(), 60)
    (row,) = list_workers(app.broker, heartbeat_s=20.0)
    assert (row["worker"], row["status"]) == ("old", "online")
    assert list_workers(app.broker, heartbeat_s=5.0)[0]["status"] == "lost"


def test_two_live_workers_with_one_name_are_reported(
    app: Stem, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Worker(app, WorkerConfig(node_name="twin", pool="solo"))
    writer = attach_heartbeats(worker)
    try:
        # A predecessor that crashed under the same name beat before we started: no warning.
        old = {"worker": "twin", "host": "elsewhere", "pid": 1, "at_ms": now_ms() - 5_000}
        app.broker.swap(worker_key("twin"), None, dumps(old).decode(), 60)
        with caplog.at_level(logging.WARNING, logger="stem.heartbeats"):
            assert writer.write(worker.health())
        assert not caplog.records
        app.broker.release(worker_key("twin"))
        other = {"worker": "twin", "host": "elsewhere", "pid": 1, "at_ms": now_ms()}
        app.broker.swap(worker_key("twin"), None, dumps(other).decode(), 60)
        with caplog.at_level(logging.WARNING, logger="stem.heartbeats"):
            assert writer.write(worker.health())
        assert any(getattr(r, "event", None) == "worker-name-duplicate" for r in caplog.records)
        assert json.loads(app.broker.peek(worker_key("twin")) or "{}")["host"] != "elsewhere"
    finally:
        writer.detach()
        worker.pool.stop(kill=True)


# -- the CLI functions -----------------------------------------------------------------------


def _cli() -> typer.Typer:
    cli = typer.Typer()
    cli.command("events")(observe_cmd.events)
    cli.command("workers")(observe_cmd.workers)
    return cli


def test_cli_events_and_workers(app: Stem) -> None:
    state = CLIState(_app=app)
    runner = CliRunner()
    cli = _cli()
    app.broker.ping()  # the store exists (on SQLite, `workers` refuses a missing file)
    assert runner.invoke(cli, ["workers"], obj=state).output.strip() == "no workers"

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    with observed_worker(app):
        add.delay(2, 2).get(timeout=5)
        _wait_for(lambda: bool(list_workers(app.broker)))
        out = runner.invoke(cli, ["workers", "--json"], obj=state)
        assert out.exit_code == 0, out.output
        (row,) = json.loads(out.output)
        assert (row["worker"], row["status"]) == ("w1@test", "online")
        table = runner.invoke(cli, ["workers"], obj=state, env={"COLUMNS": "200"})
        assert "w1@test" in table.output and "online" in table.output

    out = runner.invoke(cli, ["events", "--no-follow", "--json", "--limit", "2"], obj=state)
    assert out.exit_code == 0, out.output
    lines = [json.loads(line) for line in out.output.splitlines()]
    assert [e["type"] for e in lines] == ["worker-online", "task-sent"]
    out = runner.invoke(cli, ["events", "--no-follow"], obj=state)
    assert out.exit_code == 0, out.output
    text = out.output.splitlines()
    assert any("task-succeeded" in line and "add" in line for line in text)
    assert "worker-offline" in text[-1]
