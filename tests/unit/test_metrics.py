"""Prometheus metrics: receivers update the right series, and the HTTP endpoint serves the
right values after a known workload."""

from __future__ import annotations

import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stem import Stem
from stem import envelope as codec
from stem.brokers.base import Delivery, Message
from stem.envelope import Envelope, new_id
from stem.errors import ConfigError
from stem.observability import signals
from stem.observability.metrics import Metrics, attach_metrics
from stem.security.signing import Keyring
from stem.testing import memory_app, running_worker


def _wait_for(pred: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting")
        time.sleep(0.01)


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = resp.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(data: dict[Any, float], name: str, **labels: str) -> float | None:
    return data.get((name, tuple(sorted(labels.items()))))


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    m = Metrics()
    m.connect()
    yield m
    m.disconnect()


def value(m: Metrics, name: str, **labels: str) -> float | None:
    v: float | None = m.registry.get_sample_value(name, labels)
    return v


def _env(task: str = "t", attempt: int = 0) -> Envelope:
    return Envelope(id=new_id(), task=task, attempt=attempt, queue="q")


def _delivery(count: int = 1, queue: str = "q") -> Delivery:
    return Delivery("r", "m", queue, b"", count, 0)


# -- receivers -------------------------------------------------------------------------------


def test_task_states_and_runtime(metrics: Metrics) -> None:
    env = _env("job")
    signals.task_received.send(envelope=env)
    signals.task_prerun.send(envelope=env)
    signals.task_success.send(envelope=env, result=1)
    signals.task_postrun.send(envelope=env, state="SUCCESS")
    assert value(metrics, "stem_tasks_total", task="job", state="received") == 1
    assert value(metrics, "stem_tasks_total", task="job", state="started") == 1
    assert value(metrics, "stem_tasks_total", task="job", state="success") == 1
    assert value(metrics, "stem_task_runtime_seconds_count", task="job") == 1
    # The closing signal fired twice (a retry path that also sends postrun): one observation.
    signals.task_postrun.send(envelope=env, state="SUCCESS")
    assert value(metrics, "stem_task_runtime_seconds_count", task="job") == 1


def test_runtime_prefers_the_pools_measure(metrics: Metrics) -> None:
    env = _env("job")
    signals.task_prerun.send(envelope=env)
    signals.task_postrun.send(envelope=env, state="FAILURE", runtime_s=42.0)
    assert value(metrics, "stem_task_runtime_seconds_sum", task="job") == 42.0
    assert value(metrics, "stem_task_runtime_seconds_bucket", task="job", le="30.0") == 0
    assert value(metrics, "stem_task_runtime_seconds_bucket", task="job", le="60.0") == 1


def test_retry_and_revoke_end_the_execution(metrics: Metrics) -> None:
    env = _env("job")
    signals.task_prerun.send(envelope=env)
    signals.task_retry.send(envelope=env, delay_s=1.0, error=None)
    again = env.replace(attempt=1)
    signals.task_prerun.send(envelope=again)
    signals.task_revoked.send(envelope=again)
    assert value(metrics, "stem_tasks_total", task="job", state="retry") == 1
    assert value(metrics, "stem_tasks_total", task="job", state="revoked") == 1
    assert value(metrics, "stem_task_runtime_seconds_count", task="job") == 2


def test_rejections_count_by_reason_never_by_task_name(metrics: Metrics) -> None:
    hostile = _env("x" * 200)
    signals.task_rejected.send(
        delivery=_delivery(), reason="unknown-task", detail=hostile.task, envelope=hostile
    )
    signals.task_rejected.send(
        delivery=_delivery(), reason="signature-invalid", detail="", envelope=None
    )
    assert value(metrics, "stem_dead_letters_total", reason="unknown-task") == 1
    assert value(metrics, "stem_dead_letters_total", reason="signature-invalid") == 1
    assert value(metrics, "stem_signature_rejections_total", reason="signature-invalid") == 1
    assert value(metrics, "stem_signature_rejections_total", reason="unknown-task") is None
    assert b"x" * 200 not in metrics.exposition()


def test_refused_control_requests_are_counted(signed_app: Stem) -> None:
    """A forged or unsigned control request was only logged: nothing an alert could see."""
    from stem.control import CONTROL_TASK, control_queue

    with running_worker(signed_app, lease_s=5.0, heartbeat_s=60.0) as worker:
        endpoint = attach_metrics(worker, 0)
        queue = control_queue(worker.name)
        forged = Envelope(
            id=new_id(), task=CONTROL_TASK, kwargs={"command": "shutdown"}, queue=queue
        )
        signed_app.broker.publish(
            [
                Message(id=forged.id, queue=queue, body=codec.encode(forged)),
                Message(id="junk", queue=queue, body=b"not json"),
            ]
        )
        registry = endpoint.metrics.registry

        def count(name: str, reason: str) -> float | None:
            return registry.get_sample_value(name, {"reason": reason})

        _wait_for(lambda: count("stem_control_rejections_total", "malformed") == 1)
        assert count("stem_control_rejections_total", "signature-missing") == 1
        assert count("stem_signature_rejections_total", "signature-missing") == 1
        assert not worker.stopped  # the unsigned shutdown did nothing


def test_redeliveries_counted_when_the_delivery_is_given(metrics: Metrics) -> None:
    signals.task_received.send(envelope=_env(), delivery=_delivery(1))
    signals.task_received.send(envelope=_env(), delivery=_delivery(3, queue="q2"))
    assert value(metrics, "stem_redeliveries_total", queue="q2") == 1
    assert value(metrics, "stem_redeliveries_total", queue="q") is None


def test_lease_signals(monkeypatch: pytest.MonkeyPatch) -> None:
    """Against the signals the worker is to add: lease_renewed(count=), lease_lost(envelope=)."""
    monkeypatch.setattr(signals, "lease_renewed", signals.Signal("lease_renewed"), raising=False)
    monkeypatch.setattr(signals, "lease_lost", signals.Signal("lease_lost"), raising=False)
    renewed, lost = getattr(signals, "lease_renewed"), getattr(signals, "lease_lost")
    m = Metrics()
    m.connect()
    try:
        renewed.send(count=3)
        renewed.send(count=0)
        lost.send(envelope=_env())
    finally:
        m.disconnect()
    renewed.send(count=5)  # disconnected: not counted
    assert value(m, "stem_lease_renewals_total") == 3
    assert value(m, "stem_lease_lost_total") == 1


def test_prune_forgets_executions_that_never_closed(metrics: Metrics) -> None:
    env = _env()
    signals.task_prerun.send(envelope=env)
    metrics.prune(live=set(), older_than_s=0.0)
    signals.task_postrun.send(envelope=env, state="SUCCESS")
    assert value(metrics, "stem_task_runtime_seconds_count", task="t") is None


def test_two_metrics_objects_do_not_share_a_registry() -> None:
    a, b = Metrics(), Metrics()
    a.tasks.labels("t", "success").inc()
    assert (
        b.registry.get_sample_value("stem_tasks_total", {"task": "t", "state": "success"}) is None
    )


# -- the endpoint, after a known workload ----------------------------------------------------


@pytest.fixture
def signed_app() -> Iterator[Stem]:
    app = memory_app()
    app.configure(keyring=Keyring.build("hmac-sha256", {"v1": b"k" * 32}))
    yield app
    app.close()


def test_endpoint_serves_the_workload(signed_app: Stem) -> None:
    app = signed_app

    @app.task(name="add")
    def add(x: int, y: int) -> int:
        return x + y

    @app.task(name="boom", max_retries=0)
    def boom() -> None:
        raise ValueError("no")

    @app.task(name="flaky", bind=True, max_retries=2, default_retry_delay=0.01, retry_jitter=False)
    def flaky(ctx: Any) -> str:
        if ctx.attempt == 0:
            raise ctx.retry()
        return "ok"

    with running_worker(app, concurrency=2, lease_s=5.0, heartbeat_s=60.0) as worker:
        endpoint = attach_metrics(worker, 0)
        assert endpoint.url.startswith("http://127.0.0.1:")
        results = [add.delay(i, i) for i in range(3)]
        failing, retried = boom.delay(), flaky.delay()
        app.send_task("add", (1, 1), countdown=3600)  # stays delayed in the broker
        unsigned = Envelope(id=new_id(), task="add", args=(1, 2), queue="default")
        app.broker.publish(
            [
                Message(id="junk", queue="default", body=b"not json"),
                Message(id=unsigned.id, queue="default", body=codec.encode(unsigned)),
            ]
        )
        assert [r.get(timeout=5) for r in results] == [0, 2, 4]
        assert retried.get(timeout=5) == "ok"
        failing.get(timeout=5, propagate=False)
        _wait_for(lambda: len(app.broker.dlq_list()) == 2 and not worker.inflight)
        assert worker.settler.acks.wait_idle(5)  # acks go out just after the results
        _wait_for(
            lambda: (
                endpoint.metrics.registry.get_sample_value(
                    "stem_task_runtime_seconds_count", {"task": "add"}
                )
                == 3
            )
        )
        endpoint.refresh()
        data = scrape(endpoint.url)

    def tasks(task: str, state: str) -> float | None:
        return sample(data, "stem_tasks_total", task=task, state=state)

    assert [tasks("add", s) for s in ("received", "started", "success")] == [3, 3, 3]
    assert [tasks("boom", s) for s in ("received", "started", "failure")] == [1, 1, 1]
    assert [tasks("flaky", s) for s in ("received", "started", "retry", "success")] == [2, 2, 1, 1]
    assert tasks("add", "failure") is None
    assert sample(data, "stem_task_runtime_seconds_count", task="add") == 3
    assert sample(data, "stem_task_runtime_seconds_count", task="flaky") == 2
    assert sample(data, "stem_task_runtime_seconds_count", task="boom") == 1
    assert sample(data, "stem_dead_letters_total", reason="malformed") == 1
    assert sample(data, "stem_dead_letters_total", reason="signature-missing") == 1
    assert sample(data, "stem_signature_rejections_total", reason="signature-missing") == 1
    assert sample(data, "stem_queue_ready", queue="default") == 0
    assert sample(data, "stem_queue_delayed", queue="default") == 1
    assert sample(data, "stem_queue_reserved", queue="default") == 0
    assert sample(data, "stem_queue_dead", queue="default") == 2
    assert sample(data, "stem_pool_size") == 2
    # When the depths were read, for alerts on gauges gone stale (the broker not answering).
    read_at = sample(data, "stem_queue_stats_last_success_timestamp_seconds")
    assert read_at is not None and abs(read_at - time.time()) < 3600
    assert sample(data, "stem_tasks_running") == 0
    assert (sample(data, "process_resident_memory_bytes") or 0) > 0

    # The worker's shutdown closed the endpoint and disconnected its receivers.
    with pytest.raises(urllib.error.URLError):
        scrape(endpoint.url)
    assert len(endpoint.metrics._receivers) == 0


def test_heartbeat_refreshes_queue_depths(signed_app: Stem) -> None:
    app = signed_app
    app.send_task("later", countdown=3600)
    with running_worker(app, heartbeat_s=0.1) as worker:
        endpoint = attach_metrics(worker, 0)
        _wait_for(
            lambda: (
                endpoint.metrics.registry.get_sample_value(
                    "stem_queue_delayed", {"queue": "default"}
                )
                == 1
            )
        )
        assert "stem_tasks_running 0.0" in scrape_text(endpoint.url)


def scrape_text(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as resp:
        text: str = resp.read().decode()
    return text


def test_port_in_use_is_a_config_error(signed_app: Stem) -> None:
    with running_worker(signed_app) as worker:
        first = attach_metrics(worker, 0)
        try:
            with pytest.raises(ConfigError, match=f"127.0.0.1:{first.port}"):
                attach_metrics(worker, first.port)
        finally:
            first.close()
