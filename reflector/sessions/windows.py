"""Daily time-of-day windows ("01:00-06:00", "22:00-06:00") for heavy tests (spec §8, §11 Phase 4).

A window is a span of *local* time of day in the operator's time zone, start inclusive, end
exclusive; when the end is earlier than the start it wraps midnight. Local time is what an
operator means ("only at night"), so daylight-saving changes are honoured through zoneinfo: on
the night the clocks spring forward a window may open at the jump itself, and on the night they
fall back an hour of local time happens twice.

`seconds_until_open` answers the `retry_after` of an `outside_window` refusal. Instead of
arithmetic on local times (which breaks exactly on DST nights), it lists the only instants at
which a closed window can open (each local occurrence of the start time, and each UTC-offset
change) and returns the first of them at which the window is open.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, tzinfo
from typing import Final

__all__ = ["Window", "in_window", "parse_window", "seconds_until_open"]

_WINDOW_RE: Final = re.compile(r"([01]\d|2[0-3]):([0-5]\d)-([01]\d|2[0-3]):([0-5]\d)")
_MINUTES_PER_DAY: Final = 24 * 60
# How far ahead to look for an opening. A window opens at least once a day; on a DST night it
# can be skipped entirely (a window inside the gap), so the next opening is under two days away.
# Three days leaves room for any real zone's rules.
_HORIZON_SEC: Final = 3 * 86_400
# Step for spotting UTC-offset changes. Real zones never change offset twice within a few hours,
# so sampling hourly finds every change; bisection then pins it to the second.
_OFFSET_SAMPLE_SEC: Final = 3_600


@dataclass(frozen=True)
class Window:
    """Minutes after local midnight; `start == end` is refused by `parse_window`."""

    start_minute: int
    end_minute: int

    def __str__(self) -> str:
        return f"{_hhmm(self.start_minute)}-{_hhmm(self.end_minute)}"


def parse_window(text: str) -> Window:
    """Parse "HH:MM-HH:MM" (24-hour); raise ValueError with the reason otherwise."""
    match = _WINDOW_RE.fullmatch(text)
    if match is None:
        raise ValueError(f'must look like "01:00-06:00" (24-hour HH:MM-HH:MM), got {text!r}')
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    window = Window(start_minute=h1 * 60 + m1, end_minute=h2 * 60 + m2)
    if window.start_minute == window.end_minute:
        raise ValueError(f"start and end are equal in {text!r}; leave it empty for no window")
    return window


def in_window(window: Window, wall: float, tz: tzinfo) -> bool:
    """Whether Unix time `wall` falls inside `window`, read as local time in `tz`."""
    local = datetime.fromtimestamp(wall, tz)
    minute = local.hour * 60 + local.minute
    if window.start_minute < window.end_minute:
        return window.start_minute <= minute < window.end_minute
    return minute >= window.start_minute or minute < window.end_minute


def seconds_until_open(window: Window, wall: float, tz: tzinfo) -> int:
    """Whole seconds from `wall` until `window` is next open (0 if it is open now)."""
    if in_window(window, wall, tz):
        return 0
    candidates = sorted(c for c in _opening_candidates(window, wall, tz) if c > wall)
    for candidate in candidates:
        if in_window(window, candidate, tz):
            return max(1, math.ceil(candidate - wall))
    return _HORIZON_SEC  # pragma: no cover - no real zone skips a daily window for 3 days


def _opening_candidates(window: Window, wall: float, tz: tzinfo) -> list[float]:
    """Every instant in the horizon at which a closed window could become open."""
    today = datetime.fromtimestamp(wall, tz).date()
    start = time(window.start_minute // 60, window.start_minute % 60)
    out = [
        _local_instant(today + timedelta(days=offset), start, tz, fold)
        for offset in range(-1, _HORIZON_SEC // 86_400 + 1)
        for fold in (0, 1)
    ]
    out.extend(_offset_changes(wall, wall + _HORIZON_SEC, tz))
    return out


def _local_instant(day: date, at: time, tz: tzinfo, fold: int) -> float:
    """The Unix time of local `day` `at` in `tz`; `fold` picks which of a repeated hour."""
    return datetime.combine(day, at, tzinfo=tz).replace(fold=fold).timestamp()


def _offset_changes(begin: float, end: float, tz: tzinfo) -> list[float]:
    """The first second of each UTC-offset change (DST transition) in [begin, end]."""
    changes = []
    lo = math.floor(begin)
    while lo < end:
        hi = lo + _OFFSET_SAMPLE_SEC
        if _offset(lo, tz) != _offset(hi, tz):
            changes.append(float(_bisect_change(lo, hi, tz)))
        lo = hi
    return changes


def _bisect_change(lo: int, hi: int, tz: tzinfo) -> int:
    """The smallest second in (lo, hi] whose UTC offset differs from that at `lo`."""
    before = _offset(lo, tz)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _offset(mid, tz) == before:
            lo = mid
        else:
            hi = mid
    return hi


def _offset(wall: float, tz: tzinfo) -> timedelta | None:
    return datetime.fromtimestamp(wall, tz).utcoffset()


def _hhmm(minute: int) -> str:
    return f"{minute // 60:02d}:{minute % 60:02d}"
