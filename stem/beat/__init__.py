"""Beat: the periodic task scheduler (``stem beat``) and its schedule store.

Entries come from code (``app.schedule(...)``), from config (``beat.schedules.<name>``) and
from ``stem schedule add``; all share one dict form (see :mod:`stem.beat.entry`) and live in
the broker's store, where operators can disable, enable, add and remove them at run time.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from stem.beat.entry import ScheduleEntry, parse_entry
from stem.beat.scheduler import Beat, TickReport, task_id_for
from stem.beat.store import ScheduleStore

if TYPE_CHECKING:
    from stem.app import Stem

__all__ = [
    "Beat",
    "ScheduleEntry",
    "ScheduleStore",
    "TickReport",
    "add_schedule",
    "parse_entry",
    "task_id_for",
]


def add_schedule(
    app: Stem,
    name: str,
    task: Any,
    *,
    every: float | timedelta | str | None = None,
    cron: str | None = None,
    tz: str | None = None,
    args: Sequence[Any] = (),
    kwargs: dict[str, Any] | None = None,
    queue: str | None = None,
    priority: int | None = None,
    expires: float | timedelta | None = None,
    jitter: float | timedelta | None = None,
    catch_up: bool = False,
    start: datetime | str | None = None,
    end: datetime | str | None = None,
    solar: dict[str, Any] | None = None,
    calendar: dict[str, Any] | None = None,
    at: datetime | str | None = None,
    enabled: bool = True,
) -> ScheduleEntry:
    """Validate a schedule and record it in ``app.schedules[name]`` (the canonical dict
    form), for ``stem beat`` to write to the store when it starts. ``task`` is a task name
    or a registered task. Raises :class:`~stem.errors.ConfigError` naming the bad field."""
    spec: dict[str, Any] = {
        "task": getattr(task, "name", task),
        "every": every,
        "cron": cron,
        "tz": tz,
        "args": list(args),
        "kwargs": kwargs,
        "queue": queue,
        "priority": priority,
        "expires": expires,
        "jitter": jitter,
        "catch_up": catch_up,
        "start": start,
        "end": end,
        "solar": solar,
        "calendar": calendar,
        "at": at,
        "enabled": enabled,
    }
    entry = parse_entry(name, spec, origin="code")
    app.schedules[name] = entry.to_spec()
    return entry
