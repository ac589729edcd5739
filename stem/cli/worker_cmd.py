"""``stem worker``."""

from __future__ import annotations

from typing import Annotated

import typer

from stem.cli.context import load_app


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
) -> None:
    """Run a worker until SIGTERM/SIGINT (a second signal stops at once)."""
    import os

    from stem.worker.consumer import Worker, WorkerConfig

    app = load_app(ctx, need_spec=True, gates=True)
    cfg = WorkerConfig(
        queues=_split(queues),
        pool=pool,
        concurrency=concurrency or os.cpu_count() or 2,
        lease_s=lease_s,
        max_deliveries=max_deliveries,
        shutdown_budget_s=shutdown_budget_s,
        time_limit_s=time_limit_s,
        soft_time_limit_s=soft_time_limit_s,
        node_name=node_name,
        heartbeat_s=heartbeat_s,
        autoscale=_autoscale(autoscale),
    )
    w = Worker(app, cfg)
    try:
        w.run()
    finally:
        app.close()
