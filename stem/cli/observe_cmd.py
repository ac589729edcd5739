"""``stem events`` and ``stem workers``."""

from __future__ import annotations

import json
import sys
import time
from typing import Annotated, Any

import typer

from stem.cli.context import emit_json, load_app, print_table
from stem.observability.events import tail
from stem.observability.heartbeats import list_workers


def _clock(ms: Any) -> str:
    if not isinstance(ms, int):
        return "-"
    return time.strftime("%H:%M:%S", time.localtime(ms / 1000)) + f".{ms % 1000:03d}"


def format_event(event: dict[str, Any]) -> str:
    """One line for a human: time, type, task, id, worker, then what else it says."""
    head = [
        _clock(event.get("ts_ms")),
        f"{event.get('type', '?'):<18}",
        str(event.get("task") or "-"),
        str(event.get("task_id") or "-"),
    ]
    shown = {"ts_ms", "type", "task", "task_id"}
    rest = [f"{k}={event[k]}" for k in sorted(event) if k not in shown]
    return "  ".join(head + rest)


def events(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object per line.")] = False,
    follow: Annotated[
        bool, typer.Option("--follow/--no-follow", help="Keep waiting for new events.")
    ] = True,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Stop after this many events.")
    ] = None,
) -> None:
    """Tail the events workers publish (they need ``stem worker --events``).

    The stream is a queue: each event is shown by one tailer only, so two
    ``stem events`` running at once split it between them, and an event written
    out is taken off it: to look at a few, use ``--limit N`` rather than
    ``| head`` (whatever the pipe holds before head exits is taken too)."""
    app = load_app(ctx, existing=True)
    try:
        for event in tail(app.broker, follow=follow, limit=limit):
            line = json.dumps(event, sort_keys=True) if as_json else format_event(event)
            sys.stdout.write(line + "\n")
            sys.stdout.flush()
    except KeyboardInterrupt:
        return


def _processed(record: dict[str, Any]) -> str:
    counts = record.get("processed")
    if not isinstance(counts, dict):
        return "-"
    return str(sum(v for v in counts.values() if isinstance(v, int)))


def _ago(record: dict[str, Any], key: str) -> str:
    at, last = record.get("at_ms"), record.get(key)
    if not isinstance(at, int) or not isinstance(last, int) or last <= 0:
        return "-"
    return f"{max(0, at - last) / 1000:.1f}s"


def workers(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Workers with a heartbeat in the broker: online, lost (no beat for two heartbeats)
    or offline (stopped cleanly, shown for a minute)."""
    rows = list_workers(load_app(ctx, existing=True).broker)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        typer.echo("no workers")
        return
    from rich.table import Table

    table = Table(
        "worker", "status", "host", "pid", "pool", "running", "processed", "last consume", "beat"
    )
    for r in rows:
        table.add_row(
            str(r.get("worker")),
            str(r.get("status")),
            str(r.get("host", "-")),
            str(r.get("pid", "-")),
            f"{r.get('pool', '-')}/{r.get('concurrency', '-')}",
            str(r.get("running", "-")),
            _processed(r),
            _ago(r, "last_consume_ms"),
            f"{r['age_s']}s ago" if r.get("age_s") is not None else "-",
        )
    print_table(table)
