"""Schedule entries and their dict form (config ``beat.schedules.<name>``, ``app.schedule``,
``stem schedule add`` and the stored JSON all use it; the configuration takes every field
but ``enabled``, which is the operator's, and ``origin``).

Exactly one of ``every`` (seconds, ``"5m"``, or a timedelta), ``cron`` (five fields),
``solar`` (``{event, latitude, longitude, offset}``), ``calendar`` (``{months, weekdays,
days, hours, minutes}``) or ``at`` (an ISO datetime: fire once). Optional: ``tz`` (for cron
and calendar, and for datetimes written without an offset), ``start``/``end`` (a window),
``args``, ``kwargs``, ``queue``, ``priority``, ``expires`` (seconds after the tick),
``jitter`` (delay each run by up to this many seconds), ``catch_up``, ``enabled``.

:func:`parse_entry` validates a spec and returns an entry whose :meth:`ScheduleEntry.to_spec`
is the canonical, JSON-able form (``every_s``, ``expires_s``, ``jitter_s``, UTC datetimes).
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Any, NoReturn
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import CroniterError, croniter

from stem.beat.calendar import calendar_cron
from stem.beat.schedules import Cron, Interval, OneOff, Schedule, Window, iso_ms
from stem.beat.solar import EVENTS, Solar
from stem.envelope import PRIORITY_MAX, PRIORITY_MIN, dumps, queue_problem
from stem.errors import ConfigError, EncodeError

__all__ = ["KINDS", "ORIGINS", "EntryError", "ScheduleEntry", "parse_entry", "parse_instant_ms"]

KINDS = ("every", "cron", "solar", "calendar", "at")
ORIGINS = ("code", "config", "cli")
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,127}")
_ALIASES = {"every": "every_s", "expires": "expires_s", "jitter": "jitter_s", "timezone": "tz"}
_KEYS = {
    "task", "every_s", "cron", "solar", "calendar", "at", "tz", "start", "end", "args",
    "kwargs", "queue", "priority", "expires_s", "jitter_s", "catch_up", "enabled", "origin",
}  # fmt: skip
_UNITS_S = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_DURATION_S = 100 * 365 * 86400.0  # beyond it, ticks leave the calendar (year 9999)
_DURATION_RE = re.compile(r"\s*([+-]?\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w)?\s*")


class EntryError(ConfigError):
    """A spec :func:`parse_entry` refused; ``field`` is its key as the spec wrote it (None:
    the entry as a whole), ``problem`` the message without the entry and field, ``hint``
    a likely fix."""

    def __init__(
        self, message: str, *, field: str | None, problem: str, hint: str | None = None
    ) -> None:
        super().__init__(message)
        self.field = field
        self.problem = problem
        self.hint = hint


@dataclass(frozen=True)
class ScheduleEntry:
    """One validated schedule entry (see module docstring)."""

    name: str
    task: str
    kind: str
    schedule: Schedule
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    queue: str | None = None
    priority: int | None = None
    expires_s: float | None = None
    jitter_s: float | None = None
    catch_up: bool = False
    enabled: bool = True
    origin: str = "code"
    when: Mapping[str, Any] = field(default_factory=dict)  # canonical schedule keys

    @property
    def one_off(self) -> bool:
        return self.kind == "at"

    def describe(self) -> str:
        return self.schedule.describe()

    def with_enabled(self, enabled: bool) -> ScheduleEntry:
        return replace(self, enabled=enabled)

    def to_spec(self) -> dict[str, Any]:
        """The canonical dict form; ``parse_entry(name, to_spec())`` gives an equal entry."""
        spec: dict[str, Any] = {"task": self.task, **self.when}
        if self.args:
            spec["args"] = list(self.args)
        if self.kwargs:
            spec["kwargs"] = dict(self.kwargs)
        for key in ("queue", "priority", "expires_s", "jitter_s"):
            value = getattr(self, key)
            if value is not None:
                spec[key] = value
        if self.catch_up:
            spec["catch_up"] = True
        spec["enabled"] = self.enabled
        spec["origin"] = self.origin
        return spec


class _Spec:
    """Reads one spec dict, raising ConfigError messages that name the entry and field."""

    def __init__(self, name: str, raw: Mapping[str, Any], *, label: str | None = None) -> None:
        self.name = name
        self.label = label  # what errors name instead of "schedule NAME, field KEY"
        self.raw: dict[str, Any] = {}
        self.written: dict[str, str] = {}  # canonical key -> the key the spec used
        for key, value in raw.items():
            canon = _ALIASES.get(key, key)
            if canon not in _KEYS:
                near = difflib.get_close_matches(key, [*_KEYS, *_ALIASES], n=1)
                self.fail(key, "unknown field", hint=f"did you mean {near[0]!r}?" if near else None)
            if canon in self.raw:
                self.fail(key, f"given twice (as {canon!r} and an alias)")
            if value is not None:
                self.raw[canon] = value
                self.written[canon] = str(key)

    def fail(self, key: str | None, problem: str, *, hint: str | None = None) -> NoReturn:
        key = self.written.get(key, key) if key else key
        where = self.label or f"schedule {self.name!r}" + (f", field {key!r}" if key else "")
        said = f"{problem} ({hint})" if hint else problem
        raise EntryError(f"{where}: {said}", field=key, problem=problem, hint=hint)

    def get(self, key: str) -> Any:
        return self.raw.get(key)

    def text(self, key: str, *, required: bool = False) -> str | None:
        value = self.raw.get(key)
        if value is None:
            if required:
                self.fail(key, "is required")
            return None
        if not isinstance(value, str) or not value.strip() or len(value) > 255:
            self.fail(key, "expected a non-empty string of at most 255 characters")
        return value.strip()

    def flag(self, key: str, default: bool) -> bool:
        value = self.raw.get(key, default)
        if not isinstance(value, bool):
            self.fail(key, f"expected true or false, got {value!r}")
        return value

    def seconds(self, key: str, value: Any, *, allow_negative: bool = False) -> float:
        if isinstance(value, timedelta):
            s = value.total_seconds()
        elif isinstance(value, int | float) and not isinstance(value, bool):
            s = float(value)
        elif isinstance(value, str) and (m := _DURATION_RE.fullmatch(value)):
            s = float(m.group(1)) * _UNITS_S[m.group(2) or "s"]
        else:
            self.fail(key, f"expected seconds, a timedelta or a duration like '5m', got {value!r}")
        if not math.isfinite(s) or (s < 0 and not allow_negative):
            self.fail(key, f"expected a non-negative duration, got {value!r}")
        if abs(s) > MAX_DURATION_S:
            self.fail(key, f"expected a duration of at most 100 years, got {value!r}")
        return s

    def opt_seconds(self, key: str, *, positive: bool) -> float | None:
        value = self.raw.get(key)
        if value is None:
            return None
        s = self.seconds(key, value)
        if positive and s <= 0:
            self.fail(key, f"must be above 0 seconds, got {value!r}")
        return s

    def zone(self) -> tuple[str, tzinfo | None]:
        tz = self.text("tz")
        if tz is None:
            return "UTC", None
        if tz.upper() == "UTC":
            return "UTC", UTC
        try:
            return tz, ZoneInfo(tz)
        except (ZoneInfoNotFoundError, ValueError):
            self.fail("tz", f"unknown timezone {tz!r} (use an IANA name like 'Europe/Berlin')")

    def instant_ms(self, key: str, zone: tzinfo | None) -> int | None:
        value = self.raw.get(key)
        if value is None:
            return None
        if isinstance(value, str):
            try:
                value = datetime.fromisoformat(value.strip())
            except ValueError:
                self.fail(key, f"expected an ISO 8601 datetime, got {value!r}")
        if not isinstance(value, datetime):
            self.fail(key, f"expected an ISO 8601 datetime, got {value!r}")
        if value.tzinfo is None:
            if zone is None:
                self.fail(key, "a datetime needs a UTC offset (like +00:00 or Z) or a 'tz' field")
            value = value.replace(tzinfo=zone)
        delta = value - datetime(1970, 1, 1, tzinfo=UTC)
        return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


def _build_cron(s: _Spec, expr: Any, tz_name: str) -> tuple[Cron, dict[str, Any]]:
    if not isinstance(expr, str) or not expr.strip():
        s.fail("cron", "expected a cron expression string like '*/5 * * * *'")
    try:
        cron = Cron(expr, tz_name)
    except ValueError as exc:
        s.fail("cron", f"{exc}, got {expr!r}")
    if not croniter.is_valid(cron.expr):
        s.fail("cron", f"invalid cron expression {expr!r}")
    _check_fires(s, "cron", cron)
    return cron, {"cron": cron.expr, **({"tz": tz_name} if tz_name != "UTC" else {})}


def _check_fires(s: _Spec, key: str, schedule: Cron) -> None:
    try:
        schedule.next_after(0)
    except CroniterError:
        s.fail(key, "never fires (no date matches it)")


def _build_solar(s: _Spec) -> tuple[Solar, dict[str, Any]]:
    raw = s.get("solar")
    if not isinstance(raw, Mapping):
        s.fail("solar", "expected a mapping with event, latitude, longitude and optional offset")
    names = {"lat": "latitude", "lon": "longitude", "lng": "longitude", "offset_s": "offset"}
    spec = {names.get(str(k), str(k)): v for k, v in raw.items()}
    unknown = set(spec) - {"event", "latitude", "longitude", "offset"}
    if unknown:
        s.fail("solar", f"unknown key(s) {sorted(unknown)}")
    event = spec.get("event")
    if event == "noon":
        event = "solar_noon"
    if event not in EVENTS:
        s.fail("solar", f"event must be one of {', '.join(EVENTS)}, got {event!r}")
    coords: dict[str, float] = {}
    for key, limit in (("latitude", 90.0), ("longitude", 180.0)):
        value = spec.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or abs(value) > limit:
            s.fail("solar", f"{key} must be a number between -{limit:g} and {limit:g}")
        coords[key] = float(value)
    offset_s = s.seconds("solar", spec.get("offset", 0), allow_negative=True)
    solar = Solar(event, coords["latitude"], coords["longitude"], round(offset_s * 1000))
    canon: dict[str, Any] = {"event": event, **coords}
    if offset_s:
        canon["offset_s"] = offset_s
    return solar, {"solar": canon}


def _build(s: _Spec) -> tuple[str, Schedule, dict[str, Any]]:
    given = [k for k in ("every_s", "cron", "solar", "calendar", "at") if k in s.raw]
    if len(given) != 1:
        what = f"got {', '.join(s.written[k] for k in given)}" if given else "got none"
        s.fail(None, f"set exactly one of every, cron, solar, calendar or at ({what})")
    kind = given[0]
    tz_name, zone = s.zone()
    start_ms, end_ms = s.instant_ms("start", zone), s.instant_ms("end", zone)
    if start_ms is not None and end_ms is not None and end_ms < start_ms:
        s.fail("end", "is before start")
    window: dict[str, Any] = {}
    if start_ms is not None:
        window["start"] = iso_ms(start_ms)
    if end_ms is not None:
        window["end"] = iso_ms(end_ms)
    when: dict[str, Any]
    schedule: Schedule
    if kind == "every_s":
        every_s = s.opt_seconds("every_s", positive=True)
        assert every_s is not None
        every_ms = round(every_s * 1000)
        if every_ms < 1:
            s.fail("every_s", "must be at least one millisecond")
        schedule, when = Interval(every_ms, start_ms or 0), {"every_s": every_ms / 1000}
        if "tz" in s.raw:
            when["tz"] = tz_name
    elif kind == "cron":
        schedule, when = _build_cron(s, s.get("cron"), tz_name)
    elif kind == "calendar":
        try:
            expr, fields, label = calendar_cron(s.get("calendar"))
        except ValueError as exc:
            s.fail("calendar", str(exc))
        cron = Cron(expr, tz_name, day_or=False, label=label)
        _check_fires(s, "calendar", cron)
        schedule, when = cron, {"calendar": fields}
        if tz_name != "UTC":
            when["tz"] = tz_name
    elif kind == "solar":
        schedule, when = _build_solar(s)
    else:
        if window:
            s.fail("at", "a one-off entry takes no start or end")
        at_ms = s.instant_ms("at", zone)
        assert at_ms is not None
        schedule, when = OneOff(at_ms), {"at": iso_ms(at_ms)}
    if window:
        schedule = Window(schedule, start_ms, end_ms)
    return ("every" if kind == "every_s" else kind), schedule, {**when, **window}


def _json_value(s: _Spec, key: str, check: Callable[[Any], bool], what: str) -> Any:
    value = s.get(key)
    if not check(value):
        s.fail(key, f"expected {what}")
    try:
        dumps(value)
    except EncodeError as exc:
        s.fail(key, str(exc))
    return value


def parse_instant_ms(value: str, *, tz: str | None = None, what: str = "datetime") -> int:
    """An ISO 8601 datetime as epoch ms; one without an offset is read in ``tz``."""
    s = _Spec(what, {"at": value, "tz": tz}, label=what)
    at_ms = s.instant_ms("at", s.zone()[1])
    assert at_ms is not None
    return at_ms


def parse_entry(name: str, spec: Mapping[str, Any], *, origin: str | None = None) -> ScheduleEntry:
    """Validate ``spec`` (see module docstring) into an entry; ConfigError names the entry
    and the field at fault. ``origin`` (code, config, cli) overrides the spec's own."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise ConfigError(
            f"schedule name {name!r} must be 1-128 letters, digits, '_', '.', '@' or '-'"
        )
    if not isinstance(spec, Mapping):
        raise ConfigError(f"schedule {name!r}: expected a mapping, got {type(spec).__name__}")
    s = _Spec(name, spec)
    task = s.text("task", required=True)
    assert task is not None
    kind, schedule, when = _build(s)
    args = _json_value(s, "args", lambda v: v is None or isinstance(v, list | tuple), "a list")
    kwargs = _json_value(
        s,
        "kwargs",
        lambda v: v is None or (isinstance(v, Mapping) and all(isinstance(k, str) for k in v)),
        "a mapping with string keys",
    )
    priority = s.get("priority")
    if priority is not None and (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not PRIORITY_MIN <= priority <= PRIORITY_MAX
    ):
        s.fail("priority", f"expected an integer {PRIORITY_MIN}..{PRIORITY_MAX}, got {priority!r}")
    queue = s.text("queue")
    if queue is not None and (problem := queue_problem(queue)):
        s.fail("queue", problem)  # no worker could consume it: every tick would fail
    chosen = origin or s.get("origin") or "code"
    if chosen not in ORIGINS:
        s.fail("origin", f"expected one of {', '.join(ORIGINS)}, got {chosen!r}")
    return ScheduleEntry(
        name=name,
        task=task,
        kind=kind,
        schedule=schedule,
        args=tuple(args or ()),
        kwargs=dict(kwargs or {}),
        queue=queue,
        priority=priority,
        expires_s=s.opt_seconds("expires_s", positive=True),
        jitter_s=s.opt_seconds("jitter_s", positive=False) or None,
        catch_up=s.flag("catch_up", False),
        enabled=s.flag("enabled", True),
        origin=chosen,
        when=when,
    )
