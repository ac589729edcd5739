"""Prometheus metrics for a worker, fed only by signals.

:func:`attach_metrics` connects a :class:`Metrics` to the lifecycle signals and serves it
on an opt-in HTTP port (``stem worker --metrics-port P``). The worker itself knows nothing
about Prometheus. Each :class:`Metrics` has a private registry, so two in one process (tests)
never collide and nothing leaks into ``prometheus_client``'s global registry.

Signals are process-wide: a worker's metrics count every task that runs in its process.

Label values are bounded on purpose: ``task`` only ever names a task registered on this
worker (a message naming an unknown task is counted by dead-letter ``reason``, never by its
name, so a hostile producer cannot blow up the series count).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)

from stem import states
from stem.errors import BrokerError, ConfigError
from stem.observability import signals

if TYPE_CHECKING:
    from wsgiref.simple_server import WSGIServer

    from stem.brokers.base import Broker, Delivery
    from stem.envelope import Envelope
    from stem.worker.consumer import Worker

log = logging.getLogger("stem.metrics")

# Task run times span milliseconds to an hour; the client's default buckets stop at 10 s.
RUNTIME_BUCKETS_S = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)  # fmt: skip

_Key = tuple[str, int]


def _key(env: Envelope) -> _Key:
    return (env.id, env.attempt)


class Metrics:
    """The metric families, and the signal receivers that update them.

    ``connect()`` subscribes to the signals and ``disconnect()`` undoes it; the gauges that
    read the worker (pool size, running tasks) are bound by :meth:`bind_worker`.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.tasks = Counter(
            "stem_tasks_total",
            "Task lifecycle transitions seen by this worker, by task and state.",
            ["task", "state"],
            registry=r,
        )
        self.runtime = Histogram(
            "stem_task_runtime_seconds",
            "Run time of task executions (one observation per attempt).",
            ["task"],
            buckets=RUNTIME_BUCKETS_S,
            registry=r,
        )
        self.queue_ready = Gauge(
            "stem_queue_ready", "Messages ready to be reserved.", ["queue"], registry=r
        )
        self.queue_delayed = Gauge(
            "stem_queue_delayed", "Messages waiting for their ETA or retry delay.", ["queue"],
            registry=r,
        )  # fmt: skip
        self.queue_reserved = Gauge(
            "stem_queue_reserved", "Messages leased by some worker.", ["queue"], registry=r
        )
        self.queue_dead = Gauge(
            "stem_queue_dead", "Messages in the dead-letter queue.", ["queue"], registry=r
        )
        self.lease_renewals = Counter(
            "stem_lease_renewals_total", "Leases of running tasks renewed.", registry=r
        )
        self.lease_lost = Counter(
            "stem_lease_lost_total",
            "Leases found lapsed while their task still ran (the task may run twice).",
            registry=r,
        )
        self.redeliveries = Counter(
            "stem_redeliveries_total",
            "Deliveries of a message whose earlier lease lapsed (its worker died or stalled).",
            ["queue"],
            registry=r,
        )
        self.signature_rejections = Counter(
            "stem_signature_rejections_total",
            "Messages refused because their signature did not verify, by reason.",
            ["reason"],
            registry=r,
        )
        self.control_rejections = Counter(
            "stem_control_rejections_total",
            "Control requests this worker refused (unsigned, forged, replayed), by reason.",
            ["reason"],
            registry=r,
        )
        self.dead_letters = Counter(
            "stem_dead_letters_total", "Messages this worker dead-lettered, by reason.",
            ["reason"], registry=r,
        )  # fmt: skip
        self.queue_stats_at = Gauge(
            "stem_queue_stats_last_success_timestamp_seconds",
            "When the queue gauges were last read from the broker (Unix time): they keep "
            "their last values while the broker does not answer.",
            registry=r,
        )
        self.pool_size = Gauge("stem_pool_size", "Slots in the worker's pool.", registry=r)
        self.running = Gauge("stem_tasks_running", "Tasks running now.", registry=r)
        ProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds
        self._started: dict[_Key, tuple[str, float]] = {}
        self._lock = threading.Lock()
        self._receivers = signals.Receivers()

    # -- wiring --------------------------------------------------------------------------

    def connect(self) -> None:
        pairs: list[tuple[signals.Signal | None, Callable[..., Any]]] = [
            (signals.task_received, self._on_received),
            (signals.task_prerun, self._on_prerun),
            (signals.task_success, self._on_success),
            (signals.task_failure, self._on_failure),
            (signals.task_retry, self._on_retry),
            (signals.task_revoked, self._on_revoked),
            (signals.task_postrun, self._on_postrun),
            (signals.task_rejected, self._on_rejected),
            (signals.control_rejected, self._on_control_rejected),
            # Added by the worker later; absent signals are skipped, not an error.
            (getattr(signals, "task_expired", None), self._on_expired),
            (getattr(signals, "lease_renewed", None), self._on_lease_renewed),
            (getattr(signals, "lease_lost", None), self._on_lease_lost),
        ]
        for sig, receiver in pairs:
            if sig is not None:
                self._receivers.connect(sig, receiver)

    def disconnect(self) -> None:
        self._receivers.disconnect_all()

    def bind_worker(self, worker: Worker) -> None:
        """Read pool size and running tasks from the worker at scrape time (always exact,
        whichever settle path a task took)."""
        self.pool_size.set_function(lambda: worker.pool.size)
        self.running.set_function(lambda: len(worker.inflight))

    def exposition(self) -> bytes:
        """The text format, as the HTTP endpoint serves it."""
        return generate_latest(self.registry)

    # -- queues --------------------------------------------------------------------------

    def refresh_queues(self, broker: Broker, queues: list[str] | None) -> None:
        """Set the queue gauges from ``broker.stats(queues)``."""
        for s in broker.stats(queues):
            self.queue_ready.labels(s.queue).set(s.ready)
            self.queue_delayed.labels(s.queue).set(s.delayed)
            self.queue_reserved.labels(s.queue).set(s.reserved)
            self.queue_dead.labels(s.queue).set(s.dead)
        self.queue_stats_at.set_to_current_time()

    # -- receivers -----------------------------------------------------------------------

    def _on_received(self, envelope: Envelope, delivery: Delivery | None = None, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.RECEIVED.lower()).inc()
        if delivery is not None and delivery.delivery_count > 1:
            self.redeliveries.labels(delivery.queue).inc()

    def _on_prerun(self, envelope: Envelope, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.STARTED.lower()).inc()
        with self._lock:
            self._started[_key(envelope)] = (envelope.task, time.monotonic())

    def _finish(self, envelope: Envelope, runtime_s: float | None = None) -> None:
        """Observe the run time once per execution, whichever signal ends it first."""
        with self._lock:
            started = self._started.pop(_key(envelope), None)
        if started is None:
            return
        task, t0 = started
        if not runtime_s or runtime_s <= 0:
            runtime_s = time.monotonic() - t0
        self.runtime.labels(task).observe(runtime_s)

    def _on_success(self, envelope: Envelope, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.SUCCESS.lower()).inc()

    def _on_failure(self, envelope: Envelope, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.FAILURE.lower()).inc()

    def _on_retry(self, envelope: Envelope, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.RETRY.lower()).inc()
        self._finish(envelope)

    def _on_revoked(self, envelope: Envelope, **_: Any) -> None:
        # Only registered tasks reach the revocation check, so the label stays bounded.
        self.tasks.labels(envelope.task, states.REVOKED.lower()).inc()
        self._finish(envelope)

    def _on_expired(self, envelope: Envelope, **_: Any) -> None:
        self.tasks.labels(envelope.task, states.EXPIRED.lower()).inc()

    def _on_postrun(self, envelope: Envelope, runtime_s: float | None = None, **_: Any) -> None:
        self._finish(envelope, runtime_s)

    def _on_rejected(self, reason: str, **_: Any) -> None:
        self.dead_letters.labels(reason).inc()
        if reason.startswith("signature-"):
            self.signature_rejections.labels(reason).inc()

    def _on_control_rejected(self, reason: str, **_: Any) -> None:
        self.control_rejections.labels(reason).inc()
        if reason.startswith("signature-"):
            self.signature_rejections.labels(reason).inc()

    def _on_lease_renewed(self, count: int = 1, **_: Any) -> None:
        if count > 0:
            self.lease_renewals.inc(count)

    def _on_lease_lost(self, **_: Any) -> None:
        self.lease_lost.inc()

    def prune(self, live: set[_Key], older_than_s: float = 60.0) -> None:
        """Forget start times of executions that ended without a closing signal (a result
        write that failed and was handed back, a shutdown), so the map cannot grow."""
        cutoff = time.monotonic() - older_than_s
        with self._lock:
            for key in [k for k, (_, t0) in self._started.items() if k not in live and t0 < cutoff]:
                del self._started[key]


class MetricsEndpoint:
    """A running ``/metrics`` HTTP server bound to one worker. ``close()`` stops the server
    and disconnects every receiver; the worker's shutdown signal calls it."""

    def __init__(self, worker: Worker, metrics: Metrics, host: str, port: int) -> None:
        from prometheus_client import start_http_server

        self.worker = worker
        self.metrics = metrics
        self._closed = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        try:
            server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as exc:
            raise ConfigError(f"metrics endpoint: cannot listen on {host}:{port} ({exc})") from None
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.host = host
        self.port: int = server.server_port
        self._refresher = threading.Thread(
            target=self._refresh_loop, name="stem-metrics-refresh", daemon=True
        )
        self._refresher.start()
        self._receivers = signals.Receivers(
            [(signals.heartbeat, self._on_heartbeat), (signals.worker_shutdown, self._on_shutdown)]
        )

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def _on_heartbeat(self, worker: Worker, **_: Any) -> None:
        if worker is self.worker:
            self._wake.set()  # the refresher asks the broker; the maintainer never waits

    def _refresh_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stop.is_set():
                return
            self.refresh()

    def refresh(self) -> None:
        """Refresh the queue gauges now and drop stale run-time entries."""
        try:
            self.metrics.refresh_queues(self.worker.app.broker, list(self.worker.config.queues))
        except BrokerError as exc:
            log.warning(
                "queue depths not refreshed: %s",
                exc,
                extra={"event": "metrics-refresh-failed", "worker": self.worker.name},
            )
        live = {(j.envelope.id, j.envelope.attempt) for j in list(self.worker.inflight.values())}
        self.metrics.prune(live)

    def _on_shutdown(self, worker: Worker, **_: Any) -> None:
        if worker is self.worker:
            self.close()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._receivers.disconnect_all()
        self.metrics.disconnect()
        self._stop.set()
        self._wake.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
        if self._refresher is not threading.current_thread():
            self._refresher.join(timeout=5)


def attach_metrics(worker: Worker, port: int, host: str = "127.0.0.1") -> MetricsEndpoint:
    """Count ``worker``'s activity and serve it at ``http://host:port/metrics`` until the
    worker shuts down. ``port=0`` picks a free port (see ``.port``). Raises
    :class:`~stem.errors.ConfigError` if the address cannot be bound."""
    metrics = Metrics()
    metrics.bind_worker(worker)
    endpoint = MetricsEndpoint(worker, metrics, host, port)
    metrics.connect()
    log.info(
        "metrics at %s",
        endpoint.url,
        extra={"event": "metrics-listening", "worker": worker.name, "port": endpoint.port},
    )
    return endpoint
