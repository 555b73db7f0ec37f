"""systemd notification for `Type=notify` (READY, STATUS, WATCHDOG, STOPPING).

Without NOTIFY_SOCKET (a developer's shell, `make demo`) every call is a no-op, and no watchdog
timer runs: the only periodic wakeup Reflector has is the watchdog ping systemd asked for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys

_log = logging.getLogger(__name__)


class Notifier:
    """Talks to systemd's notify socket when there is one."""

    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._sd: object | None = None
        self._watchdog: asyncio.Task[None] | None = None
        if self.enabled:
            import sdnotify

            self._sd = sdnotify.SystemdNotifier()

    def _send(self, text: str) -> None:
        if self._sd is not None:
            self._sd.notify(text)  # type: ignore[attr-defined]

    def ready(self, status: str) -> None:
        self._send(f"READY=1\nSTATUS={status}")
        self._start_watchdog()

    def status(self, status: str) -> None:
        self._send(f"STATUS={status}")

    def stopping(self, status: str) -> None:
        self._send(f"STOPPING=1\nSTATUS={status}")
        if self._watchdog is not None:
            self._watchdog.cancel()

    def _start_watchdog(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        if not self.enabled or not usec.isdigit() or not watchdog_is_ours():
            return
        # Half the interval, as sd_watchdog_enabled(3) recommends: one late ping is not fatal.
        interval = int(usec) / 1_000_000 / 2
        self._watchdog = asyncio.get_running_loop().create_task(self._ping(interval))

    async def _ping(self, interval: float) -> None:
        # Sent from the event loop itself: if the loop is stuck, the pings stop and systemd
        # restarts the service, which is the point.
        with contextlib.suppress(asyncio.CancelledError):
            while True:
                self._send("WATCHDOG=1")
                await asyncio.sleep(interval)


def watchdog_is_ours() -> bool:
    """Whether systemd's WATCHDOG_PID names this process (sd_watchdog_enabled(3)'s check).

    The single binary is a PyInstaller one-file executable: its bootloader is the process
    systemd started (MainPID, WATCHDOG_PID) and runs Python in a child, so there the pings
    must come from the bootloader's only child. The unit's NotifyAccess=all lets them in.
    Without this the frozen service never pinged and systemd killed it every WatchdogSec.
    """
    pid = os.environ.get("WATCHDOG_PID", "")
    if not pid or pid == str(os.getpid()):
        return True
    return bool(getattr(sys, "frozen", False)) and pid == str(os.getppid())
