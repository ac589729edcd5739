"""``stem beat`` and ``stem schedule list|add|remove|enable|disable|run-now|dry-run``."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Annotated, Any

import typer

from stem.cli.context import (
    absent_sqlite_file,
    emit_json,
    fail,
    load_app,
    print_table,
    require_sqlite_file,
    state,
)
from stem.cli.exitcodes import ExitCode
from stem.errors import BrokerConnectionError

app = typer.Typer(
    help="List, add, remove, enable, disable, run and preview beat schedules.",
    no_args_is_help=True,
)


def config_specs(settings: Any) -> dict[str, dict[str, Any]]:
    """``beat.schedules`` of the loaded settings as dict specs (empty without settings)."""
    schedules = getattr(getattr(settings, "beat", None), "schedules", None) or {}
    out: dict[str, dict[str, Any]] = {}
    for name, entry in schedules.items():
        if dataclasses.is_dataclass(entry) and not isinstance(entry, type):
            spec = dataclasses.asdict(entry)
        else:
            spec = dict(entry)
        spec.pop("name", None)
        spec.update(spec.pop("options", None) or {})
        if isinstance(spec.get("args"), tuple):
            spec["args"] = list(spec["args"])
        out[name] = {k: v for k, v in spec.items() if v is not None}
    return out


def _settings_tick_s(settings: Any) -> float | None:
    tick = getattr(getattr(settings, "beat", None), "tick_s", None)
    return float(tick) if isinstance(tick, int | float) else None


def beat(
    ctx: typer.Context,
    tick_s: Annotated[
        float | None,
        typer.Option(
            "--tick",
            envvar="STEM_BEAT_TICK_S",
            help="Seconds between passes over the stored schedules (default: config, or 0.5).",
        ),
    ] = None,
    beat_id: Annotated[
        str | None,
        typer.Option("--id", envvar="STEM_BEAT_ID", help="This beat's id (default host:pid)."),
    ] = None,
    prune: Annotated[
        bool,
        typer.Option(
            "--prune/--no-prune",
            envvar="STEM_BEAT_PRUNE",
            help=(
                "Remove stored code/config schedules that the app and config no longer "
                "define (without it, beat names them in a warning; they keep firing)."
            ),
        ),
    ] = False,
) -> None:
    """Run the scheduler until SIGTERM/SIGINT. Several may run at once: each tick is
    enqueued exactly once."""
    from stem.beat import Beat
    from stem.worker.service import Notifier

    stem_app = load_app(ctx, gates=True)
    notifier = Notifier.from_environ()
    try:
        settings = state(ctx).settings
        tick = tick_s if tick_s is not None else _settings_tick_s(settings) or 0.5
        scheduler = Beat(
            stem_app, tick_s=tick, beat_id=beat_id, specs=config_specs(settings), prune=prune
        )
        # For systemd (Type=notify) and stem-multi: ready once the app loaded, the gates
        # passed and the schedules parsed (what fails a start for good); a broker that does
        # not answer yet is ridden out in the loop, and the status says when a pass first
        # reached it.
        scheduler.defined_entries()
        notifier.notify(READY=1, MAINPID=os.getpid(), STATUS=f"beat {scheduler.beat_id} starting")
        scheduler.run(on_ready=lambda: notifier.notify(STATUS=f"beat {scheduler.beat_id} running"))
        notifier.notify(STOPPING=1)
    finally:
        notifier.close()
        stem_app.close()


# -- stem schedule ------------------------------------------------------------------------------


def _store(ctx: typer.Context, *, create: bool = False) -> Any:
    """The schedule store. Only ``add`` may create a SQLite database: the others refuse a
    missing file (a mistyped path) rather than create one and report it empty."""
    from stem.beat import ScheduleStore

    stem_app = load_app(ctx)
    if not create:
        require_sqlite_file(stem_app.broker_url, BrokerConnectionError)
    return ScheduleStore(stem_app.broker, stem_app.keyring)


def _find(ctx: typer.Context, name: str) -> Any:
    """The stored entry, else one the app or config defines (not yet synced by a beat)."""
    from stem.beat import parse_entry

    stem_app = load_app(ctx)
    if absent_sqlite_file(stem_app.broker_url) is None:  # else nothing is stored yet
        entry = _store(ctx).get(name)  # the app loaded above (load_app keeps it)
        if entry is not None:
            return entry
    for origin, specs in (
        ("config", config_specs(state(ctx).settings)),
        ("code", stem_app.schedules),
    ):
        if name in specs:
            return parse_entry(name, specs[name], origin=origin)
    fail(f"no schedule named {name!r}", ExitCode.NOT_FOUND)


def _iso(t_ms: int | None) -> str | None:
    from stem.beat.schedules import iso_ms

    return None if t_ms is None else iso_ms(t_ms)


@app.command("list")
def list_(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Stored schedules with their last and next ticks."""
    from stem.envelope import now_ms

    store = _store(ctx)
    stored = store.load()
    lasts = store.lasts()
    now = now_ms()
    rows: list[dict[str, Any]] = []
    for name, entry in stored.entries.items():
        nxt = entry.schedule.next_after(now) if entry.enabled else None
        rows.append(
            {
                "name": name,
                "task": entry.task,
                "schedule": entry.describe(),
                "enabled": entry.enabled,
                "origin": entry.origin,
                "last": _iso(lasts.get(name)),
                "next": _iso(nxt),
                "spec": entry.to_spec(),
            }
        )
    for name, problem in stored.broken.items():
        rows.append({"name": name, "error": problem, "enabled": False})
    rows.sort(key=lambda r: str(r["name"]))
    if as_json:
        emit_json(rows)
        return
    from rich.table import Table

    table = Table("name", "task", "schedule", "enabled", "origin", "last tick", "next tick")
    for r in rows:
        if "error" in r:
            table.add_row(str(r["name"]), "-", f"[red]{r['error']}[/red]", "no", "-", "-", "-")
            continue
        table.add_row(
            str(r["name"]),
            str(r["task"]),
            str(r["schedule"]),
            "yes" if r["enabled"] else "no",
            str(r["origin"]),
            str(r["last"] or "-"),
            str(r["next"] or "-"),
        )
    print_table(table)


def _json_arg(option: str, text: str | None, kind: type) -> Any:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise typer.BadParameter(f"{option} must be JSON: {exc}") from None
    if not isinstance(value, kind):
        raise typer.BadParameter(f"{option} must be a JSON {kind.__name__}")
    return value


@app.command("add")
def add(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="The entry's name.")],
    task: Annotated[str, typer.Option("--task", "-t", help="The task name to enqueue.")],
    every: Annotated[
        str | None, typer.Option("--every", help="Interval: seconds or '30s', '5m', '2h', '1d'.")
    ] = None,
    cron: Annotated[str | None, typer.Option("--cron", help="Five-field cron expression.")] = None,
    at: Annotated[
        str | None, typer.Option("--at", help="Fire once at this ISO 8601 datetime.")
    ] = None,
    solar: Annotated[
        str | None,
        typer.Option("--solar", help="sunrise, sunset, solar_noon, dawn, dusk (+ --lat/--lon)."),
    ] = None,
    lat: Annotated[float | None, typer.Option("--lat", help="Latitude for --solar.")] = None,
    lon: Annotated[float | None, typer.Option("--lon", help="Longitude for --solar.")] = None,
    offset: Annotated[
        str | None, typer.Option("--offset", help="Shift a solar event: '-15m', '600'.")
    ] = None,
    calendar: Annotated[
        str | None,
        typer.Option("--calendar", help='JSON like {"weekdays": ["mon"], "hours": [9]}.'),
    ] = None,
    tz: Annotated[str | None, typer.Option("--tz", help="IANA timezone for cron/calendar.")] = None,
    start: Annotated[str | None, typer.Option("--start", help="No tick before (ISO).")] = None,
    end: Annotated[str | None, typer.Option("--end", help="ISO datetime: no tick after.")] = None,
    args: Annotated[str | None, typer.Option("--args", help="JSON list of arguments.")] = None,
    kwargs: Annotated[str | None, typer.Option("--kwargs", help="JSON object.")] = None,
    queue: Annotated[str | None, typer.Option("--queue", "-q")] = None,
    priority: Annotated[int | None, typer.Option("--priority", "-p")] = None,
    expires: Annotated[
        str | None,
        typer.Option("--expires", help="Drop a run not started by then."),
    ] = None,
    jitter: Annotated[
        str | None, typer.Option("--jitter", help="Delay each run by up to this long.")
    ] = None,
    catch_up: Annotated[
        bool, typer.Option("--catch-up", help="After downtime, run every missed tick.")
    ] = False,
    disabled: Annotated[bool, typer.Option("--disabled", help="Store it disabled.")] = False,
    replace: Annotated[bool, typer.Option("--replace", help="Overwrite.")] = False,
) -> None:
    """Add (or with --replace, overwrite) a stored schedule; running beats pick it up."""
    from stem.beat import parse_entry
    from stem.beat.scheduler import unknown_task

    spec: dict[str, Any] = {
        "task": task,
        "every": every,
        "cron": cron,
        "at": at,
        "calendar": _json_arg("--calendar", calendar, dict),
        "tz": tz,
        "start": start,
        "end": end,
        "args": _json_arg("--args", args, list),
        "kwargs": _json_arg("--kwargs", kwargs, dict),
        "queue": queue,
        "priority": priority,
        "expires": expires,
        "jitter": jitter,
        "catch_up": catch_up,
        "enabled": not disabled,
    }
    if solar is not None:
        spec["solar"] = {"event": solar, "latitude": lat, "longitude": lon, "offset": offset or 0}
    entry = parse_entry(name, spec, origin="cli")
    store = _store(ctx, create=True)
    existed = store.exists(name)  # loadable or not: --replace also mends a broken entry
    if not store.put(entry, replace=replace):
        fail(f"schedule {name!r} exists; pass --replace to overwrite it", ExitCode.FAILURE)
    verb = "replaced" if existed else "added"
    typer.echo(f"{verb} {name}: {entry.task} {entry.describe()}")
    if problem := unknown_task(load_app(ctx), entry):
        typer.echo(f"warning: {problem}", err=True)


@app.command("remove")
def remove(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Delete a stored schedule (and its last tick)."""
    from stem.errors import ConfigError

    store = _store(ctx)
    try:
        entry = store.get(name)
    except ConfigError:
        entry = None  # a broken entry (unsigned, say) can still be removed
    if not store.remove(name):
        fail(f"no schedule named {name!r}", ExitCode.NOT_FOUND)
    typer.echo(f"removed {name}")
    if entry is not None and entry.origin in ("code", "config"):
        typer.echo(
            f"note: {name} is defined in {entry.origin}; a beat that starts will store it "
            "again (disable it, or remove it from the " + entry.origin + ")",
            err=True,
        )


@app.command("reseal")
def reseal(
    ctx: typer.Context,
    unsigned: Annotated[
        bool,
        typer.Option(
            "--unsigned",
            help="Also seal entries that carry no seal at all (written before signing was "
            "turned on). Check them with `stem schedule list` first: you vouch for them.",
        ),
    ] = False,
) -> None:
    """Write every stored schedule again, sealed with the active signing key: after
    switching keys (before the old one is retired), or once after turning signing on."""
    done, skipped = _store(ctx).reseal(unsigned=unsigned)
    for name in done:
        typer.echo(f"sealed {name}")
    for name, why in skipped.items():
        typer.echo(f"skipped {name}: {why}", err=True)
    if skipped:
        raise typer.Exit(int(ExitCode.FAILURE))


def _set_enabled(ctx: typer.Context, name: str, enabled: bool) -> None:
    from stem.envelope import now_ms

    if not _store(ctx).set_enabled(name, enabled, now_ms=now_ms()):
        fail(f"no schedule named {name!r}", ExitCode.NOT_FOUND)
    typer.echo(f"{'enabled' if enabled else 'disabled'} {name}")


@app.command("enable")
def enable(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Enable a schedule; ticks missed while it was disabled do not fire."""
    _set_enabled(ctx, name, True)


@app.command("disable")
def disable(ctx: typer.Context, name: Annotated[str, typer.Argument()]) -> None:
    """Disable a schedule (kept across beat restarts)."""
    _set_enabled(ctx, name, False)


@app.command("run-now")
def run_now(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Enqueue the schedule's task once now, with its arguments and options (the schedule
    itself is not changed)."""
    from stem.envelope import now_ms

    entry = _find(ctx, name)
    task_id = f"beat-{name}-now-{now_ms()}"
    load_app(ctx).send_task(
        entry.task,
        entry.args,
        entry.kwargs,
        task_id=task_id,
        queue=entry.queue,
        priority=entry.priority,
        expires=entry.expires_s,
        headers={"beat_entry": name},
    )
    if as_json:
        emit_json({"name": name, "task": entry.task, "task_id": task_id})
    else:
        typer.echo(task_id)


@app.command("dry-run")
def dry_run(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument()],
    count: Annotated[int, typer.Option("-n", "--count", min=1, max=10000)] = 10,
    after: Annotated[
        str | None, typer.Option("--after", help="Start from this ISO datetime (default now).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json")] = False,
) -> None:
    """Print the next N fire times (UTC, and local time for a timezone)."""
    from stem.beat.schedules import iso_ms, jitter_ms, upcoming
    from stem.envelope import now_ms

    entry = _find(ctx, name)
    start = now_ms()
    if after is not None:
        from stem.beat.entry import parse_instant_ms

        start = parse_instant_ms(after, tz=entry.when.get("tz"), what="--after")
    ticks = upcoming(entry.schedule, start, count)
    zone = _zone(entry.when.get("tz"))
    rows = [
        {
            "tick_ms": t,
            "utc": iso_ms(t),
            **({"local": iso_ms(t, zone)} if zone is not None else {}),
            **({"jitter_s": jitter_ms(name, t, entry.jitter_s) / 1000} if entry.jitter_s else {}),
        }
        for t in ticks
    ]
    if as_json:
        emit_json({"name": name, "schedule": entry.describe(), "ticks": rows})
        return
    typer.echo(f"{name}: {entry.task} {entry.describe()}")
    for r in rows:
        local = f"  ({r['local']})" if "local" in r else ""
        typer.echo(f"{r['utc']}{local}")
    if not rows:
        typer.echo("no more ticks")


def _zone(tz: Any) -> Any:
    if not isinstance(tz, str) or tz == "UTC":
        return None
    from zoneinfo import ZoneInfo

    return ZoneInfo(tz)
