"""Schedule types: when an entry is due, as deterministic tick times in epoch milliseconds.

Every beat process computes the same tick times from the same entry (interval ticks are
anchored at ``start`` or at the Unix epoch, never at "when this process started"), so a
tick can be named by its time and claimed once across processes.

A schedule answers two questions:

* ``next_after(t_ms)``: the first tick strictly after ``t_ms`` (None: never again);
* ``prev_at_or_before(t_ms)``: the latest tick at or before ``t_ms`` (None: none yet).

Cron and calendar schedules name local wall-clock times in their timezone. Around daylight
saving changes each local time fires once: a time skipped by a spring-forward change fires
shifted forward by the gap (02:30 in a one-hour gap fires at 03:30, new time), a time
repeated by a fall-back change fires at its first occurrence; an every-hour expression
(hour field ``*``) also fires in the repeated hour, so it keeps running hourly in real
time.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from typing import Protocol, runtime_checkable
from zoneinfo import ZoneInfo

from croniter import CroniterError, croniter

__all__ = [
    "Cron",
    "Interval",
    "OneOff",
    "Schedule",
    "Window",
    "iso_ms",
    "jitter_ms",
    "upcoming",
]

_HOUR_MS = 3_600_000
# Wider than any daylight-saving shift (at most two hours anywhere), so a window of this
# half-width around an instant holds every local time that can map near it.
_DST_REACH_MS = 3 * _HOUR_MS
_MAX_STEPS = 5_000  # guard for loops over cron candidates
# The last instant Python's calendar holds: a schedule has no tick after it.
CALENDAR_END_MS = int(datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC).timestamp() * 1000)


def _in_calendar(tick: int | None) -> int | None:
    return tick if tick is not None and tick <= CALENDAR_END_MS else None


@runtime_checkable
class Schedule(Protocol):
    def next_after(self, t_ms: int) -> int | None:
        """The first tick strictly after ``t_ms``, or None if there is none."""

    def prev_at_or_before(self, t_ms: int) -> int | None:
        """The latest tick at or before ``t_ms``, or None if there is none."""

    def describe(self) -> str:
        """A short human description (for ``stem schedule list``)."""


def iso_ms(t_ms: int, tz: tzinfo = UTC) -> str:
    """``t_ms`` as an ISO 8601 string in ``tz`` (seconds precision unless it has millis)."""
    dt = datetime.fromtimestamp(t_ms / 1000, tz)
    return dt.isoformat(timespec="milliseconds" if t_ms % 1000 else "seconds")


def jitter_ms(name: str, tick_ms: int, jitter_s: float | None) -> int:
    """A delay in ``[0, jitter_s]`` seconds for one tick, the same in every beat process
    (derived from the entry name and tick, not from a random source)."""
    if not jitter_s:
        return 0
    digest = hashlib.sha256(f"{name}\0{tick_ms}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return int(fraction * jitter_s * 1000)


def upcoming(schedule: Schedule, after_ms: int, n: int) -> list[int]:
    """The next ``n`` ticks strictly after ``after_ms`` (fewer if the schedule ends)."""
    out: list[int] = []
    t = after_ms
    while len(out) < n:
        nxt = schedule.next_after(t)
        if nxt is None:
            break
        out.append(nxt)
        t = nxt
    return out


# -- interval ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Interval:
    """Every ``every_ms``, on the grid ``anchor_ms + k * every_ms``."""

    every_ms: int
    anchor_ms: int = 0

    def __post_init__(self) -> None:
        if self.every_ms <= 0:
            raise ValueError("every_ms must be positive")

    def next_after(self, t_ms: int) -> int | None:
        k = (t_ms - self.anchor_ms) // self.every_ms + 1
        return _in_calendar(self.anchor_ms + k * self.every_ms)

    def prev_at_or_before(self, t_ms: int) -> int:
        k = (t_ms - self.anchor_ms) // self.every_ms
        return self.anchor_ms + k * self.every_ms

    def describe(self) -> str:
        return f"every {_human_ms(self.every_ms)}"


def _human_ms(ms: int) -> str:
    for unit, size in (("d", 86_400_000), ("h", _HOUR_MS), ("m", 60_000), ("s", 1000)):
        if ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms / 1000:g}s"


# -- one-off ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OneOff:
    """Once, at ``at_ms`` (a clocked entry; beat disables it after it fires)."""

    at_ms: int

    def next_after(self, t_ms: int) -> int | None:
        return self.at_ms if self.at_ms > t_ms else None

    def prev_at_or_before(self, t_ms: int) -> int | None:
        return self.at_ms if self.at_ms <= t_ms else None

    def describe(self) -> str:
        return f"once at {iso_ms(self.at_ms)}"


# -- window -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Window:
    """Another schedule's ticks limited to ``start_ms <= tick <= end_ms``."""

    inner: Schedule
    start_ms: int | None = None
    end_ms: int | None = None

    def next_after(self, t_ms: int) -> int | None:
        if self.start_ms is not None and t_ms < self.start_ms:
            t_ms = self.start_ms - 1
        nxt = self.inner.next_after(t_ms)
        if nxt is None or (self.end_ms is not None and nxt > self.end_ms):
            return None
        return nxt

    def prev_at_or_before(self, t_ms: int) -> int | None:
        if self.end_ms is not None and t_ms > self.end_ms:
            t_ms = self.end_ms
        prev = self.inner.prev_at_or_before(t_ms)
        if prev is None or (self.start_ms is not None and prev < self.start_ms):
            return None
        return prev

    def describe(self) -> str:
        text = self.inner.describe()
        if self.start_ms is not None:
            text += f" from {iso_ms(self.start_ms)}"
        if self.end_ms is not None:
            text += f" until {iso_ms(self.end_ms)}"
        return text


# -- cron -------------------------------------------------------------------------------------


def _to_ms(dt: datetime) -> int:
    # Exact integer arithmetic: float timestamps can be off by a millisecond.
    delta = dt - datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1000 + delta.microseconds // 1000


_MACROS = {
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
    "@monthly": "0 0 1 * *",
    "@weekly": "0 0 * * 0",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@hourly": "0 * * * *",
}


@dataclass(frozen=True, slots=True)
class Cron:
    """A five-field cron expression (minute hour day month weekday) in a timezone.

    ``day_or=False`` requires both the day-of-month and the weekday fields to match (the
    calendar form); cron's own rule (True) fires when either restricted field matches.
    ``label`` replaces the expression in :meth:`describe`.
    """

    expr: str
    tz: str = "UTC"
    day_or: bool = True
    label: str | None = None
    _zone: tzinfo = field(init=False, repr=False, compare=False)
    _hourly: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        expr = _MACROS.get(self.expr.strip().lower(), self.expr.strip())
        if len(expr.split()) != 5:
            raise ValueError("a cron expression has five fields: minute hour day month weekday")
        object.__setattr__(self, "expr", " ".join(expr.split()))
        zone: tzinfo = UTC if self.tz == "UTC" else ZoneInfo(self.tz)
        object.__setattr__(self, "_zone", zone)
        object.__setattr__(self, "_hourly", self.expr.split()[1] == "*")

    def describe(self) -> str:
        text = self.label or f"cron {self.expr}"
        return text if self.tz == "UTC" else f"{text} ({self.tz})"

    # local wall-clock time <-> instants

    def _naive(self, t_ms: int) -> datetime:
        # Integer ms keep exact; fromtimestamp on a float would round.
        utc = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=t_ms)
        return utc.astimezone(self._zone).replace(tzinfo=None)

    def _instants(self, local: datetime) -> list[int]:
        first = local.replace(tzinfo=self._zone, fold=0)
        u0 = _to_ms(first)
        second = local.replace(tzinfo=self._zone, fold=1)
        if first.utcoffset() == second.utcoffset():
            return [u0]
        # Fold 0 of a skipped time uses the offset before the jump: shifted forward by the
        # gap. A repeated time is kept at its first occurrence, and also at its second for
        # an every-hour expression.
        repeated = first.astimezone(UTC).astimezone(self._zone).replace(tzinfo=None) == local
        return [u0, _to_ms(second)] if repeated and self._hourly else [u0]

    def _iter(self, local: datetime) -> croniter:
        return croniter(self.expr, local, day_or=self.day_or)

    def _near_shift(self, t_ms: int) -> bool:
        zone = self._zone
        if zone is UTC:
            return False
        lo = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=t_ms - _DST_REACH_MS)
        hi = lo + timedelta(milliseconds=2 * _DST_REACH_MS)
        return lo.astimezone(zone).utcoffset() != hi.astimezone(zone).utcoffset()

    def _window(self, center_ms: int) -> list[int]:
        """Every tick whose local time lies near ``center_ms`` (exact around a DST shift)."""
        lo = self._naive(center_ms - _DST_REACH_MS) - timedelta(microseconds=1)
        hi = self._naive(center_ms + _DST_REACH_MS)
        it = self._iter(lo)
        out: list[int] = []
        for _ in range(_MAX_STEPS):
            local = it.get_next(datetime)
            if local > hi:
                break
            out.extend(self._instants(local))
        return out

    def next_after(self, t_ms: int) -> int | None:
        try:
            return _in_calendar(self._next_after(t_ms))
        except CroniterError:
            raise  # (a ValueError) no date matches: the expression's problem
        except (OverflowError, ValueError):  # the next match lies past year 9999
            return None

    def _next_after(self, t_ms: int) -> int | None:
        found: list[int] = []
        it = self._iter(self._naive(t_ms))
        for _ in range(_MAX_STEPS):
            u = min(self._instants(it.get_next(datetime)))
            if u > t_ms:
                found.append(u)
                break
        for center in (t_ms, *found):
            if self._near_shift(center):
                found.extend(u for u in self._window(center) if u > t_ms)
        return min(found) if found else None

    def prev_at_or_before(self, t_ms: int) -> int | None:
        found: list[int] = []
        it = self._iter(self._naive(t_ms) + timedelta(milliseconds=1))
        for _ in range(_MAX_STEPS):
            u = min(self._instants(it.get_prev(datetime)))
            if u <= t_ms:
                found.append(u)
                break
        for center in (t_ms, *found):
            if self._near_shift(center):
                found.extend(u for u in self._window(center) if u <= t_ms)
        return max(found) if found else None
