"""``stem dlq list|show|replay|purge``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from stem.app import Stem
from stem.brokers.base import DLQ_LIST_MAX, Broker, DeadLetter, Message
from stem.cli.context import emit_json, fail, load_app, print_table
from stem.cli.exitcodes import ExitCode
from stem.envelope import Envelope, decode, now_ms
from stem.errors import DecodeError, SignatureError

app = typer.Typer(help="Inspect, replay and purge dead letters.", no_args_is_help=True)


@app.command("list")
def list_(
    ctx: typer.Context,
    queue: Annotated[str | None, typer.Option("--queue", "-q", envvar="STEM_DLQ_QUEUE")] = None,
    limit: Annotated[
        int, typer.Option("--limit", envvar="STEM_DLQ_LIMIT", min=1, max=DLQ_LIST_MAX)
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Dead letters, oldest first."""
    letters = load_app(ctx, existing=True).broker.dlq_list(queue, limit)
    rows = [
        {
            "id": d.id,
            "message_id": d.message_id,
            "queue": d.queue,
            "reason": d.reason,
            "detail": d.detail,
            "deliveries": d.delivery_count,
            "dead_at": _iso(d.dead_ms),
        }
        for d in letters
    ]
    if as_json:
        emit_json(rows)
        return
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
    print_table(table)


@app.command("show")
def show(ctx: typer.Context, dead_id: Annotated[str, typer.Argument()]) -> None:
    """One dead letter, with its message body."""
    d = load_app(ctx, existing=True).broker.dlq_get(dead_id)
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


def _iso(ms: int) -> str:
    """UTC time of an epoch-ms stamp; the number itself where it is no time (a row
    written by something else than Stem)."""
    try:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000))
    except (OverflowError, OSError, ValueError, TypeError):
        return str(ms)


def _selection(ids: list[str] | None, queue: str | None, all_: bool) -> list[str] | None:
    if not ids and not queue and not all_:
        fail("name dead letter ids, or --queue Q, or --all", ExitCode.USAGE)
    return ids or None


_BATCH = 500


def _batches(
    broker: Broker,
    ids: list[str] | None,
    queue: str | None,
    missing: list[str],
    limit: int | None = None,
) -> Iterator[list[DeadLetter]]:
    """Dead letters in batches: the named ones (ids not found are added to ``missing``),
    else those of ``queue`` (or all), at most ``limit`` of them: a replayed message that a
    running worker dead-letters again (a forged one, say) must not be replayed again."""
    if ids:
        found: dict[str, DeadLetter] = {}  # by the store's own id: "7" and "07" are one
        for dead_id in ids:
            d = broker.dlq_get(dead_id)
            if d is None:
                missing.append(dead_id)
            else:
                found.setdefault(d.id, d)
        letters = list(found.values())
        for i in range(0, len(letters), _BATCH):
            yield letters[i : i + _BATCH]
        return
    left = limit
    while left is None or left > 0:  # each batch leaves the DLQ before the next is read
        letters = broker.dlq_list(queue, _BATCH if left is None else min(_BATCH, left))
        if not letters:
            return
        if left is not None:
            left -= len(letters)
        yield letters


def _genuine(app: Stem, d: DeadLetter) -> Envelope | None:
    """The dead letter's envelope if its signature verifies with this keyring (however old
    it is); else None. What a dead letter's reason says is not evidence: it is unsigned
    broker data, like the rest of the letter but its signed body."""
    keyring = app.keyring
    try:
        env = decode(d.body, max_bytes=app.max_message_bytes)
        if keyring is None or env.signature is None:
            return None
        keyring.verify(env, body=d.body, fresh=False)
    except (DecodeError, SignatureError):
        return None
    return env


def _replay_batch(app: Stem, letters: list[DeadLetter], resign: bool) -> int:
    broker = app.broker
    fresh: list[Message] = []
    moved: list[str] = []
    for d in letters:
        env = _genuine(app, d) if resign else None
        if env is None:
            moved.append(d.id)
        else:
            # A fresh signature, so an old message is not refused as signature-expired; on
            # the queue it was signed for, and not before its ETA if that is still ahead.
            later = env.not_before_ms is not None and env.not_before_ms > now_ms()
            env = env.replace(signature=None, not_before_ms=env.not_before_ms if later else None)
            fresh.append(Message(env.id, env.queue, app.seal(env), env.priority, env.not_before_ms))
    n = broker.dlq_replay(moved) if moved else 0
    if fresh:
        app.publish_messages(fresh)
        done = broker.dlq_purge([d.id for d in letters if d.id not in moved])
        n += done
    return n


def _purge_batch(app: Stem, letters: list[DeadLetter]) -> int:
    """Delete dead letters for good, and let a new task take the unique key each held (a
    dead task keeps it while a replay may still run it)."""
    n = app.broker.dlq_purge([d.id for d in letters])
    for d in letters:
        # Unverified, like the unique-key store itself (a broker writer can free any key
        # there directly: SECURITY.md, what is not signed).
        try:
            env = decode(d.body, max_bytes=app.max_message_bytes)
        except DecodeError:
            continue
        key = env.headers.get("unique_key")
        if isinstance(key, str):
            app.broker.release(key, env.id)  # only if this task still holds it
    return n


def _not_found(missing: list[str]) -> None:
    if missing:
        shown = ", ".join(repr(m) for m in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        fail(f"no dead letter {shown}{more}", ExitCode.NOT_FOUND)


def _progress(what: str) -> Progress:
    return Progress(
        TextColumn(what),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    )


@app.command("replay")
def replay(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letter ids.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Put dead letters back on their queues (delivery count reset). With a signing key,
    letters whose signature verifies (however old) are re-signed, so an old signature does
    not expire them again; all others (unsigned, forged, altered, signed with a retired
    key) are moved back untouched, for a worker to refuse again."""
    selection = _selection(ids, queue, all_)
    stem_app = load_app(ctx, existing=True)
    keyring = stem_app.keyring
    resign = keyring is not None and keyring.can_sign
    total = (
        len(selection)
        if selection
        else sum(s.dead for s in stem_app.broker.stats([queue] if queue else None))
    )
    n = 0
    missing: list[str] = []
    with _progress("replaying") as bar:
        task = bar.add_task("replay", total=total)
        for letters in _batches(stem_app.broker, selection, queue, missing, limit=total):
            done = _replay_batch(stem_app, letters, resign)
            n += done
            bar.advance(task, len(letters))
            if not done:
                break
    if as_json:
        emit_json({"replayed": n})
    else:
        typer.echo(f"replayed {n}")
    _not_found(missing)


@app.command("purge")
def purge(
    ctx: typer.Context,
    ids: Annotated[list[str] | None, typer.Argument(help="Dead letter ids.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Every dead letter.")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Delete dead letters for good."""
    selection = _selection(ids, queue, all_)
    if not yes and not typer.confirm("Delete these dead letters for good?"):
        raise typer.Exit(int(ExitCode.FAILURE))
    stem_app = load_app(ctx, existing=True)
    n = 0
    missing: list[str] = []
    with _progress("purging") as bar:
        task = bar.add_task("purge", total=None)
        for letters in _batches(stem_app.broker, selection, queue, missing):
            done = _purge_batch(stem_app, letters)
            n += done
            bar.advance(task, len(letters))
            if not done:
                break
    if as_json:
        emit_json({"purged": n})
    else:
        typer.echo(f"purged {n}")
    _not_found(missing)
