"""``stem worker``."""

from __future__ import annotations

from typing import Annotated

import typer

from stem.cli.context import load_app
from stem.cli.exitcodes import ExitCode
from stem.config.schema import MAX_POOL_SIZE


def _split(value: str) -> tuple[str, ...]:
    return tuple(q.strip() for q in value.split(",") if q.strip())


def _autoscale(value: str | None) -> tuple[int, int] | None:
    if not value:
        return None
    try:
        hi, lo = (int(x) for x in value.split(","))
    except ValueError:
        raise typer.BadParameter(f"--autoscale takes MAX,MIN, got {value!r}") from None
    return hi, lo


def worker(
    ctx: typer.Context,
    queues: Annotated[
        str,
        typer.Option("--queues", "-Q", envvar="STEM_WORKER_QUEUES", help="Comma-separated queues."),
    ] = "default",
    concurrency: Annotated[
        int | None,
        typer.Option(
            "--concurrency",
            "-c",
            envvar="STEM_WORKER_CONCURRENCY",
            min=1,
            max=MAX_POOL_SIZE,
            help="Slots (default: number of CPUs).",
        ),
    ] = None,
    pool: Annotated[
        str,
        typer.Option(
            "--pool", "-P", envvar="STEM_WORKER_POOL", help="process, thread, async or solo."
        ),
    ] = "process",
    lease_s: Annotated[
        float,
        typer.Option(
            "--lease", envvar="STEM_WORKER_LEASE_S", help="Lease seconds (renewed while running)."
        ),
    ] = 30.0,
    max_deliveries: Annotated[
        int,
        typer.Option(
            "--max-deliveries",
            envvar="STEM_WORKER_MAX_DELIVERIES",
            help="Dead-letter a message delivered more often than this.",
        ),
    ] = 5,
    prefetch: Annotated[
        int,
        typer.Option(
            "--prefetch",
            envvar="STEM_WORKER_PREFETCH",
            help="Deliveries reserved per slot beyond the slots, waiting for one to free "
            "(0: never prefetch).",
        ),
    ] = 0,
    shutdown_budget_s: Annotated[
        float,
        typer.Option(
            "--shutdown-budget",
            envvar="STEM_WORKER_SHUTDOWN_BUDGET_S",
            help="Seconds to drain on SIGTERM before handing work back.",
        ),
    ] = 30.0,
    time_limit_s: Annotated[
        float | None,
        typer.Option(
            "--time-limit", envvar="STEM_WORKER_TIME_LIMIT_S", help="Default hard time limit."
        ),
    ] = None,
    soft_time_limit_s: Annotated[
        float | None,
        typer.Option(
            "--soft-time-limit",
            envvar="STEM_WORKER_SOFT_TIME_LIMIT_S",
            help="Default soft time limit.",
        ),
    ] = None,
    node_name: Annotated[
        str | None,
        typer.Option(
            "--name", "-n", envvar="STEM_WORKER_NODE_NAME", help="Node name (default name@host)."
        ),
    ] = None,
    autoscale: Annotated[
        str | None,
        typer.Option(
            "--autoscale",
            envvar="STEM_WORKER_AUTOSCALE",
            help="MAX,MIN: grow the pool under backlog, shrink it when idle.",
        ),
    ] = None,
    heartbeat_s: Annotated[
        float,
        typer.Option(
            "--heartbeat", envvar="STEM_WORKER_HEARTBEAT_S", help="Heartbeat interval seconds."
        ),
    ] = 5.0,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            envvar="STEM_METRICS_PORT",
            help="Serve Prometheus metrics on this port (off by default).",
        ),
    ] = None,
    metrics_host: Annotated[
        str,
        typer.Option(
            "--metrics-host", envvar="STEM_METRICS_HOST", help="Address for the metrics port."
        ),
    ] = "127.0.0.1",
    state_file: Annotated[
        str | None,
        typer.Option(
            "--state-file",
            envvar="STEM_WORKER_STATE_FILE",
            help="Keep a JSON health snapshot here (read by `stem health`).",
        ),
    ] = None,
    events: Annotated[
        bool,
        typer.Option(
            "--events/--no-events",
            envvar="STEM_WORKER_EVENTS",
            help="Publish task and worker events for `stem events`.",
        ),
    ] = False,
) -> None:
    """Run a worker until SIGTERM/SIGINT (a second signal stops at once).

    Options given here override the configuration files and STEM_WORKER_* variables."""
    import os

    from stem.cli.context import state
    from stem.cli.settings_bridge import typed_flags
    from stem.worker.consumer import Worker, WorkerConfig
    from stem.worker.service import attach, watchdog_interval_s

    state(ctx).overrides.update(typed_flags(ctx, _FLAGS))
    if metrics_port is not None:
        state(ctx).overrides["metrics.enabled"] = True
    app = load_app(ctx, need_spec=True, gates=True)
    settings = state(ctx).settings
    w = settings.worker
    if settings.provenance("worker.concurrency").layer == "default":
        slots = os.cpu_count() or 2
    else:
        slots = w.concurrency
    cfg = WorkerConfig(
        queues=tuple(w.queues),
        pool=w.pool,
        concurrency=slots,
        lease_s=w.lease_s,
        max_deliveries=w.max_deliveries,
        prefetch=w.prefetch,
        shutdown_budget_s=w.shutdown_budget_s,
        time_limit_s=w.time_limit_s,
        soft_time_limit_s=w.soft_time_limit_s,
        node_name=w.node_name,
        # systemd's watchdog wants pings at least twice per WatchdogSec.
        heartbeat_s=min(w.heartbeat_s, watchdog_interval_s() or w.heartbeat_s),
        autoscale=_autoscale(w.autoscale),
    )
    worker_ = Worker(app, cfg)
    attach(worker_, state_file=w.state_file, notify=True)
    if events:
        from stem.observability.events import enable_events

        enable_events(worker_)
    metrics = settings.metrics
    if metrics.enabled:
        from stem.observability.metrics import attach_metrics

        attach_metrics(worker_, metrics.port, metrics.host)
    try:
        worker_.run()
    finally:
        app.close()
    if worker_.stalled:
        raise typer.Exit(int(ExitCode.SOFTWARE))


_FLAGS = {
    "queues": "worker.queues",
    "concurrency": "worker.concurrency",
    "pool": "worker.pool",
    "lease_s": "worker.lease_s",
    "max_deliveries": "worker.max_deliveries",
    "prefetch": "worker.prefetch",
    "shutdown_budget_s": "worker.shutdown_budget_s",
    "time_limit_s": "worker.time_limit_s",
    "soft_time_limit_s": "worker.soft_time_limit_s",
    "node_name": "worker.node_name",
    "autoscale": "worker.autoscale",
    "heartbeat_s": "worker.heartbeat_s",
    "state_file": "worker.state_file",
    "metrics_port": "metrics.port",
    "metrics_host": "metrics.host",
}
