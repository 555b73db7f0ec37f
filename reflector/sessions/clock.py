"""The one place the session layer reads time, and the rule for measuring how long ago it was.

Quota windows ("10 tests per hour", "5 GB per 24 h", cooldowns) must not be fooled by the wall
clock: an operator, NTP or a dead RTC may step it by hours. So every moment is recorded as an
`Instant` holding three readings: the wall clock (meaningful across reboots), the kernel's boot
id, and CLOCK_BOOTTIME (monotonic within one boot, counting suspend, immune to clock steps).
`age_seconds` uses the boottime difference when both instants come from the same boot and only
falls back to the wall clock across a reboot, where nothing better exists.

Everything else in `reflector.sessions` takes an `Instant` as a parameter and never calls `now()`.
"""

from __future__ import annotations

import functools
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

__all__ = ["Instant", "age_seconds", "now"]

# Linux writes a fresh random UUID here at every boot.
_BOOT_ID_PATH: Final = Path("/proc/sys/kernel/random/boot_id")
# Length of the stand-in boot id used where the kernel offers none: unique per process, so
# records from an earlier process are compared by wall time, the safe fallback.
_FALLBACK_BOOT_ID_BYTES: Final = 16


@dataclass(frozen=True)
class Instant:
    """A moment as seen by three clocks; see the module docstring for why three."""

    wall: float
    boot_id: str
    boottime: float


def age_seconds(then: Instant, now: Instant) -> float:
    """How long before `now` the moment `then` was; never negative.

    Same boot: the CLOCK_BOOTTIME difference, so a wall-clock step neither ages records early
    (reopening a quota window) nor makes them young again (wrongly closing it). Different boot:
    the wall difference, clamped at 0 so a clock that is behind after a reboot makes old records
    look recent (over-counting, which errs on the side of the quota) rather than from the future.
    """
    if then.boot_id == now.boot_id:
        return max(0.0, now.boottime - then.boottime)
    return max(0.0, now.wall - then.wall)


def now() -> Instant:
    """Read the three clocks (the only function in this package that does)."""
    return Instant(wall=time.time(), boot_id=_boot_id(), boottime=_boottime())


@functools.cache
def _boot_id() -> str:
    """The kernel's boot id; it cannot change while this process lives, so read it once."""
    try:
        text = _BOOT_ID_PATH.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        text = ""
    return text or f"process-{secrets.token_hex(_FALLBACK_BOOT_ID_BYTES)}"


def _boottime() -> float:
    clock = getattr(time, "CLOCK_BOOTTIME", None)
    if clock is None:  # pragma: no cover - non-Linux; the fallback boot id is per process
        return time.monotonic()
    return time.clock_gettime(clock)
