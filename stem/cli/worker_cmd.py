"""``stem worker``."""

from __future__ import annotations

from typing import Annotated

import typer

from stem.cli.context import load_app


def _split(value: str) -> tuple[str, ...]:
    return tuple(q.strip() for q in value.split(",") if q.strip())


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
) -> None:
    """Run a worker until SIGTERM/SIGINT (a second signal stops at once)."""
    from stem.worker.consumer import Worker, WorkerConfig

    app = load_app(ctx, need_spec=True, gates=True)
    kwargs = {} if concurrency is None else {"concurrency": concurrency}
    cfg = WorkerConfig(
        queues=_split(queues),
        pool=pool,
        lease_s=lease_s,
        max_deliveries=max_deliveries,
        shutdown_budget_s=shutdown_budget_s,
        time_limit_s=time_limit_s,
        soft_time_limit_s=soft_time_limit_s,
        node_name=node_name,
        **kwargs,
    )
    w = Worker(app, cfg)
    try:
        w.run()
    finally:
        app.close()
