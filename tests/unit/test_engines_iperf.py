"""The iperf3 engine with the real iperf3 on loopback: a one-off server per grant that always ends.

Each live test runs a 1 s iperf3 test between an `IperfServer` and `run_client`, and checks
the normalized numbers against iperf3's own JSON from both sides.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from reflector.config import Iperf3Config
from reflector.engines.iperf import (
    IDLE_BACKSTOP_S,
    RCV_TIMEOUT_MS,
    SERVER_BITRATE_AVERAGING_S,
    EngineError,
    IperfServer,
    client_argv,
    run_client,
    server_argv,
)
from reflector.engines.throughput_result import ThroughputResult

IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
needs_iperf3 = pytest.mark.skipif(not os.access(IPERF3, os.X_OK), reason="iperf3 not installed")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def port_is_free(port: int) -> bool:
    """Can a new listener take the port? With SO_REUSEADDR, as iperf3 itself binds it:
    TIME_WAIT leftovers of a finished test do not count, a live listener does."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
            sock.listen()
        except OSError:
            return False
        return True


def config(**overrides: Any) -> Iperf3Config:
    return Iperf3Config(**{"path": IPERF3, **overrides})


async def run_test(
    *, streams: int = 1, reverse: bool = False, udp: bool = False, bitrate_bps: int | None = None
) -> tuple[IperfServer, ThroughputResult, dict[str, Any]]:
    """One granted 1 s test: server up, client runs, server result with the client's JSON."""
    port = free_port()
    server = IperfServer(config(), port=port, bind="127.0.0.1", duration_s=1)
    await server.start()
    try:
        client_json = await run_client(
            "127.0.0.1",
            port,
            duration_s=1,
            streams=streams,
            reverse=reverse,
            udp=udp,
            bitrate_bps=bitrate_bps,
            iperf3_path=IPERF3,
        )
        await server.wait(time.monotonic() + 10)
    finally:
        await server.stop()
    result = server.result(client_json)
    assert isinstance(result, ThroughputResult), result
    assert port_is_free(port)
    return server, result, client_json


# --- Argument lists.


def test_server_argv_is_the_one_off_json_server_with_its_backstops():
    argv = server_argv(config(), 5201, "127.0.0.1", 30)

    assert argv == [
        IPERF3,
        "-s",
        "-p",
        "5201",
        "--one-off",
        "-J",
        "-B",
        "127.0.0.1",
        "-i",
        "1",
        "--idle-timeout",
        str(30 + IDLE_BACKSTOP_S),
        "--rcv-timeout",
        str(RCV_TIMEOUT_MS),
    ]


def test_server_argv_adds_the_bitrate_cap_only_when_configured():
    argv = server_argv(config(max_bitrate_bps=100_000_000), 5201, "::1", 60)

    assert argv[-2:] == ["--server-bitrate-limit", f"100000000/{SERVER_BITRATE_AVERAGING_S}"]
    assert argv[argv.index("-B") + 1] == "::1"


def test_server_argv_stretches_the_report_interval_for_long_tests():
    argv = server_argv(config(), 5201, "127.0.0.1", 3600)

    assert argv[argv.index("-i") + 1] == "30"


@pytest.mark.parametrize(
    ("port", "bind", "duration"),
    [
        (5201, "127.0.0.1 -D", 10),
        (5201, "-D", 10),
        (5201, "eth0", 10),
        (5201, "127.0.0.1%lo", 10),
        (80, "127.0.0.1", 10),
        (70000, "127.0.0.1", 10),
        (5201, "127.0.0.1", 0),
        (5201, "127.0.0.1", 3601),
        (True, "127.0.0.1", 10),
    ],
)
def test_server_argv_refuses_anything_but_an_ip_literal_and_bounded_integers(
    port: int, bind: str, duration: int
):
    with pytest.raises(ValueError):
        server_argv(config(), port, bind, duration)


def test_client_argv_spells_out_every_option():
    argv = client_argv(
        "192.0.2.7",
        5201,
        duration_s=10,
        streams=4,
        reverse=True,
        udp=True,
        bitrate_bps=50_000_000,
        iperf3_path="/opt/iperf3",
    )

    assert argv == [
        "/opt/iperf3",
        "-c",
        "192.0.2.7",
        "-p",
        "5201",
        "-t",
        "10",
        "-P",
        "4",
        "-J",
        "--connect-timeout",
        "5000",
        "-R",
        "-u",
        "-b",
        "50000000",
    ]
    assert "-b" not in client_argv("reflector.example.net", 5201, duration_s=10)


@pytest.mark.parametrize("host", ["-R", "--bidir", "a b", "host;rm", "", "x" * 300, "h\n"])
def test_client_argv_refuses_a_host_that_is_not_an_address_or_name(host: str):
    with pytest.raises(ValueError):
        client_argv(host, 5201, duration_s=10)


@pytest.mark.parametrize(
    "kwargs", [{"streams": 0}, {"streams": 129}, {"duration_s": 0}, {"bitrate_bps": -1}]
)
def test_client_argv_refuses_out_of_range_numbers(kwargs: dict[str, int]):
    args: dict[str, Any] = {"duration_s": 10, **kwargs}
    with pytest.raises(ValueError):
        client_argv("127.0.0.1", 5201, **args)


# --- Live runs on loopback.


@needs_iperf3
def test_tcp_upload_one_stream_matches_iperf3_own_json():
    server, result, client_json = asyncio.run(run_test())

    raw = server.output_json()
    assert raw is not None
    assert result.direction == "upload"
    assert result.upload_bps == raw["end"]["sum_received"]["bits_per_second"] > 0
    assert result.bytes_transferred == raw["end"]["sum_received"]["bytes"]
    assert result.appliance is not None
    assert result.appliance.bits_per_second == client_json["end"]["sum_sent"]["bits_per_second"]
    assert result.retransmits == client_json["end"]["sum_sent"]["retransmits"]
    assert raw["start"]["cookie"] == client_json["start"]["cookie"]
    assert server.exit_code == 0
    assert server.pid is not None
    assert server.runtime_s is not None
    assert 0.9 < server.runtime_s < 5
    assert server.audit()["exit_code"] == 0
    assert server.audit()["timed_out"] is False


@needs_iperf3
def test_tcp_two_streams_are_each_reported():
    server, result, _ = asyncio.run(run_test(streams=2))

    raw = server.output_json()
    assert raw is not None
    assert result.params.streams == 2
    assert [s.bytes for s in result.streams] == [
        s["receiver"]["bytes"] for s in raw["end"]["streams"]
    ]
    assert sum(s.bytes for s in result.streams) == result.bytes_transferred


@needs_iperf3
def test_reverse_is_a_download_with_the_endpoint_retransmits():
    server, result, client_json = asyncio.run(run_test(reverse=True))

    raw = server.output_json()
    assert raw is not None
    assert result.direction == "download"
    assert result.upload_bps is None
    assert result.download_bps == client_json["end"]["sum_received"]["bits_per_second"] > 0
    assert result.bytes_transferred == raw["end"]["sum_sent"]["bytes"]
    assert result.retransmits == raw["end"]["sum_sent"]["retransmits"]


@needs_iperf3
def test_udp_upload_reports_loss_and_jitter_from_the_endpoint():
    server, result, _ = asyncio.run(run_test(udp=True, bitrate_bps=5_000_000))

    raw = server.output_json()
    assert raw is not None
    received = raw["end"]["sum_received"]
    assert result.params.protocol == "udp"
    assert result.params.bitrate_limit_bps == 5_000_000
    assert result.udp is not None
    assert result.udp.packets == received["packets"] > 0
    assert result.udp.lost_packets == received["lost_packets"]
    assert result.udp.jitter_ms == received["jitter_ms"]
    assert result.upload_bps == received["bits_per_second"]


@needs_iperf3
def test_a_server_nobody_connects_to_is_killed_at_its_deadline():
    async def scenario() -> tuple[IperfServer, float]:
        server = IperfServer(config(), port=port, bind="127.0.0.1", duration_s=30)
        await server.start()
        started = time.monotonic()
        await server.wait(started + 0.5)
        return server, time.monotonic() - started

    port = free_port()
    server, waited = asyncio.run(scenario())

    result = server.result()
    assert isinstance(result, EngineError)
    assert result.code == "iperf3_timeout"
    assert "no client connected" in result.message
    assert 0.4 < waited < 2.5
    assert server.timed_out
    assert server.exit_code is not None
    assert port_is_free(port)


@needs_iperf3
def test_the_port_can_be_granted_again_right_after_a_test():
    async def scenario() -> None:
        _, _, client_json = await run_test()
        port = client_json["start"]["connecting_to"]["port"]
        again = IperfServer(config(), port=port, bind="127.0.0.1", duration_s=1)
        await again.start()
        await again.stop()
        assert port_is_free(port)

    asyncio.run(scenario())


def test_a_missing_binary_is_iperf3_missing():
    server = IperfServer(
        config(path="/nonexistent/iperf3"), port=free_port(), bind="127.0.0.1", duration_s=1
    )

    with pytest.raises(EngineError) as info:
        asyncio.run(server.start())

    assert info.value.code == "iperf3_missing"
    assert "/nonexistent/iperf3" in info.value.message
    assert server.result() is info.value


@needs_iperf3
def test_a_port_already_in_use_is_port_unavailable():
    async def scenario() -> None:
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", 0))
            squatter.listen()
            port = squatter.getsockname()[1]
            server = IperfServer(config(), port=port, bind="127.0.0.1", duration_s=1)
            with pytest.raises(EngineError) as info:
                await server.start()
            assert info.value.code == "port_unavailable"
            assert str(port) in info.value.message
            assert server.exit_code not in (None, 0)

    asyncio.run(scenario())


def test_a_binary_that_exits_without_json_is_iperf3_failed():
    server = IperfServer(
        config(path="/bin/false"), port=free_port(), bind="127.0.0.1", duration_s=1
    )

    with pytest.raises(EngineError) as info:
        asyncio.run(server.start())

    assert info.value.code == "iperf3_failed"
    assert "exited with 1" in info.value.message


def test_a_binary_that_prints_something_else_is_iperf3_bad_output():
    server = IperfServer(config(path="/bin/echo"), port=free_port(), bind="127.0.0.1", duration_s=1)

    with pytest.raises(EngineError) as info:
        asyncio.run(server.start())

    assert info.value.code == "iperf3_bad_output"


_STUBBORN = """\
import signal, socket, subprocess, sys, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
helper = subprocess.Popen(["sleep", "30"])
port = int(sys.argv[sys.argv.index("-p") + 1])
listener = socket.socket()
listener.bind(("127.0.0.1", port))
listener.listen()
time.sleep(30)
"""


@pytest.fixture
def stubborn_server(tmp_path: Path) -> str:
    """A process that listens like iperf3 but ignores SIGTERM and has a child of its own."""
    script = tmp_path / "stubborn-iperf3"
    script.write_text(f"#!{sys.executable}\n{_STUBBORN}")
    script.chmod(0o755)
    return str(script)


def live_group_members(pgid: int) -> list[int]:
    """Processes of the group that still run (a killed child may linger as a zombie)."""
    members = []
    for proc in psutil.process_iter(["status"]):
        with contextlib.suppress(ProcessLookupError, psutil.NoSuchProcess):
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
    return members


def test_a_server_that_ignores_sigterm_is_killed_with_its_whole_group(stubborn_server: str):
    async def scenario() -> tuple[IperfServer, list[int]]:
        server = IperfServer(
            config(path=stubborn_server), port=free_port(), bind="127.0.0.1", duration_s=1
        )
        await server.start()
        assert server.pid is not None
        before = live_group_members(server.pid)  # own group: its id is the leader's pid
        await server.wait(time.monotonic() + 0.2)
        return server, before

    server, before = asyncio.run(scenario())

    assert len(before) == 2  # the stubborn leader and its sleeping child
    assert server.exit_code == -signal.SIGKILL
    result = server.result()
    assert isinstance(result, EngineError)
    assert result.code == "iperf3_timeout"
    assert server.pid is not None
    # SIGKILL went to the whole group; the kernel takes a moment to finish the orphaned child.
    deadline = time.monotonic() + 5
    while live_group_members(server.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live_group_members(server.pid) == []


# --- The appliance's client on its own.


@needs_iperf3
def test_the_client_reports_a_refused_connection_as_an_iperf3_error():
    lines: list[str] = []
    with pytest.raises(EngineError) as info:
        asyncio.run(
            run_client(
                "127.0.0.1", free_port(), duration_s=1, iperf3_path=IPERF3, progress=lines.append
            )
        )

    assert info.value.code == "iperf3_error"
    assert "Connection refused" in info.value.message
    assert lines
    assert "started" in lines[0]


def test_the_client_with_a_missing_binary_is_iperf3_missing():
    with pytest.raises(EngineError) as info:
        asyncio.run(run_client("127.0.0.1", 5201, duration_s=1, iperf3_path="/nonexistent"))

    assert info.value.code == "iperf3_missing"


def test_the_client_with_non_json_output_is_iperf3_bad_output():
    with pytest.raises(EngineError) as info:
        asyncio.run(run_client("127.0.0.1", 5201, duration_s=1, iperf3_path="/bin/echo"))

    assert info.value.code == "iperf3_bad_output"


@needs_iperf3
def test_the_client_progress_hears_start_ticks_and_end():
    async def scenario() -> list[str]:
        port = free_port()
        server = IperfServer(config(), port=port, bind="127.0.0.1", duration_s=2)
        await server.start()
        lines: list[str] = []
        try:
            await run_client(
                "127.0.0.1", port, duration_s=2, iperf3_path=IPERF3, progress=lines.append
            )
        finally:
            await server.stop()
        return lines

    lines = asyncio.run(scenario())

    assert "started" in lines[0]
    assert any("running" in line for line in lines)
    assert lines[-1] == "iperf3 client finished"


def test_stop_before_start_and_twice_after_is_harmless():
    async def scenario() -> None:
        server = IperfServer(config(), port=free_port(), bind="127.0.0.1", duration_s=1)
        await server.stop()
        with contextlib.suppress(EngineError):
            await server.start()
        await server.stop()
        await server.stop()

    asyncio.run(scenario())


@needs_iperf3
def test_a_bind_address_not_on_this_host_fails_with_iperf3_reason():
    server = IperfServer(config(), port=free_port(), bind="192.0.2.1", duration_s=1)

    with pytest.raises(EngineError) as info:
        asyncio.run(server.start())

    assert info.value.code == "iperf3_failed"
    assert "Cannot assign requested address" in info.value.message


@needs_iperf3
def test_the_server_bitrate_cap_refuses_a_client_asking_for_more():
    """iperf3 enforces --server-bitrate-limit by aborting, here already at parameter exchange."""

    async def scenario() -> tuple[IperfServer, EngineError]:
        port = free_port()
        cap = config(max_bitrate_bps=10_000_000)
        server = IperfServer(cap, port=port, bind="127.0.0.1", duration_s=1)
        await server.start()
        try:
            with pytest.raises(EngineError) as info:
                await run_client(
                    "127.0.0.1",
                    port,
                    duration_s=1,
                    udp=True,
                    bitrate_bps=20_000_000,
                    iperf3_path=IPERF3,
                )
            await server.wait(time.monotonic() + 5)
        finally:
            await server.stop()
        return server, info.value

    server, client_error = asyncio.run(scenario())

    assert client_error.code == "iperf3_error"
    result = server.result()
    assert isinstance(result, EngineError)
    assert result.code == "iperf3_error"
    assert "larger than server limit" in result.message
    assert not server.timed_out


def test_a_cancelled_start_leaves_no_process_behind(tmp_path: Path):
    never_listens = tmp_path / "never-listens"
    never_listens.write_text("#!/bin/sh\nexec sleep 30\n")
    never_listens.chmod(0o755)

    async def scenario() -> IperfServer:
        server = IperfServer(
            config(path=str(never_listens)), port=free_port(), bind="127.0.0.1", duration_s=1
        )
        task = asyncio.ensure_future(server.start())
        while server.pid is None:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return server

    server = asyncio.run(scenario())

    assert server.exit_code is not None
    assert server.pid is not None
    assert live_group_members(server.pid) == []
