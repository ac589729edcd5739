"""Calendar schedules: lists of months, weekdays, days, hours and minutes, as a cron line.

A field left out means "every" when it is coarser than the finest field given, and its
first value (minute 0, hour 0, day 1) when it is finer, so ``{hours: [9]}`` is 09:00 every
day and ``{months: [1]}`` is midnight on 1 January. Days and weekdays must both match when
both are given (``day_or=False``): ``{days: [13], weekdays: [fri]}`` is Friday the 13th.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["FIELDS", "calendar_cron"]

FIELDS = ("months", "weekdays", "days", "hours", "minutes")
_MONTHS = ("jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec")
_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")  # cron numbering: 0 = Sunday
_RANGES = {"months": (1, 12), "weekdays": (0, 7), "days": (1, 31), "hours": (0, 23),
           "minutes": (0, 59)}  # fmt: skip

_LONG = {
    "months": ("january", "february", "march", "april", "may", "june", "july", "august",
               "september", "october", "november", "december"),
    "weekdays": ("sunday", "monday", "tuesday", "wednesday", "thursday", "friday", "saturday"),
}  # fmt: skip


def _value(field: str, item: Any) -> int:
    if isinstance(item, str):
        word = item.strip().lower()
        # "mon", "mond" and "monday" are Monday; "mo" and "monkey" are nothing.
        for i, long_name in enumerate(_LONG.get(field, ())):
            if len(word) >= 3 and long_name.startswith(word):
                return i + 1 if field == "months" else i
        if word.isdigit():
            item = int(word)
    if isinstance(item, int) and not isinstance(item, bool):
        lo, hi = _RANGES[field]
        if lo <= item <= hi:
            return 0 if field == "weekdays" and item == 7 else item
        raise ValueError(f"{field} values must be {lo}..{hi}, got {item}")
    hint = " (or names like 'jan')" if field == "months" else ""
    hint = " (0 or 7 = Sunday, or names like 'mon')" if field == "weekdays" else hint
    raise ValueError(f"{field} values must be integers{hint}, got {item!r}")


def calendar_cron(raw: Any) -> tuple[str, dict[str, list[int]], str]:
    """Translate a calendar mapping into (cron expression, canonical fields, label).
    Raises ValueError with a message naming the sub-field at fault."""
    if not isinstance(raw, Mapping):
        raise ValueError(f"expected a mapping with some of {', '.join(FIELDS)}")
    unknown = [k for k in raw if k not in FIELDS]
    if unknown:
        raise ValueError(f"unknown key(s) {unknown}; use {', '.join(FIELDS)}")
    fields: dict[str, list[int]] = {}
    for key in FIELDS:
        value = raw.get(key)
        if value is None:
            continue
        items = value if isinstance(value, list | tuple) else [value]
        if not items:
            raise ValueError(f"{key} is empty; leave it out to mean every")
        fields[key] = sorted({_value(key, item) for item in items})
    if not fields:
        raise ValueError(f"give at least one of {', '.join(FIELDS)}")
    # Coarsest first: months, then days/weekdays, then hours, then minutes.
    rank = {"months": 0, "days": 1, "weekdays": 1, "hours": 2, "minutes": 3}
    coarsest = min(rank[k] for k in fields)

    def part(key: str, first: str) -> str:
        if key in fields:
            return ",".join(str(v) for v in fields[key])
        return first if rank[key] > coarsest else "*"

    day_default = "*" if "weekdays" in fields else "1"
    expr = " ".join(
        (
            part("minutes", "0"),
            part("hours", "0"),
            part("days", day_default),
            part("months", "*"),
            part("weekdays", "*"),
        )
    )
    label = "calendar " + " ".join(
        f"{k}={','.join(_name(k, v) for v in vals)}" for k, vals in fields.items()
    )
    return expr, fields, label


def _name(field: str, value: int) -> str:
    if field == "months":
        return _MONTHS[value - 1]
    if field == "weekdays":
        return _WEEKDAYS[value]
    return str(value)
