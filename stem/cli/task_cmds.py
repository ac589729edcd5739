"""``stem enqueue``, ``stem result`` and ``stem queues``."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from stem import states
from stem.cli.context import emit_json, fail, load_app, print_table
from stem.cli.exitcodes import ExitCode
from stem.envelope import loads
from stem.errors import DecodeError, ResultTimeout, StemError


def _json_arg(value: str | None, name: str, kind: type) -> Any:
    if value is None:
        return kind()
    try:
        parsed = loads(value)
    except DecodeError as exc:
        fail(f"{name} is not valid JSON: {exc}", ExitCode.USAGE)
    if not isinstance(parsed, kind):
        fail(f"{name} must be a JSON {'array' if kind is list else 'object'}", ExitCode.USAGE)
    return parsed


def enqueue(
    ctx: typer.Context,
    task: Annotated[str, typer.Argument(help="Task name (need not be registered here).")],
    args: Annotated[
        str | None, typer.Option("--args", envvar="STEM_ENQUEUE_ARGS", help="JSON array.")
    ] = None,
    kwargs: Annotated[
        str | None, typer.Option("--kwargs", envvar="STEM_ENQUEUE_KWARGS", help="JSON object.")
    ] = None,
    countdown: Annotated[
        float | None,
        typer.Option("--countdown", envvar="STEM_ENQUEUE_COUNTDOWN", help="Delay in seconds."),
    ] = None,
    priority: Annotated[
        int | None, typer.Option("--priority", envvar="STEM_ENQUEUE_PRIORITY", min=0, max=9)
    ] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q", envvar="STEM_ENQUEUE_QUEUE")] = None,
    expires: Annotated[
        float | None,
        typer.Option("--expires", envvar="STEM_ENQUEUE_EXPIRES", help="Seconds until it expires."),
    ] = None,
    task_id: Annotated[str | None, typer.Option("--task-id", envvar="STEM_ENQUEUE_TASK_ID")] = None,
    wait: Annotated[
        float | None,
        typer.Option(
            "--wait", envvar="STEM_ENQUEUE_WAIT", help="Wait this many seconds for the result."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Enqueue a task by name and print its id (and its result with --wait)."""
    app = load_app(ctx)
    res = app.send_task(
        task,
        _json_arg(args, "--args", list),
        _json_arg(kwargs, "--kwargs", dict),
        countdown=countdown,
        priority=priority,
        queue=queue,
        expires=expires,
        task_id=task_id,
    )
    if wait is not None:
        if not as_json:
            typer.echo(res.id)
        _print_result(app, res.id, wait, as_json=as_json)
    elif as_json:
        emit_json({"task_id": res.id, "state": res.state})
    else:
        typer.echo(res.id)


def _print_result(app: Any, task_id: str, wait: float | None, *, as_json: bool) -> None:
    res = app.AsyncResult(task_id)
    try:
        rec = res.wait_record(wait) if wait else res.record
    except ResultTimeout:
        if as_json:  # scripts still get the id (of a task just enqueued) and its state
            try:
                now = res.record
            except StemError:  # the store went away meanwhile: the timeout is the news
                now = None
            emit_json(
                {
                    "task_id": task_id,
                    "state": now.state if now is not None else states.PENDING,
                    "timed_out": True,
                }
            )
        raise
    if rec is None:
        if as_json:
            emit_json({"task_id": task_id, "state": states.PENDING})
        else:
            typer.echo(f"{task_id} {states.PENDING}")
        raise typer.Exit(int(ExitCode.NOT_FOUND))
    if as_json:
        emit_json(
            {
                "task_id": rec.task_id,
                "task": rec.task,
                "state": rec.state,
                "result": rec.result,
                "attempt": rec.attempt,
                "progress": rec.progress,
                "error": None
                if rec.error is None
                else {"type": rec.error.type, "message": rec.error.message},
            }
        )
    else:
        line = f"{rec.task_id} {rec.state}"
        if rec.state == states.SUCCESS:
            line += f" {_compact(rec.result)}"
        elif rec.error is not None:
            line += f" {rec.error.type}: {rec.error.message}"
        typer.echo(line)
    if rec.state in states.EXCEPTION_STATES:
        raise typer.Exit(int(ExitCode.TASK_FAILED))
    if rec.state not in states.READY_STATES:  # STARTED, RETRY: `stem result ID && next` waits
        raise typer.Exit(int(ExitCode.TIMEOUT))


def _compact(value: Any) -> str:
    from stem.envelope import dumps

    return dumps(value).decode()


def result(
    ctx: typer.Context,
    task_id: Annotated[str, typer.Argument(help="Task id.")],
    wait: Annotated[
        float | None,
        typer.Option("--wait", envvar="STEM_RESULT_WAIT", help="Wait up to this many seconds."),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Show a task's state and result. Exit 0 on success, 65 if it failed, 66 if there is
    no record of it (PENDING: queued or delayed and not started, or an unknown id; a result
    store keeps no record of what was only enqueued), 75 if it has not finished (STARTED,
    RETRY) or --wait ran out."""
    # Without --wait nothing can appear: a missing SQLite file is a mistyped path (with
    # --wait it may be a store that a worker starting now is about to create).
    _print_result(load_app(ctx, existing=not wait), task_id, wait, as_json=as_json)


def queues(
    ctx: typer.Context,
    names: Annotated[list[str] | None, typer.Argument(help="Queues (default: all).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    internal: Annotated[
        bool,
        typer.Option(
            "--internal",
            help="Also list Stem's control and reply queues (stem.control.*, stem.reply.*); "
            "the events queue (stem.events), whose depth matters, is always listed.",
        ),
    ] = False,
) -> None:
    """Queue depths: ready, delayed, reserved and dead-lettered messages."""
    app = load_app(ctx, existing=True)
    stats = app.broker.stats(names or None)
    if not names and not internal:
        stats = [s for s in stats if not s.queue.startswith(("stem.control.", "stem.reply."))]
    if as_json:
        emit_json(
            [
                {
                    "queue": s.queue,
                    "ready": s.ready,
                    "delayed": s.delayed,
                    "reserved": s.reserved,
                    "dead": s.dead,
                }
                for s in stats
            ]
        )
        return
    from rich.table import Table

    table = Table("queue", "ready", "delayed", "reserved", "dead")
    for s in stats:
        table.add_row(s.queue, str(s.ready), str(s.delayed), str(s.reserved), str(s.dead))
    print_table(table)
