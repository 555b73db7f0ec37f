"""The host clock's synchronisation state, read from the kernel (one syscall, no privilege).

Used by GetPathMeta (clock facts, spec §7.5) and by the STAMP reflector (its Error Estimate).
A read-only adjtimex(2) gives the kernel's own view, which every NTP daemon (chrony, ntpd,
systemd-timesyncd) keeps current, with or without systemd.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

# From <sys/timex.h>: the kernel sets STA_UNSYNC while no time daemon vouches for the clock,
# and adjtimex() returns TIME_ERROR when the clock is unsynchronised.
STA_UNSYNC: Final = 0x0040
TIME_ERROR: Final = 5
# systemd-timesyncd creates this file once it has synchronised the clock (systemd ≥ 239).
TIMESYNCD_FLAG: Final = Path("/run/systemd/timesync/synchronized")


class _Timeval(ctypes.Structure):
    _fields_ = (("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long))


class _Timex(ctypes.Structure):
    """glibc's `struct timex` (<sys/timex.h>), 208 bytes on 64-bit Linux."""

    _fields_ = (
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time", _Timeval),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),  # the kernel's padding; it may write there
    )


@dataclass(frozen=True, kw_only=True)
class KernelClock:
    """What adjtimex(2) says about the system clock (read-only query, no privilege needed)."""

    state: int
    status: int
    maxerror_us: int
    esterror_us: int

    @property
    def synchronized(self) -> bool:
        return clock_synchronized(self)

    @property
    def error_s(self) -> float:
        """The kernel's error bound: the estimate when synchronised, else the maximum."""
        micros = (
            self.esterror_us if self.synchronized and self.esterror_us > 0 else self.maxerror_us
        )
        return max(0, micros) / 1e6


def read_kernel_clock() -> KernelClock:
    """Query adjtimex(2) with modes=0 through libc; raises OSError if the call fails (e.g.
    EPERM from a seccomp filter such as systemd's ProtectClock=)."""
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    timex = _Timex()  # zeroed: modes = 0 means "read only"
    state = int(libc.adjtimex(ctypes.byref(timex)))
    if state < 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"adjtimex failed: {os.strerror(errno)}")
    return KernelClock(
        state=state,
        status=int(timex.status),
        maxerror_us=int(timex.maxerror),
        esterror_us=int(timex.esterror),
    )


def clock_synchronized(clock: KernelClock) -> bool:
    """The kernel's own verdict: synchronised unless STA_UNSYNC is set or the state is TIME_ERROR.

    chrony, ntpd and systemd-timesyncd all clear STA_UNSYNC once they have disciplined the clock,
    so this works whichever daemon (if any) runs, with or without systemd.
    """
    return not (clock.status & STA_UNSYNC) and clock.state != TIME_ERROR
