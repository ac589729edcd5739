"""Remote control against two real workers (threads in this process, memory broker)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from stem import Stem, TaskError, control, states
from stem.errors import StemError
from stem.testing import memory_app, running_worker


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()
    yield a
    a.close()


def _wait_nodes(app: Stem, n: int) -> list[str]:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        nodes = control.live_nodes(app)
        if len(nodes) >= n:
            return nodes
        time.sleep(0.05)
    raise AssertionError(f"expected {n} live nodes, got {control.live_nodes(app)}")


def _beat(app: Stem) -> None:
    """Stand-in heartbeat publisher until the observability module registers nodes."""
    from stem.observability import signals

    def write(worker: Any, health: dict[str, Any], **_: Any) -> None:
        import json

        key = f"workers:{worker.name}"
        app.broker.swap(key, app.broker.peek(key), json.dumps(health), 5.0)

    signals.heartbeat.connect(write)


@pytest.fixture
def two(app: Stem) -> Iterator[tuple[Any, Any]]:
    _beat(app)
    with (
        running_worker(app, node_name="alpha", queues=("default", "mail")) as a,
        running_worker(app, node_name="beta", queues=("default", "mail")) as b,
    ):
        _wait_nodes(app, 2)
        yield a, b


def test_ping_reaches_every_worker(app: Stem, two: Any) -> None:
    replies = control.broadcast(app, "ping")
    assert [(r.worker, r.ok, r.result) for r in replies] == [
        ("alpha", True, "pong"),
        ("beta", True, "pong"),
    ]
    only = control.broadcast(app, "ping", destination=["beta"])
    assert [r.worker for r in only] == ["beta"]


def _internal_queues(app: Stem) -> list[str]:
    return [s.queue for s in app.broker.stats() if s.queue.startswith("stem.")]


def test_control_calls_and_stopped_workers_leave_no_queues_behind(app: Stem) -> None:
    _beat(app)
    with running_worker(app, node_name="alpha", queues=("default",)):
        _wait_nodes(app, 1)
        for _ in range(3):
            assert [r.result for r in control.broadcast(app, "ping")] == ["pong"]
        assert _internal_queues(app) == ["stem.control.alpha"]
    assert _internal_queues(app) == []


def test_a_request_answered_after_its_deadline_gets_no_reply(
    app: Stem, caplog: pytest.LogCaptureFixture
) -> None:
    _beat(app)
    with running_worker(app, node_name="alpha", queues=("default",)) as w:
        _wait_nodes(app, 1)
        assert w._control is not None
        release = threading.Event()

        def slow(*_: Any, **__: Any) -> Any:
            release.wait(10)
            return "late"

        w._control.dispatch = slow  # type: ignore[method-assign]
        replies = control.broadcast(app, "ping", timeout_s=0.5, report_silent=True)
        assert [(r.worker, r.answered) for r in replies] == [("alpha", False)]
        with caplog.at_level("INFO", logger="stem.control"):
            release.set()
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and not any(
                getattr(r, "event", None) == "control-reply-late" for r in caplog.records
            ):
                time.sleep(0.05)
        assert any(getattr(r, "event", None) == "control-reply-late" for r in caplog.records)
        assert not [q for q in _internal_queues(app) if q.startswith("stem.reply.")]


def test_a_node_name_without_host_reaches_that_node(app: Stem) -> None:
    _beat(app)
    with (
        running_worker(app, node_name="alpha@h1", queues=("default",)),
        running_worker(app, node_name="beta@h1", queues=("default",)),
        running_worker(app, node_name="beta@h2", queues=("default",)),
        running_worker(app, node_name="gamma", queues=("default",)),
        running_worker(app, node_name="gamma@h2", queues=("default",)),
    ):
        _wait_nodes(app, 5)
        [reply] = control.broadcast(app, "ping", destination=["gamma"])  # exact name wins
        assert reply.worker == "gamma"
        [reply] = control.broadcast(app, "ping", destination=["alpha"])
        assert reply.worker == "alpha@h1"
        with pytest.raises(StemError, match="matches beta@h1, beta@h2: give the full name"):
            control.broadcast(app, "ping", destination=["beta"])
        [reply] = control.broadcast(app, "ping", destination=["beta@h2"])
        assert reply.worker == "beta@h2"


def test_stats_registered_active_reserved(app: Stem, two: Any) -> None:
    gate = threading.Event()

    @app.task(name="hold")
    def hold() -> None:
        gate.wait(5)

    res = hold.delay()
    deadline = time.monotonic() + 5
    active: list[Any] = []
    while not active and time.monotonic() < deadline:
        active = [a for r in control.broadcast(app, "active") for a in r.result]
    assert [a["id"] for a in active] == [res.id]
    assert all(r.result == [] for r in control.broadcast(app, "reserved"))
    assert all(r.result == ["hold"] for r in control.broadcast(app, "registered"))
    stats = {r.worker: r.result for r in control.broadcast(app, "stats")}
    assert stats["alpha"]["pool"] == "thread" and "consuming" in stats["beta"]
    gate.set()
    res.get(timeout=5)


def test_revoke_before_start_and_terminate_while_running(app: Stem, two: Any) -> None:
    started = threading.Event()

    @app.task(name="long")
    def long() -> str:
        started.set()
        for _ in range(500):
            time.sleep(0.01)
        return "finished"

    later = long.enqueue(countdown=1.0)
    control.revoke(app, [later.id])
    control.broadcast(app, "revoke", {"ids": [later.id]})
    with pytest.raises(TaskError, match="TaskRevoked"):
        later.get(timeout=5)
    assert later.state == states.REVOKED

    running = long.delay()
    assert started.wait(5)
    control.revoke(app, [running.id])
    replies = control.broadcast(app, "revoke", {"ids": [running.id], "terminate": True})
    assert [running.id] in [r.result["terminated"] for r in replies]
    with pytest.raises(TaskError, match="TaskRevoked"):
        running.get(timeout=5)


def test_revocations_survive_worker_restarts(app: Stem) -> None:
    @app.task(name="noop")
    def noop() -> None: ...

    res = noop.delay()
    control.revoke(app, [res.id])
    with running_worker(app):
        with pytest.raises(TaskError, match="TaskRevoked"):
            res.get(timeout=5)


def test_pause_resume_and_queue_status(app: Stem, two: Any) -> None:
    @app.task(name="mailer", queue="mail")
    def mailer() -> str:
        return "sent"

    assert all(r.ok for r in control.broadcast(app, "pause", {"queue": "mail"}))
    res = mailer.delay()
    time.sleep(0.5)
    assert res.state == states.PENDING
    status = control.broadcast(app, "queue-status")
    assert all(
        {q["queue"]: q["paused"] for q in r.result} == {"default": False, "mail": True}
        for r in status
    )
    control.broadcast(app, "resume", {"queue": "mail"})
    assert res.get(timeout=5) == "sent"
    bad = control.broadcast(app, "pause", {"queue": "nope"})
    assert not any(r.ok for r in bad) and "does not consume" in str(bad[0].result)


def test_pool_grow_shrink_and_rate_limit(app: Stem, two: Any) -> None:
    @app.task(name="limited", rate_limit="1/s")
    def limited() -> None: ...

    grown = control.broadcast(app, "pool-grow", {"n": 3}, destination=["alpha"])
    assert grown[0].result == {"pool_size": 5}
    shrunk = control.broadcast(app, "pool-shrink", {"n": 10}, destination=["alpha"])
    assert shrunk[0].result == {"pool_size": 1}
    rl = control.broadcast(app, "rate-limit", {"task": "limited", "rate": "50/s"})
    assert all(r.result == {"limited": "50/s"} for r in rl)
    bad = control.broadcast(app, "rate-limit", {"task": "limited", "rate": "lots"})
    assert not any(r.ok for r in bad)


def test_pool_grow_is_bounded_and_the_control_thread_outlives_any_error(
    app: Stem, two: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    huge = control.broadcast(app, "pool-grow", {"n": 100_000}, destination=["alpha"])
    assert not huge[0].ok and "at most 4096" in str(huge[0].result)
    alpha = two[0]
    assert alpha.name == "alpha" and alpha.pool.size == 2
    # A thread the system refuses to start: the grow fails, the pool keeps what it had.
    monkeypatch.setattr(threading.Thread, "start", _refuse_pool_threads(threading.Thread.start))
    refused = control.broadcast(app, "pool-grow", {"n": 2}, destination=["alpha"])
    assert not refused[0].ok and "cannot start a pool thread" in str(refused[0].result)
    assert alpha.pool.size == 2
    monkeypatch.undo()
    # An unexpected error in a command does not end the node's control thread.
    assert alpha._control is not None
    monkeypatch.setattr(alpha._control, "dispatch", _boom)
    assert control.broadcast(app, "ping", destination=["alpha"], timeout_s=0.5) == []
    monkeypatch.undo()
    assert [r.result for r in control.broadcast(app, "ping", destination=["alpha"])] == ["pong"]


def _refuse_pool_threads(start: Any) -> Any:
    def refusing(self: threading.Thread) -> None:
        if self.name.startswith("stem-pool-"):
            raise RuntimeError("can't start new thread")
        start(self)

    return refusing


def _boom(*_: Any) -> Any:
    raise RuntimeError("unexpected")


def test_shutdown_command_stops_one_worker(app: Stem) -> None:
    _beat(app)
    with running_worker(app, node_name="solo-node") as w:
        _wait_nodes(app, 1)
        [reply] = control.broadcast(app, "shutdown", {"mode": "warm"})
        assert reply.ok and reply.result == "shutting down (warm)"
        deadline = time.monotonic() + 5
        while not w._stop_reserving.is_set() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert w._stop_reserving.is_set()


def test_unknown_command_is_refused_locally(app: Stem) -> None:
    with pytest.raises(Exception, match="unknown control command"):
        control.broadcast(app, "format-disk")


def test_autoscale_grows_under_backlog_and_shrinks_when_idle(
    app: Stem, monkeypatch: pytest.MonkeyPatch
) -> None:
    from stem.worker import consumer

    # Every second in service: shrinking 6 -> 1 one slot a pass took 5 s of passes here.
    monkeypatch.setattr(consumer, "AUTOSCALE_EVERY_S", 0.2)

    @app.task(name="work")
    def work() -> None:
        time.sleep(0.2)

    results = [work.delay() for _ in range(30)]
    sizes: list[int] = []
    with running_worker(app, autoscale=(6, 1), autoscale_idle_s=0.25) as w:
        assert w.pool.size == 1
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(r.ready() for r in results):
            sizes.append(w.pool.size)
            time.sleep(0.05)
        assert max(sizes) == 6
        deadline = time.monotonic() + 10
        while w.pool.size > 1 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert w.pool.size == 1


# -- control under signing ----------------------------------------------------------------------


def _signed_app(required: bool = True) -> Stem:
    from stem.security.signing import Keyring

    app = memory_app()
    app.configure(keyring=Keyring.build("hmac-sha256", {"v1": b"c" * 32}, required=required))
    return app


def _request(app: Stem, node: str, command: str, args: dict[str, Any]) -> Any:
    from stem.envelope import Envelope, new_id, now_ms

    return Envelope(
        id=new_id(),
        task=control.CONTROL_TASK,
        queue=control.control_queue(node),
        kwargs={"command": command, "args": args},
        created_ms=now_ms(),
    )


def _send(app: Stem, queue: str, body: bytes) -> None:
    from stem.brokers.base import Message

    app.publish_messages([Message(id=f"m-{time.monotonic_ns()}", queue=queue, body=body)])


def _wait_empty(app: Stem, queue: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        [stats] = app.broker.stats([queue])
        if stats.ready == 0 and stats.reserved == 0:
            time.sleep(0.2)  # the control thread acks before it handles
            return
        time.sleep(0.05)
    raise AssertionError(f"{queue} was never drained")


def test_signed_workers_obey_only_requests_signed_for_them() -> None:
    from stem import envelope as codec

    app = _signed_app()
    try:
        with (
            running_worker(app, node_name="alpha", queues=("default", "mail")) as a,
            running_worker(app, node_name="beta", queues=("default", "mail")) as b,
        ):
            beta_q = control.control_queue("beta")
            pause = _request(app, "beta", "pause", {"queue": "mail"})
            _send(app, beta_q, codec.encode(pause))  # unsigned
            for_alpha = app.seal(_request(app, "alpha", "pause", {"queue": "mail"}))
            _send(app, beta_q, for_alpha)  # signed, but for another node
            _wait_empty(app, beta_q)
            assert b.paused == set() and a.paused == set()

            signed = app.seal(pause)
            _send(app, beta_q, signed)
            _wait_empty(app, beta_q)
            assert b.paused == {"mail"}
            b.paused.clear()
            _send(app, beta_q, signed)  # a captured copy, replayed
            _wait_empty(app, beta_q)
            assert b.paused == set()
    finally:
        app.close()


def test_a_tampered_request_is_refused_while_signing_is_not_required() -> None:
    app = _signed_app(required=False)
    try:
        with running_worker(app, node_name="gamma", queues=("default",)) as w:
            queue = control.control_queue("gamma")
            body = app.seal(_request(app, "gamma", "pool-grow", {"n": 1}))
            size = w.pool.size
            _send(app, queue, body.replace(b'"n":1', b'"n":3'))
            _wait_empty(app, queue)
            assert w.pool.size == size
            assert control.broadcast(app, "ping", destination=["gamma"])[0].result == "pong"
    finally:
        app.close()


def test_a_worker_with_every_queue_paused_is_healthy_not_stalled(app: Stem) -> None:
    """An operator's pause must not read as a stalled consumer (health failing, watchdog
    pings stopping, systemd restarting the node and so dropping the pause)."""
    with running_worker(app, node_name="solo", queues=("default",)) as worker:
        worker.paused.add("default")  # what the pause command does
        worker.last_consume_ms = 1  # the broker last answered long ago: it is not asked
        health = worker.health()
        assert health["consuming"] is True and health["paused"] == ["default"]
        worker.paused.discard("default")
        worker.last_consume_ms = 1
        assert worker.health()["consuming"] is False  # not paused: that would be a stall


def test_the_solo_pool_says_it_cannot_grow(app: Stem) -> None:
    """It used to answer OK and log 'pool size 1 -> 4' while staying at one slot."""
    from stem.errors import StemError
    from stem.worker.consumer import WorkerConfig

    with running_worker(app, node_name="one", pool="solo") as worker:
        from stem.worker.control import ControlServer

        server = ControlServer(worker)
        with pytest.raises(ValueError, match="solo pool has one slot"):
            server.dispatch("pool-grow", {"n": 3})
        worker.resize(4)
        assert worker.pool.size == 1
    with pytest.raises(StemError, match="autoscale needs a pool that can grow"):
        WorkerConfig(pool="solo", autoscale=(4, 1))


def test_a_verify_only_worker_acts_and_its_refused_reply_is_reported() -> None:
    """Its reply cannot be signed: the caller refuses it, and said only "no reply" to a
    command the worker had carried out (shutdown included), so it would be sent again."""
    from tests.fixtures.keyrings import verify_only_pair

    producer, worker = verify_only_pair("vo-control")
    try:
        with running_worker(worker, node_name="vo@host") as w:
            [reply] = control.broadcast(
                producer,
                "pause",
                {"queue": "default"},
                destination=["vo@host"],
                timeout_s=3.0,
                report_silent=True,
            )
            assert not reply.ok and "1 unsigned reply(ies) refused" in str(reply.result)
            assert "default" in w.paused  # it did act
    finally:
        producer.close()
        worker.close()
