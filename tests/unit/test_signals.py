"""Every lifecycle signal fires, with the payload its receivers are promised."""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from stem import Stem, states
from stem.brokers.base import Delivery, Message
from stem.control import revoke
from stem.envelope import Envelope
from stem.observability import signals
from stem.result import ErrorInfo
from stem.testing import memory_app, running_worker

ALL = [v for v in vars(signals).values() if isinstance(v, signals.Signal)]


class Recorder:
    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []
        self._lock = threading.Lock()
        self._receiver = self.record  # one object, so disconnect finds it

    def record(self, **payload: Any) -> None:
        with self._lock:
            self.calls.append(payload)

    def of(self, name: str, **match: Any) -> list[dict[str, Any]]:
        with self._lock:
            calls = list(self.calls)
        return [
            c
            for c in calls
            if c["signal"] == name
            and all(
                getattr(c.get("envelope"), "id", None) == v if k == "task_id" else c.get(k) == v
                for k, v in match.items()
            )
        ]

    def names(self) -> list[str]:
        with self._lock:
            return [c["signal"] for c in self.calls]

    def wait(self, name: str, timeout_s: float = 5.0, **match: Any) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.of(name, **match)
            if found:
                return found[0]
            time.sleep(0.01)
        raise AssertionError(f"signal {name} {match} did not fire; saw {self.names()}")


@pytest.fixture
def rec() -> Iterator[Recorder]:
    r = Recorder()
    for sig in ALL:
        sig.connect(r._receiver)
    yield r
    for sig in ALL:
        sig.disconnect(r._receiver)


@pytest.fixture
def app() -> Iterator[Stem]:
    a = memory_app()
    yield a
    a.close()


def Running(app: Stem, **cfg: Any) -> Any:
    cfg.setdefault("lease_s", 2.0)
    cfg.setdefault("heartbeat_s", 0.2)
    return running_worker(app, **cfg)


def test_publish_signals_carry_the_envelope(app: Stem, rec: Recorder) -> None:
    res = app.send_task("anything", (1,), {"k": "v"}, queue="q1")
    before = rec.wait("before_publish", task_id=res.id)
    after = rec.wait("after_publish", task_id=res.id)
    for call in (before, after):
        env = call["envelope"]
        assert isinstance(env, Envelope)
        assert (env.task, env.args, dict(env.kwargs), env.queue) == (
            "anything",
            (1,),
            {"k": "v"},
            "q1",
        )
    assert rec.names().index("before_publish") < rec.names().index("after_publish")


def test_success_path_and_worker_lifecycle(app: Stem, rec: Recorder) -> None:
    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    with Running(app) as worker:
        res = add.delay(2, 3)
        assert res.get(timeout=5) == 5
        rec.wait("task_postrun", task_id=res.id)
        beat = rec.wait("heartbeat")
    assert beat["worker"] is worker
    health = beat["health"]
    for key in ("worker", "host", "pid", "concurrency", "running", "processed", "at_ms"):
        assert key in health
    assert health["worker"] == worker.name

    for name in ("task_received", "task_prerun", "task_success", "task_postrun"):
        (call,) = rec.of(name, task_id=res.id)
        assert call["envelope"].task == "add"
    assert rec.of("task_success", task_id=res.id)[0]["result"] == 5
    assert rec.of("task_postrun", task_id=res.id)[0]["state"] == states.SUCCESS
    order = [
        c["signal"]
        for c in rec.calls
        if getattr(c.get("envelope"), "id", None) == res.id and c["signal"].startswith("task_")
    ]
    assert order == ["task_received", "task_prerun", "task_success", "task_postrun"]

    lifecycle = [n for n in rec.names() if n.startswith("worker_")]
    assert lifecycle == ["worker_init", "worker_ready", "worker_shutting_down", "worker_shutdown"]
    for name in lifecycle:
        (call,) = rec.of(name)
        assert call["worker"] is worker


def test_failure_signals_carry_error_info(app: Stem, rec: Recorder) -> None:
    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("bad input")

    with Running(app):
        res = boom.delay()
        call = rec.wait("task_failure", task_id=res.id)
        post = rec.wait("task_postrun", task_id=res.id)
    error = call["error"]
    assert isinstance(error, ErrorInfo)
    assert (error.type, error.message) == ("ValueError", "bad input")
    assert post["state"] == states.FAILURE
    assert not rec.of("task_success", task_id=res.id)


def test_retry_signal_carries_delay_and_error(app: Stem, rec: Recorder) -> None:
    @app.task(name="flaky", bind=True, max_retries=2, default_retry_delay=0.05, retry_jitter=False)
    def flaky(ctx: Any) -> int:
        if ctx.attempt == 0:
            raise ctx.retry(exc=ConnectionError("down"))
        return int(ctx.attempt)

    with Running(app):
        res = flaky.delay()
        assert res.get(timeout=5) == 1
        call = rec.wait("task_retry", task_id=res.id)
    assert call["envelope"].attempt == 0
    assert call["delay_s"] == pytest.approx(0.05)
    assert isinstance(call["error"], ErrorInfo) and call["error"].type == "ConnectionError"
    (success,) = rec.of("task_success", task_id=res.id)
    assert success["envelope"].attempt == 1


def test_unknown_task_is_rejected_with_reason(app: Stem, rec: Recorder) -> None:
    with Running(app):
        res = app.send_task("nobody.registered.this")
        unknown = rec.wait("task_unknown", task_id=res.id)
        rejected = rec.wait("task_rejected", task_id=res.id)
    assert unknown["envelope"].task == "nobody.registered.this"
    assert rejected["reason"] == "unknown-task"
    assert rejected["detail"] == "nobody.registered.this"
    assert isinstance(rejected["delivery"], Delivery)
    assert rejected["delivery"].message_id == res.id


def test_malformed_message_is_rejected_without_envelope(app: Stem, rec: Recorder) -> None:
    app.broker.publish([Message(id="junk-1", queue="default", body=b"{not json")])
    with Running(app):
        call = rec.wait("task_rejected", reason="malformed")
    assert call["envelope"] is None
    assert call["delivery"].message_id == "junk-1"
    assert "JSON" in call["detail"]


def test_revoked_task_signal(app: Stem, rec: Recorder) -> None:
    @app.task(name="never")
    def never() -> None:
        raise AssertionError("a revoked task ran")

    res = never.delay()
    revoke(app, [res.id])
    with Running(app):
        call = rec.wait("task_revoked", task_id=res.id)
    assert call["envelope"].task == "never"
    assert not rec.of("task_prerun", task_id=res.id)


def test_lease_renewed_signal(app: Stem, rec: Recorder) -> None:
    gate = threading.Event()

    @app.task(name="slow")
    def slow() -> None:
        gate.wait(5)

    with Running(app, lease_s=0.6):
        slow.delay()
        call = rec.wait("lease_renewed", timeout_s=5)
        gate.set()
    assert call["count"] >= 1


CHILD_APP = """
import json, os
from stem import Stem
from stem.observability import signals

app = Stem("child-signals", broker="memory://child-signals", backend="memory://child-signals")

@app.task(name="child.echo")
def echo(x):
    return x

def _record(signal, pid, **_):
    path = os.path.join(os.environ["STEM_TEST_SIGNAL_DIR"], f"{signal}-{pid}.json")
    with open(path, "w") as f:
        json.dump({"signal": signal, "pid": pid, "real_pid": os.getpid()}, f)

signals.pool_process_init.connect(_record)
signals.pool_process_shutdown.connect(_record)
"""


def _wait_for(pred: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def test_pool_process_signals_fire_inside_children(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receivers connected by the app module run in each process-pool child."""
    mod_dir = tmp_path / "mods"
    mod_dir.mkdir()
    (mod_dir / "child_signals_app.py").write_text(CHILD_APP)
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.setenv("STEM_TEST_SIGNAL_DIR", str(out))
    monkeypatch.setenv("PYTHONPATH", str(mod_dir))
    monkeypatch.chdir(mod_dir)
    monkeypatch.syspath_prepend(str(mod_dir))
    from stem.loader import load_app

    app = load_app("child_signals_app:app")
    try:
        with running_worker(app, pool="process", concurrency=1) as worker:
            assert app.tasks["child.echo"].delay(7).get(timeout=20) == 7
            pids = list(getattr(worker.pool, "pids", lambda: [])())
    finally:
        app.close()
    _wait_for(lambda: len(list(out.glob("pool_process_shutdown-*.json"))) >= 1)
    inits = [json.loads(p.read_text()) for p in out.glob("pool_process_init-*.json")]
    downs = [json.loads(p.read_text()) for p in out.glob("pool_process_shutdown-*.json")]
    assert inits and downs
    for rec in inits + downs:
        assert rec["pid"] == rec["real_pid"]  # fired inside the child, with its own pid
        assert rec["pid"] != os.getpid()
    if pids:
        assert {r["pid"] for r in inits} >= set(pids)


# -- log fields ------------------------------------------------------------------------------


def _json_line(extra: dict[str, Any]) -> dict[str, Any]:
    import logging

    from stem.observability.logs import JsonFormatter

    record = logging.makeLogRecord({"name": "stem.test", "levelname": "INFO", "msg": "m"})
    for k, v in extra.items():
        setattr(record, k, v)
    parsed: dict[str, Any] = json.loads(JsonFormatter().format(record))
    return parsed


def test_task_log_fields_leave_argument_values_out_by_default() -> None:
    from stem.observability.logs import task_log_fields

    env = Envelope(
        id="t1", task="pay", args=("4111-1111",), kwargs={"amount": 5}, queue="billing", attempt=2
    )
    line = _json_line({"event": "task-failed", **task_log_fields(env, worker="w1")})
    assert {k: line[k] for k in ("event", "task", "task_id", "attempt", "queue", "worker")} == {
        "event": "task-failed",
        "task": "pay",
        "task_id": "t1",
        "attempt": 2,
        "queue": "billing",
        "worker": "w1",
    }
    assert "4111" not in json.dumps(line)


def test_task_log_fields_with_log_args_still_redact_secrets() -> None:
    from stem.observability.logs import task_log_fields

    env = Envelope(
        id="t1",
        task="login",
        args=("alice", "redis://u:pw@host/0"),
        kwargs={"password": "hunter2", "n": 1},
    )
    line = _json_line(task_log_fields(env, log_args=True))
    assert line["task_args"] == ["alice", "redis://u:***@host/0"]
    assert line["task_kwargs"] == {"password": "***", "n": 1}


def test_a_time_limit_raised_in_a_receiver_reaches_the_task() -> None:
    """A receiver that fails is logged and skipped; a task's time limit raised while one
    ran inside it (the pool process's after_publish notice) was swallowed the same way,
    and the task ran on past its soft limit."""
    from stem.errors import SoftTimeLimitExceeded
    from stem.observability.signals import Signal

    sig = Signal("test_limit")

    def broken(**_: object) -> None:
        raise ValueError("a broken receiver")

    def interrupted(**_: object) -> None:
        raise SoftTimeLimitExceeded("task exceeded its soft time limit")

    sig.connect(broken)
    sig.send()  # logged, not raised
    sig.connect(interrupted)
    with pytest.raises(SoftTimeLimitExceeded):
        sig.send()
