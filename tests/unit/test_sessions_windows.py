"""Heavy-test windows: local time of day, wrapping midnight, honest about daylight saving."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import pytest

from reflector.sessions.windows import Window, in_window, parse_window, seconds_until_open

UTC_TZ = ZoneInfo("UTC")
BERLIN = ZoneInfo("Europe/Berlin")


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0, second: int = 0) -> float:
    return datetime(year, month, day, hour, minute, second, tzinfo=UTC).timestamp()


def test_parse_reads_minutes_after_midnight_and_prints_back() -> None:
    window = parse_window("01:30-06:05")
    assert window == Window(start_minute=90, end_minute=365)
    assert str(window) == "01:30-06:05"
    assert str(parse_window("22:00-06:00")) == "22:00-06:00"


@pytest.mark.parametrize(
    "text", ["", "1:00-06:00", "24:00-06:00", "01:60-02:00", "01:00 - 02:00", "01:00-", "x"]
)
def test_parse_refuses_malformed_text(text: str) -> None:
    with pytest.raises(ValueError, match="HH:MM-HH:MM"):
        parse_window(text)


def test_parse_refuses_equal_start_and_end() -> None:
    with pytest.raises(ValueError, match="equal"):
        parse_window("06:00-06:00")


def test_start_is_inclusive_end_is_exclusive() -> None:
    window = parse_window("01:00-06:00")
    assert not in_window(window, utc(2024, 5, 1, 0, 59, 59), UTC_TZ)
    assert in_window(window, utc(2024, 5, 1, 1, 0), UTC_TZ)
    assert in_window(window, utc(2024, 5, 1, 5, 59, 59), UTC_TZ)
    assert not in_window(window, utc(2024, 5, 1, 6, 0), UTC_TZ)


def test_window_wrapping_midnight_covers_both_sides() -> None:
    window = parse_window("22:00-06:00")
    assert in_window(window, utc(2024, 5, 1, 22, 0), UTC_TZ)
    assert in_window(window, utc(2024, 5, 1, 23, 30), UTC_TZ)
    assert in_window(window, utc(2024, 5, 2, 3, 0), UTC_TZ)
    assert not in_window(window, utc(2024, 5, 2, 6, 0), UTC_TZ)
    assert not in_window(window, utc(2024, 5, 2, 12, 0), UTC_TZ)
    assert not in_window(window, utc(2024, 5, 2, 21, 59), UTC_TZ)


def test_window_is_read_in_the_given_time_zone() -> None:
    window = parse_window("01:00-06:00")
    # 00:30 UTC in January is 01:30 in Berlin (CET, UTC+1); in July 02:30 (CEST, UTC+2).
    assert in_window(window, utc(2024, 1, 15, 0, 30), BERLIN)
    assert not in_window(window, utc(2024, 1, 15, 0, 30), UTC_TZ)
    assert not in_window(window, utc(2024, 7, 15, 4, 30), BERLIN)  # 06:30 CEST


def test_seconds_until_open_is_zero_inside_and_counts_to_the_next_start() -> None:
    window = parse_window("01:00-06:00")
    assert seconds_until_open(window, utc(2024, 5, 1, 2, 0), UTC_TZ) == 0
    assert seconds_until_open(window, utc(2024, 5, 1, 0, 0), UTC_TZ) == 3600
    assert seconds_until_open(window, utc(2024, 5, 1, 6, 0), UTC_TZ) == 19 * 3600
    assert seconds_until_open(window, utc(2024, 5, 1, 0, 59, 59) + 0.5, UTC_TZ) == 1


def test_seconds_until_open_across_midnight() -> None:
    window = parse_window("22:00-06:00")
    assert seconds_until_open(window, utc(2024, 5, 1, 6, 0), UTC_TZ) == 16 * 3600
    assert seconds_until_open(window, utc(2024, 5, 1, 23, 0), UTC_TZ) == 0


def test_day_after_spring_forward_is_23_hours_long() -> None:
    # Berlin springs forward on 2024-03-31: 03:00 local is 01:00 UTC that day, 02:00 UTC the
    # day before. Fixed-offset arithmetic would say 14 h from 12:00 UTC on the 30th.
    window = parse_window("03:00-04:00")
    assert seconds_until_open(window, utc(2024, 3, 30, 12, 0), BERLIN) == 13 * 3600


def test_window_starting_inside_the_spring_gap_opens_at_the_jump() -> None:
    # 02:00 CET jumps to 03:00 CEST at 01:00 UTC; 02:30 never happens that night, but 03:00
    # lies inside "02:30-04:00", so the window opens at the jump itself.
    window = parse_window("02:30-04:00")
    assert not in_window(window, utc(2024, 3, 31, 0, 59, 59), BERLIN)
    assert in_window(window, utc(2024, 3, 31, 1, 0), BERLIN)
    assert seconds_until_open(window, utc(2024, 3, 31, 0, 30), BERLIN) == 1800


def test_window_entirely_inside_the_spring_gap_opens_the_next_night() -> None:
    window = parse_window("02:15-02:45")
    # From 01:00 CET on the 31st, the next 02:15 local is 02:15 CEST on April 1 = 00:15 UTC.
    assert seconds_until_open(window, utc(2024, 3, 31, 0, 0), BERLIN) == 24 * 3600 + 15 * 60


def test_repeated_hour_on_fall_back_opens_the_window_twice() -> None:
    # Berlin falls back on 2024-10-27: 03:00 CEST (01:00 UTC) becomes 02:00 CET again.
    window = parse_window("02:00-02:30")
    assert in_window(window, utc(2024, 10, 27, 0, 15), BERLIN)  # 02:15 CEST
    assert not in_window(window, utc(2024, 10, 27, 0, 45), BERLIN)  # 02:45 CEST
    assert seconds_until_open(window, utc(2024, 10, 27, 0, 30), BERLIN) == 1800  # 02:00 CET
    assert in_window(window, utc(2024, 10, 27, 1, 15), BERLIN)  # 02:15 CET


def _brute_force_wait(window: Window, wall: float, tz: ZoneInfo) -> int:
    """Reference: scan minute boundaries (every zone here changes state only on them)."""
    if in_window(window, wall, tz):
        return 0
    t = math.ceil(wall / 60) * 60
    while not in_window(window, t, tz):
        t += 60
    return math.ceil(t - wall)


@pytest.mark.parametrize(
    ("zone", "day"),
    [
        ("Europe/Berlin", (2024, 3, 30)),
        ("Europe/Berlin", (2024, 10, 26)),
        ("America/New_York", (2024, 3, 9)),
        ("America/New_York", (2024, 11, 2)),
        ("Australia/Lord_Howe", (2024, 4, 6)),  # a 30-minute DST shift
        ("Australia/Lord_Howe", (2024, 10, 5)),
    ],
)
def test_seconds_until_open_matches_a_brute_force_scan_around_dst(
    zone: str, day: tuple[int, int, int]
) -> None:
    tz = ZoneInfo(zone)
    start = utc(*day)
    windows = [parse_window(t) for t in ("01:30-02:15", "02:00-03:00", "23:00-02:30")]
    for step in range(0, 48 * 3600, 97 * 60 + 13):  # irregular steps hit odd seconds too
        wall = start + step + 0.25
        for window in windows:
            expected = _brute_force_wait(window, wall, tz)
            assert seconds_until_open(window, wall, tz) == expected, (zone, wall, str(window))
