"""``stem control ...``: steer running workers without restarting them."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stem import control
from stem.cli.context import emit_json, fail, load_app
from stem.cli.exitcodes import ExitCode

app = typer.Typer(
    help="Remote control of running workers (signed when signing is on).", no_args_is_help=True
)

Dest = Annotated[
    list[str] | None,
    typer.Option(
        "--destination", "-d", help="Worker node name (repeat for several; default: all)."
    ),
]
Timeout = Annotated[
    float,
    typer.Option(
        "--timeout", "-t", envvar="STEM_CONTROL_TIMEOUT_S", help="Seconds to wait for replies."
    ),
]
AsJson = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]


def _run(
    ctx: typer.Context,
    command: str,
    args: dict[str, Any] | None,
    destination: list[str] | None,
    timeout: float,
    as_json: bool,
) -> None:
    stem_app = load_app(ctx, existing=True)
    replies = control.broadcast(
        stem_app, command, args, destination=destination, timeout_s=timeout, report_silent=True
    )
    if as_json:
        emit_json([{"worker": r.worker, "ok": r.ok, "result": r.result} for r in replies])
    else:
        for r in replies:
            typer.echo(f"{r.worker}: {'OK' if r.ok else 'ERROR'} {r.result}")
    if not any(r.answered for r in replies):
        live = control.live_nodes(stem_app)
        hint = ""
        keyring = stem_app.keyring
        if live and (keyring is None or not keyring.can_sign):
            hint = (
                "; this command has no signing key, and workers that require signatures "
                "ignore unsigned requests (set STEM_SIGNING_* as for the workers)"
            )
        fail(
            f"no worker replied within {timeout:g}s (live nodes: {', '.join(live) or 'none'})"
            + hint,
            ExitCode.UNAVAILABLE,
        )
    if not all(r.ok for r in replies):
        raise typer.Exit(int(ExitCode.FAILURE))


def _simple(command: str, doc: str) -> None:
    def cmd(
        ctx: typer.Context,
        destination: Dest = None,
        timeout: Timeout = 2.0,
        as_json: AsJson = False,
    ) -> None:
        _run(ctx, command, None, destination, timeout, as_json)

    cmd.__doc__ = doc
    app.command(command)(cmd)


for _name, _doc in [
    ("ping", "Ask workers to answer."),
    ("stats", "Health and counters of each worker."),
    ("active", "Tasks running now."),
    ("reserved", "Deliveries prefetched and waiting for a slot (empty unless --prefetch)."),
    ("registered", "Task names each worker can run."),
    ("queue-status", "Queues each worker consumes, paused or not, with depths."),
]:
    _simple(_name, _doc)


@app.command("revoke")
def revoke(
    ctx: typer.Context,
    task_ids: Annotated[list[str], typer.Argument()],
    terminate: Annotated[
        bool, typer.Option("--terminate", help="Also stop it if running.")
    ] = False,
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Revoke tasks: recorded in the broker (survives restarts), so they never start;
    --terminate also stops running ones."""
    stem_app = load_app(ctx, existing=True)
    control.revoke(stem_app, task_ids)
    replies = control.broadcast(
        stem_app,
        "revoke",
        {"ids": task_ids, "terminate": terminate},
        destination=destination,
        timeout_s=timeout,
    )
    if as_json:
        emit_json(
            {
                "revoked": task_ids,
                "replies": [{"worker": r.worker, "ok": r.ok, "result": r.result} for r in replies],
            }
        )
    else:
        typer.echo(f"revoked {', '.join(task_ids)} ({len(replies)} worker(s) told)")


@app.command("shutdown")
def shutdown(
    ctx: typer.Context,
    mode: Annotated[str, typer.Option("--mode", help="warm, soft or hard.")] = "warm",
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Stop workers: warm drains within the budget, soft drains for at most 10 s, hard
    hands running work back at once."""
    if mode not in ("warm", "soft", "hard"):
        fail(f"unknown shutdown mode {mode!r}: use warm, soft or hard", ExitCode.USAGE)
    _run(ctx, "shutdown", {"mode": mode}, destination, timeout, as_json)


@app.command("rate-limit")
def rate_limit(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument()],
    rate: Annotated[str, typer.Argument(help="Like 100/s, 30/m, 5/h.")],
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Change a task's rate limit on running workers."""
    _run(ctx, "rate-limit", {"task": task, "rate": rate}, destination, timeout, as_json)


@app.command("pool-grow")
def pool_grow(
    ctx: typer.Context,
    n: Annotated[int, typer.Argument(min=1)] = 1,
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Add N slots to each worker's pool."""
    _run(ctx, "pool-grow", {"n": n}, destination, timeout, as_json)


@app.command("pool-shrink")
def pool_shrink(
    ctx: typer.Context,
    n: Annotated[int, typer.Argument(min=1)] = 1,
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Remove N slots from each worker's pool (never below 1)."""
    _run(ctx, "pool-shrink", {"n": n}, destination, timeout, as_json)


@app.command("pause")
def pause(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument()],
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Stop consuming a queue (running tasks finish)."""
    _run(ctx, "pause", {"queue": queue}, destination, timeout, as_json)


@app.command("resume")
def resume(
    ctx: typer.Context,
    queue: Annotated[str, typer.Argument()],
    destination: Dest = None,
    timeout: Timeout = 2.0,
    as_json: AsJson = False,
) -> None:
    """Consume a paused queue again."""
    _run(ctx, "resume", {"queue": queue}, destination, timeout, as_json)
