"""``stem dlq list|show|replay|purge``."""

from __future__ import annotations

import time
from typing import Annotated

import typer

from stem.cli.context import emit_json, fail, load_app
from stem.cli.exitcodes import ExitCode

app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Option("--queue", "-q", envvar="STEM_DLQ_QUEUE")] = None,
    limit: Annotated[int, typer.Option("--limit", envvar="STEM_DLQ_LIMIT", min=1)] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead letters, oldest first."""
    letters = load_app(ctx).broker.dlq_list(queue, limit)
    rows = [
        {
            "id": d.id,
            "message_id": d.message_id,
            "queue": d.queue,
            "reason": d.reason,
            "detail": d.detail,
            "deliveries": d.delivery_count,
            "dead_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d.dead_ms / 1000)),
        }
        for d in letters
    ]
    if as_json:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "queue", "reason", "detail", "deliveries", "dead at")
    for r in rows:
        table.add_row(
            str(r["id"]),
            str(r["queue"]),
            str(r["reason"]),
            str(r["detail"])[:60],
            str(r["deliveries"]),
            str(r["dead_at"]),
        )
    Console().print(table)


@app.command("show")
def show(ctx: typer.Context, dead_id: Annotated[str, typer.Argument()]) -> None:
    """One dead letter, with its message body."""
    d = load_app(ctx).broker.dlq_get(dead_id)
    if d is None:
        fail(f"no dead letter {dead_id!r}", ExitCode.NOT_FOUND)
    emit_json(
        {
            "id": d.id,
            "message_id": d.message_id,
            "queue": d.queue,
            "reason": d.reason,
            "detail": d.detail,
            "deliveries": d.delivery_count,
            "dead_ms": d.dead_ms,
            "body": d.body.decode("utf-8", errors="replace"),
        }
    )


def _selection(ids: list[str] | None, queue: str | None, all_: bool) -> list[str] | None:
    if not ids and not queue and not all_:
        fail("name dead letter ids, or --queue Q, or --all", ExitCode.USAGE)
    return ids or None


@app.command("replay")
def replay(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letter ids.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
) -> None:
    """Put dead letters back on their queues (delivery count reset)."""
    n = load_app(ctx).broker.dlq_replay(_selection(ids, queue, all_), queue)
    typer.echo(f"replayed {n}")


@app.command("purge")
def purge(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letter ids.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
) -> None:
    """Delete dead letters for good."""
    selection = _selection(ids, queue, all_)
    if not yes and not typer.confirm("Delete these dead letters for good?"):
        raise typer.Exit(int(ExitCode.FAILURE))
    n = load_app(ctx).broker.dlq_purge(selection, queue)
    typer.echo(f"purged {n}")
