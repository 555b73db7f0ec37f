"""systemd notification: READY/STATUS on a real notify socket, watchdog pings, no-op without."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
from pathlib import Path

import pytest

from reflector.server.notify import Notifier, watchdog_is_ours


def notify_socket(tmp_path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify"))
    sock.settimeout(2)
    return sock


def test_ready_sends_ready_and_status_then_watchdog_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # ping every 0.1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)

    async def body() -> list[bytes]:
        notifier = Notifier()
        notifier.ready("Endpoint PPXX, 0 active sessions")
        received = []
        while received.count(b"WATCHDOG=1") < 3:  # each recv gives up after 2 s
            received.append(await asyncio.to_thread(sock.recv, 4096))
        notifier.status("Endpoint PPXX, 1 active sessions")
        notifier.stopping("stopping")
        while not received or not received[-1].startswith(b"STOPPING"):
            received.append(sock.recv(4096))
        return received

    messages = asyncio.run(body())
    assert messages[0] == b"READY=1\nSTATUS=Endpoint PPXX, 0 active sessions"
    pings = [m for m in messages if m == b"WATCHDOG=1"]
    assert len(pings) >= 3
    assert b"STATUS=Endpoint PPXX, 1 active sessions" in messages
    assert messages[-1] == b"STOPPING=1\nSTATUS=stopping"
    sock.close()


def test_without_notify_socket_nothing_is_sent_and_no_timer_runs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")

    async def body() -> int:
        notifier = Notifier()
        notifier.ready("x")
        return len(asyncio.all_tasks())

    assert asyncio.run(body()) == 1  # only the test's own task: no watchdog loop


@pytest.mark.parametrize(
    ("frozen", "watchdog_pid", "ours"),
    [
        (False, "", True),  # systemd did not say: the pings are ours
        (False, "self", True),
        (False, "parent", False),  # someone else's watchdog
        (True, "parent", True),  # the single binary: systemd watches the bootloader
        (True, "self", True),
        (True, "1", False),
    ],
)
def test_the_watchdog_is_ours_for_this_process_or_the_single_binarys_bootloader(
    monkeypatch: pytest.MonkeyPatch, frozen: bool, watchdog_pid: str, ours: bool
) -> None:
    pids = {"": "", "self": str(os.getpid()), "parent": str(os.getppid()), "1": "1"}
    monkeypatch.setenv("WATCHDOG_PID", pids[watchdog_pid])
    if frozen:
        monkeypatch.setattr(sys, "frozen", True, raising=False)
    else:
        monkeypatch.delattr(sys, "frozen", raising=False)
    assert watchdog_is_ours() is ours


def test_a_frozen_child_of_the_watched_bootloader_pings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sock = notify_socket(tmp_path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getppid()))
    monkeypatch.setattr(sys, "frozen", True, raising=False)

    async def body() -> None:
        notifier = Notifier()
        notifier.ready("ready")
        await asyncio.sleep(0.15)
        notifier.stopping("stopping")

    asyncio.run(body())
    messages = []
    while not messages or not messages[-1].startswith(b"STOPPING"):
        messages.append(sock.recv(4096))
    assert b"WATCHDOG=1" in messages
    sock.close()
