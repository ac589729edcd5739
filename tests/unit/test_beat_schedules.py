"""Schedule types, the dict form and its errors."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stem import Stem
from stem.beat import add_schedule, parse_entry
from stem.beat.schedules import Cron, Interval, OneOff, Window, iso_ms, jitter_ms, upcoming
from stem.beat.solar import Solar, solar_event_ms
from stem.errors import ConfigError

BERLIN = ZoneInfo("Europe/Berlin")
MIN = 60_000
HOUR = 3_600_000


def ms(*parts: int, tz: Any = UTC) -> int:
    delta = datetime(*parts, tzinfo=tz) - datetime(1970, 1, 1, tzinfo=UTC)  # type: ignore[misc]
    return int(delta.total_seconds() * 1000)


def local(ticks: list[int], tz: Any = BERLIN) -> list[str]:
    return [iso_ms(t, tz) for t in ticks]


# -- interval -----------------------------------------------------------------------------------


def test_interval_ticks_are_anchored_at_the_epoch() -> None:
    sched = Interval(5000)
    assert sched.next_after(12_345) == 15_000
    assert sched.next_after(15_000) == 20_000
    assert sched.prev_at_or_before(15_000) == 15_000
    assert sched.prev_at_or_before(14_999) == 10_000
    # Two processes starting at different times agree on every tick.
    assert upcoming(sched, 1_001, 3) == upcoming(sched, 4_999, 3) == [5000, 10_000, 15_000]


def test_no_tick_lies_past_the_calendar() -> None:
    """Past year 9999 there is no date to show or compute: the schedule simply ends."""
    late = ms(9999, 12, 31, 23)
    daily = Interval(86_400_000, anchor_ms=ms(9999, 12, 30))
    assert upcoming(daily, late - 24 * HOUR, 5) == [ms(9999, 12, 31)]
    assert Cron("0 3 * * *").next_after(late) is None
    assert Cron("0 3 * * *", tz="Europe/Berlin").next_after(late) is None
    assert Cron("0 * * * *").next_after(late - HOUR) == late  # the last hour still fires
    with pytest.raises(ConfigError, match="at most 100 years"):
        parse_entry("far", {"task": "x", "every": "5000000d"})


def test_interval_with_start_and_end() -> None:
    entry = parse_entry(
        "w",
        {
            "task": "t",
            "every": "10m",
            "start": "2024-05-01T09:03:00Z",
            "end": "2024-05-01T09:30:00+00:00",
        },
    )
    start = ms(2024, 5, 1, 9, 3)
    assert entry.schedule.prev_at_or_before(start - 1) is None
    assert upcoming(entry.schedule, 0, 5) == [start, start + 10 * MIN, start + 20 * MIN]
    assert entry.schedule.prev_at_or_before(ms(2025, 1, 1)) == start + 20 * MIN
    assert entry.schedule.next_after(start + 20 * MIN) is None
    assert entry.to_spec()["start"] == "2024-05-01T09:03:00+00:00"


def test_window_applies_to_cron() -> None:
    sched = Window(Cron("0 * * * *"), ms(2024, 1, 1, 5, 30), ms(2024, 1, 1, 8))
    assert local(upcoming(sched, 0, 9), UTC) == [
        "2024-01-01T06:00:00+00:00",
        "2024-01-01T07:00:00+00:00",
        "2024-01-01T08:00:00+00:00",
    ]


# -- cron ---------------------------------------------------------------------------------------


def test_cron_next_and_prev_in_utc() -> None:
    sched = Cron("*/5 * * * *")
    t = ms(2024, 1, 1, 10, 5)
    assert sched.next_after(t) == t + 5 * MIN
    assert sched.next_after(t - 1) == t
    assert sched.prev_at_or_before(t) == t
    assert sched.prev_at_or_before(t - 1) == t - 5 * MIN
    assert Cron("@hourly").expr == "0 * * * *"


def test_cron_in_a_timezone_follows_local_time() -> None:
    sched = Cron("0 9 * * *", "Europe/Berlin")
    assert local(upcoming(sched, ms(2024, 3, 29), 3), UTC) == [
        "2024-03-29T08:00:00+00:00",  # CET
        "2024-03-30T08:00:00+00:00",
        "2024-03-31T07:00:00+00:00",  # CEST from 31 March
    ]


def test_cron_spring_forward_fires_a_skipped_time_once_after_the_jump() -> None:
    sched = Cron("30 2 * * *", "Europe/Berlin")
    ticks = upcoming(sched, ms(2024, 3, 30, 12), 3)
    assert local(ticks) == [
        "2024-03-31T03:30:00+02:00",  # 02:30 does not exist that night
        "2024-04-01T02:30:00+02:00",
        "2024-04-02T02:30:00+02:00",
    ]


def test_cron_fall_back_fires_a_repeated_time_once() -> None:
    sched = Cron("30 2 * * *", "Europe/Berlin")
    assert local(upcoming(sched, ms(2024, 10, 26, 12), 2)) == [
        "2024-10-27T02:30:00+02:00",  # first occurrence only
        "2024-10-28T02:30:00+01:00",
    ]


def test_every_hour_cron_keeps_real_time_across_both_changes() -> None:
    for start in (ms(2024, 3, 30, 22), ms(2024, 10, 26, 22)):
        sched = Cron("*/20 * * * *", "Europe/Berlin")
        ticks = upcoming(sched, start, 30)
        assert ticks == [start + 20 * MIN * k for k in range(1, 31)]


def test_cron_hourly_across_fall_back_runs_in_the_repeated_hour() -> None:
    sched = Cron("0 * * * *", "Europe/Berlin")
    assert local(upcoming(sched, ms(2024, 10, 27, 1, 30, tz=BERLIN), 4)) == [
        "2024-10-27T02:00:00+02:00",
        "2024-10-27T02:00:00+01:00",
        "2024-10-27T03:00:00+01:00",
        "2024-10-27T04:00:00+01:00",
    ]
    # From inside the repeated hour, both directions see it.
    inside = ms(2024, 10, 27, 1, 30)  # 02:30 CET, the second 02:30
    assert iso_ms(sched.prev_at_or_before(inside) or 0, BERLIN) == "2024-10-27T02:00:00+01:00"
    assert iso_ms(sched.next_after(inside) or 0, BERLIN) == "2024-10-27T03:00:00+01:00"


@settings(max_examples=150, deadline=None)
@given(
    expr=st.sampled_from(["*/20 * * * *", "30 2 * * *", "0 * * * *", "15 1-3 * * 0"]),
    offset_min=st.integers(min_value=-6 * 60, max_value=6 * 60),
    around=st.sampled_from([ms(2024, 3, 31, 1), ms(2024, 10, 27, 1), ms(2024, 7, 1)]),
)
def test_cron_prev_and_next_bracket_every_instant(expr: str, offset_min: int, around: int) -> None:
    sched = Cron(expr, "Europe/Berlin")
    t = around + offset_min * MIN + 17
    prev, nxt = sched.prev_at_or_before(t), sched.next_after(t)
    assert prev is not None and nxt is not None
    assert prev <= t < nxt
    assert sched.next_after(prev) == nxt  # nothing between them
    assert sched.prev_at_or_before(nxt - 1) == prev


# -- calendar -----------------------------------------------------------------------------------


def test_calendar_weekdays_and_hours() -> None:
    entry = parse_entry("c", {"task": "t", "calendar": {"weekdays": ["mon", "Friday"], "hours": 9}})
    assert local(upcoming(entry.schedule, ms(2024, 5, 1), 3), UTC) == [
        "2024-05-03T09:00:00+00:00",
        "2024-05-06T09:00:00+00:00",
        "2024-05-10T09:00:00+00:00",
    ]
    assert entry.to_spec()["calendar"] == {"weekdays": [1, 5], "hours": [9]}


def test_calendar_days_and_weekdays_must_both_match() -> None:
    entry = parse_entry("f13", {"task": "t", "calendar": {"days": [13], "weekdays": ["fri"]}})
    assert local(upcoming(entry.schedule, ms(2024, 1, 1), 2), UTC) == [
        "2024-09-13T00:00:00+00:00",
        "2024-12-13T00:00:00+00:00",
    ]


def test_calendar_finer_fields_default_to_their_first_value() -> None:
    entry = parse_entry(
        "ny", {"task": "t", "calendar": {"months": ["jan", 7]}, "tz": "Europe/Berlin"}
    )
    assert local(upcoming(entry.schedule, ms(2024, 2, 1), 2)) == [
        "2024-07-01T00:00:00+02:00",
        "2025-01-01T00:00:00+01:00",
    ]
    minutes = parse_entry("m", {"task": "t", "calendar": {"minutes": [0, 30]}})
    assert upcoming(minutes.schedule, ms(2024, 1, 1), 3) == [
        ms(2024, 1, 1, 0, 30),
        ms(2024, 1, 1, 1),
        ms(2024, 1, 1, 1, 30),
    ]


# -- solar --------------------------------------------------------------------------------------

NYC = (40.7128, -74.0060)
LONDON = (51.5074, -0.1278)
SYDNEY = (-33.8688, 151.2093)
TROMSO = (69.6492, 18.9553)


def _day(y: int, m: int, d: int) -> int:
    return (datetime(y, m, d) - datetime(1970, 1, 1)).days


NY, LDN, SYD = "America/New_York", "Europe/London", "Australia/Sydney"


@pytest.mark.parametrize(
    ("place", "tz", "date", "event", "clock"),
    [
        # Published local clock times (timeanddate.com, NOAA solar calculator).
        (NYC, NY, (2024, 6, 20), "sunrise", (5, 25)),
        (NYC, NY, (2024, 6, 20), "sunset", (20, 31)),
        (NYC, NY, (2023, 12, 21), "sunrise", (7, 16)),
        (NYC, NY, (2023, 12, 21), "sunset", (16, 32)),
        (LONDON, LDN, (2024, 6, 21), "sunrise", (4, 43)),
        (LONDON, LDN, (2024, 6, 21), "sunset", (21, 21)),
        (LONDON, LDN, (2024, 12, 21), "sunrise", (8, 4)),
        (SYDNEY, SYD, (2024, 12, 21), "sunset", (20, 6)),
        (SYDNEY, SYD, (2024, 6, 21), "sunrise", (7, 0)),
    ],
)
def test_solar_events_match_published_times(
    place: tuple[float, float],
    tz: str,
    date: tuple[int, int, int],
    event: str,
    clock: tuple[int, int],
) -> None:
    got = solar_event_ms(_day(*date), *place, event)
    assert got is not None
    assert abs(got - ms(*date, *clock, tz=ZoneInfo(tz))) <= 2 * MIN


def test_solar_noon_is_near_noon_local_mean_time() -> None:
    got = solar_event_ms(_day(2024, 11, 3), 0.0, 0.0, "solar_noon")
    # Equation of time on 3 November is about +16.4 minutes (the sun is early).
    assert got is not None and abs(got - (ms(2024, 11, 3, 11, 43, 36))) <= MIN


def test_polar_night_and_midnight_sun_have_no_event() -> None:
    assert solar_event_ms(_day(2024, 12, 21), *TROMSO, "sunrise") is None
    assert solar_event_ms(_day(2024, 6, 21), *TROMSO, "sunset") is None
    sunrise = Solar("sunrise", *TROMSO)
    first = sunrise.next_after(ms(2024, 12, 1))
    assert first is not None and ms(2025, 1, 10) < first < ms(2025, 1, 20)
    sunset = Solar("sunset", *TROMSO)
    first = sunset.next_after(ms(2024, 6, 1))
    assert first is not None and ms(2024, 7, 18) < first < ms(2024, 7, 28)


def test_solar_schedule_with_offset_fires_daily() -> None:
    where = {"lat": LONDON[0], "lon": LONDON[1]}
    entry = parse_entry(
        "lights", {"task": "t", "solar": {"event": "sunset", **where, "offset": "-15m"}}
    )
    ticks = upcoming(entry.schedule, ms(2024, 6, 21, 12), 3)
    sunset = solar_event_ms(_day(2024, 6, 21), *LONDON, "sunset")
    assert sunset is not None and ticks[0] == sunset - 15 * MIN
    assert all(23 * HOUR < b - a < 25 * HOUR for a, b in itertools.pairwise(ticks))
    assert entry.schedule.prev_at_or_before(ticks[1]) == ticks[1]
    assert entry.schedule.prev_at_or_before(ticks[1] - 1) == ticks[0]


# -- one-off and jitter -------------------------------------------------------------------------


def test_one_off_fires_once() -> None:
    entry = parse_entry("once", {"task": "t", "at": "2030-01-02T03:04:05+01:00"})
    at = ms(2030, 1, 2, 2, 4, 5)
    assert entry.one_off and entry.schedule == OneOff(at)
    assert upcoming(entry.schedule, 0, 5) == [at]
    assert entry.schedule.prev_at_or_before(at - 1) is None
    assert entry.schedule.prev_at_or_before(at + 10) == at
    naive = parse_entry("n", {"task": "t", "at": "2030-01-02T03:04:05", "tz": "Europe/Berlin"})
    assert naive.schedule == OneOff(at)


def test_jitter_stays_within_bounds_and_is_the_same_everywhere() -> None:
    delays = [jitter_ms("e", tick, 30) for tick in range(0, 10_000_000, 10_000)]
    assert all(0 <= d <= 30_000 for d in delays)
    assert len(set(delays)) > 900  # spread, not a constant
    assert max(delays) > 27_000 and min(delays) < 3_000
    assert jitter_ms("e", 123, 30) == jitter_ms("e", 123, 30)
    assert jitter_ms("e", 123, None) == jitter_ms("e", 123, 0) == 0


# -- the dict form ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec",
    [
        {"task": "t", "every": 90},
        {"task": "t", "every_s": "1.5h", "jitter": 3, "expires": "2m", "catch_up": True},
        {"task": "t", "cron": "*/5 * * * *", "tz": "Europe/Berlin", "args": [1, "a"]},
        {"task": "t", "calendar": {"hours": [8, 20]}, "kwargs": {"x": {"y": [1]}}},
        {"task": "t", "solar": {"event": "noon", "latitude": 1, "longitude": 2}},
        {"task": "t", "at": "2031-01-01T00:00:00Z", "queue": "q", "priority": 9},
        {"task": "t", "every": 5, "enabled": False, "origin": "cli"},
    ],
)
def test_canonical_form_round_trips(spec: dict[str, Any]) -> None:
    entry = parse_entry("e", spec)
    again = parse_entry("e", entry.to_spec())
    assert again == entry
    assert again.to_spec() == entry.to_spec()


def test_durations_and_aliases() -> None:
    entry = parse_entry(
        "e", {"task": "t", "every": timedelta(minutes=2), "expires_s": 30, "jitter": "500ms"}
    )
    assert entry.schedule == Interval(120_000)
    assert (entry.expires_s, entry.jitter_s) == (30.0, 0.5)
    assert entry.to_spec()["every_s"] == 120.0


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ({"every": 5}, "field 'task': is required"),
        ({"task": "t"}, "set exactly one of every, cron, solar, calendar or at (got none)"),
        ({"task": "t", "every": 5, "cron": "* * * * *"}, "(got every, cron)"),
        ({"task": "t", "evry": 5}, "field 'evry': unknown field (did you mean 'every'?)"),
        ({"task": "t", "every": -1}, "field 'every'"),
        ({"task": "t", "every_s": -1}, "field 'every_s'"),
        ({"task": "t", "every": 0}, "must be above 0 seconds"),
        ({"task": "t", "every": "soon"}, "duration like '5m'"),
        ({"task": "t", "cron": "* * * *"}, "five fields"),
        ({"task": "t", "cron": "* * * * * *"}, "five fields"),
        ({"task": "t", "cron": "61 * * * *"}, "invalid cron expression"),
        ({"task": "t", "cron": "0 0 30 2 *"}, "never fires"),
        ({"task": "t", "cron": "0 0 * * *", "tz": "Mars/Olympus"}, "unknown timezone"),
        ({"task": "t", "at": "2030-01-01T00:00:00"}, "needs a UTC offset"),
        ({"task": "t", "at": "tomorrow"}, "field 'at': expected an ISO 8601 datetime"),
        ({"task": "t", "at": "2030-01-01T00:00:00Z", "start": "2029-01-01T00:00:00Z"}, "no start"),
        ({"task": "t", "every": 5, "start": "2030-01-02T00:00Z", "end": "2030-01-01T00:00Z"},
         "before start"),
        ({"task": "t", "every": 5, "priority": 11}, "field 'priority': expected an integer 0..9"),
        ({"task": "t", "every": 5, "queue": "bad q"}, "field 'queue': queue name 'bad q' must"),
        ({"task": "t", "every": 5, "queue": "a,b"}, "without spaces, commas"),
        ({"task": "t", "every": 5, "args": "x"}, "field 'args': expected a list"),
        ({"task": "t", "every": 5, "kwargs": {1: 2}}, "field 'kwargs'"),
        ({"task": "t", "every": 5, "args": [object()]}, "field 'args'"),
        ({"task": "t", "every": 5, "catch_up": "yes"}, "field 'catch_up': expected true or false"),
        ({"task": "t", "calendar": {"weekdays": ["funday"]}}, "weekdays values must be integers"),
        ({"task": "t", "calendar": {"days": [31], "months": [2]}}, "never fires"),
        ({"task": "t", "calendar": {"hour": [1]}}, "unknown key(s) ['hour']"),
        ({"task": "t", "calendar": {}}, "give at least one of"),
        ({"task": "t", "solar": {"event": "moonrise", "lat": 1, "lon": 2}}, "event must be one of"),
        ({"task": "t", "solar": {"event": "sunset", "lat": 91, "lon": 2}}, "latitude must be"),
        ({"task": "t", "every": 5, "origin": "moon"}, "field 'origin'"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_entry_and_field(spec: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_entry("nightly", spec)
    assert str(info.value).startswith("schedule 'nightly'")
    assert message in str(info.value)


@pytest.mark.parametrize("name", ["", "a b", "x:y", "-lead", "n" * 129])
def test_bad_names_are_refused(name: str) -> None:
    with pytest.raises(ConfigError, match="schedule name"):
        parse_entry(name, {"task": "t", "every": 1})


def test_add_schedule_records_the_canonical_spec_on_the_app() -> None:
    app = Stem("beat-test", broker="memory://beat-add")

    @app.task(name="report")
    def report() -> None: ...

    add_schedule(app, "hourly", report, every=timedelta(hours=1), queue="low")
    add_schedule(app, "nightly", "cleanup", cron="0 3 * * *", tz="Europe/Berlin", args=[1])
    add_schedule(app, "once", "launch", at=datetime(2030, 1, 1, tzinfo=UTC))
    common = {"enabled": True, "origin": "code"}
    assert app.schedules == {
        "hourly": {"task": "report", "every_s": 3600.0, "queue": "low", **common},
        "nightly": {"task": "cleanup", "cron": "0 3 * * *", "tz": "Europe/Berlin", "args": [1]}
        | common,
        "once": {"task": "launch", "at": "2030-01-01T00:00:00+00:00", **common},
    }
    with pytest.raises(ConfigError, match="schedule 'bad'"):
        add_schedule(app, "bad", "x", every=1, cron="* * * * *")
    assert "bad" not in app.schedules


def test_a_bad_instant_on_the_command_line_is_named_as_given() -> None:
    """`schedule dry-run --after garbage` names the flag, not a schedule or a field."""
    from stem.beat.entry import parse_instant_ms

    with pytest.raises(ConfigError) as info:
        parse_instant_ms("garbage", what="--after")
    assert str(info.value) == "--after: expected an ISO 8601 datetime, got 'garbage'"
