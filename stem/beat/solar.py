"""Solar schedules: sunrise, sunset, solar noon, civil dawn and dusk at a place.

Times come from the NOAA solar calculator equations (Jean Meeus, *Astronomical
Algorithms*), good to about a minute between latitudes 72 N and 72 S and within a few
minutes nearer the poles. A day on which the sun never crosses the event's altitude
(polar day or polar night) has no event: the schedule skips it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["EVENTS", "Solar", "solar_event_ms"]

_DAY_MS = 86_400_000
# Zenith angle of the sun's centre at each event: 90.833 degrees allows for refraction and
# the sun's radius (the top edge touches the horizon); civil twilight ends at 96 degrees.
_ZENITH_DEG = {"sunrise": 90.833, "sunset": 90.833, "dawn": 96.0, "dusk": 96.0}
EVENTS = ("sunrise", "sunset", "solar_noon", "dawn", "dusk")
_SEARCH_DAYS = 370  # a polar night or day lasts at most about six months


def _sun(jd: float) -> tuple[float, float]:
    """Declination (radians) and equation of time (minutes) at Julian day ``jd``."""
    t = (jd - 2451545.0) / 36525.0  # Julian centuries since J2000.0
    l0 = math.radians((280.46646 + t * (36000.76983 + t * 0.0003032)) % 360)
    m = math.radians(357.52911 + t * (35999.05029 - 0.0001537 * t))
    e = 0.016708634 - t * (0.000042037 + 0.0000001267 * t)
    c = (
        math.sin(m) * (1.914602 - t * (0.004817 + 0.000014 * t))
        + math.sin(2 * m) * (0.019993 - 0.000101 * t)
        + math.sin(3 * m) * 0.000289
    )
    omega = math.radians(125.04 - 1934.136 * t)
    apparent_long = math.radians(math.degrees(l0) + c - 0.00569 - 0.00478 * math.sin(omega))
    seconds = 21.448 - t * (46.815 + t * (0.00059 - t * 0.001813))
    obliquity = math.radians(23 + (26 + seconds / 60) / 60 + 0.00256 * math.cos(omega))
    declination = math.asin(math.sin(obliquity) * math.sin(apparent_long))
    y = math.tan(obliquity / 2) ** 2
    eq_time = 4 * math.degrees(
        y * math.sin(2 * l0)
        - 2 * e * math.sin(m)
        + 4 * e * y * math.sin(m) * math.cos(2 * l0)
        - 0.5 * y * y * math.sin(4 * l0)
        - 1.25 * e * e * math.sin(2 * m)
    )
    return declination, eq_time


def _event_minutes(day: int, lat: float, lon: float, event: str) -> float | None:
    """Minutes after 00:00 UTC of ``day`` (days since the epoch) at which ``event`` happens
    on the solar day whose noon is nearest 12:00 local mean time there; may fall outside
    0..1440 far from Greenwich. None if the sun does not reach the event's altitude."""
    minutes = 720.0 - 4.0 * lon
    lat_r = math.radians(lat)
    # The sun's position is evaluated again at each new estimate of the event time.
    for _ in range(3):
        decl, eq_time = _sun(2440587.5 + day + minutes / 1440.0)
        noon = 720.0 - 4.0 * lon - eq_time
        if event == "solar_noon":
            minutes = noon
            continue
        denominator = math.cos(lat_r) * math.cos(decl)
        if abs(denominator) < 1e-12:
            return None
        cos_h = (
            math.cos(math.radians(_ZENITH_DEG[event])) - math.sin(lat_r) * math.sin(decl)
        ) / denominator
        if not -1.0 <= cos_h <= 1.0:
            return None
        hour_angle = math.degrees(math.acos(cos_h))
        minutes = noon - 4 * hour_angle if event in ("sunrise", "dawn") else noon + 4 * hour_angle
    return minutes


def solar_event_ms(day: int, lat: float, lon: float, event: str) -> int | None:
    """The event on solar day ``day`` (days since the epoch), in epoch ms rounded to the
    second, or None on a polar day or night."""
    minutes = _event_minutes(day, lat, lon, event)
    if minutes is None:
        return None
    return day * _DAY_MS + round(minutes * 60) * 1000


@dataclass(frozen=True, slots=True)
class Solar:
    """``event`` at ``latitude``/``longitude`` (degrees, north and east positive), shifted
    by ``offset_ms`` (negative: before the event)."""

    event: str
    latitude: float
    longitude: float
    offset_ms: int = 0

    def __post_init__(self) -> None:
        if self.event not in EVENTS:
            raise ValueError(f"event must be one of {', '.join(EVENTS)}")
        if not -90.0 <= self.latitude <= 90.0:
            raise ValueError("latitude must be between -90 and 90")
        if not -180.0 <= self.longitude <= 180.0:
            raise ValueError("longitude must be between -180 and 180")

    def _tick(self, day: int) -> int | None:
        at = solar_event_ms(day, self.latitude, self.longitude, self.event)
        return None if at is None else at + self.offset_ms

    def _day_of(self, t_ms: int) -> int:
        # The local mean solar day holding t (local mean time = UTC + longitude / 15 h).
        return math.floor((t_ms - self.offset_ms) / _DAY_MS + self.longitude / 360)

    def next_after(self, t_ms: int) -> int | None:
        first = self._day_of(t_ms) - 1
        for day in range(first, first + _SEARCH_DAYS):
            tick = self._tick(day)
            if tick is not None and tick > t_ms:
                return tick
        return None

    def prev_at_or_before(self, t_ms: int) -> int | None:
        last = self._day_of(t_ms) + 1
        for day in range(last, last - _SEARCH_DAYS, -1):
            tick = self._tick(day)
            if tick is not None and tick <= t_ms:
                return tick
        return None

    def describe(self) -> str:
        text = f"{self.event.replace('_', ' ')} at {self.latitude:g},{self.longitude:g}"
        if self.offset_ms:
            sign = "+" if self.offset_ms > 0 else "-"
            text += f" {sign}{abs(self.offset_ms) / 1000:g}s"
        return text
