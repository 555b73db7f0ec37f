"""Engines without systemd (the documented fallback) and the helper's socket, with real processes:
rlimits and the kill timer end runaway engines; iperf3's JSON and the echo's lines come back
through the passed file descriptors; the helper serves only its parent's uid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psutil
import pytest

from reflector.config import Config, parse_config_text
from reflector.engines.iperf import run_client
from reflector.privsep import (
    EngineHandle,
    EngineLimits,
    FirewallUnavailable,
    HelperMissing,
    LocalEngineHost,
    PrivsepClient,
    PrivsepError,
    open_reader,
    select_engine_host,
)
from reflector.privsep.helper import serve_helper
from reflector.privsep.local import LocalLauncher, Rlimits, rlimits_for, spawn_limited
from reflector.privsep.protocol import HEADER, MAX_FRAME_BYTES, FrameReader, decode_response
from reflector.privsep.supervisor import child_is_exiting, stat_says_exiting

IPERF3 = shutil.which("iperf3") or "/usr/bin/iperf3"
needs_iperf3 = pytest.mark.skipif(not os.access(IPERF3, os.X_OK), reason="iperf3 not installed")
# A port block of our own, so parallel test runs do not collide; below Linux's ephemeral range
# (32768-60999), where an outgoing connection of another test could hold one of them.
BASE = random.Random().randrange(20000, 32700, 20)
GRACE_S = 1


def make_config(mode: str = "tunneled") -> Config:
    return parse_config_text(
        f"""
[network]
mode = "{mode}"
listen_address = ["127.0.0.1:{BASE}"]
data_port_range_start = {BASE + 1}
data_port_range_end = {BASE + 10}

[iperf3]
path = "{IPERF3}"

[quotas]
max_test_duration_sec = 10
session_grace_sec = 0

[limits]
runtime_grace_sec = {GRACE_S}
"""
    )


CONFIG = make_config()
LIMITS = EngineLimits.from_config(CONFIG)


async def start_iperf3(
    host: LocalEngineHost, test_id: str, port: int, *, duration_s: int
) -> EngineHandle:
    """An iperf3 engine on loopback under the test limits, as the service starts one."""
    return await host.start_engine(
        test_id=test_id,
        kind="iperf3",
        port=port,
        duration_s=duration_s,
        bind="127.0.0.1",
        peer="127.0.0.1",
        limits=LIMITS,
    )


def with_host(body: Callable[[LocalEngineHost], Awaitable[None]]) -> None:
    """Run `body` with a fresh LocalEngineHost; every engine is stopped afterwards."""

    async def main() -> None:
        engines = LocalEngineHost(CONFIG)
        try:
            await body(engines)
        finally:
            await engines.close()

    asyncio.run(main())


async def pipe_fds() -> tuple[int, int, int]:
    """stdin (empty), stdout and stderr for spawn_limited; the test keeps nothing open."""
    return os.open(os.devnull, os.O_RDONLY), os.open(os.devnull, os.O_WRONLY), os.dup(2)


async def run_limited(code: str, limits: Rlimits, kill_after_s: float) -> tuple[int, float]:
    stdin, stdout, stderr = await pipe_fds()
    started = time.monotonic()
    proc, timer = await spawn_limited(
        [sys.executable, "-c", code],
        limits,
        kill_after_s=kill_after_s,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
    )
    for fd in (stdin, stdout, stderr):
        os.close(fd)
    code_ = await asyncio.wait_for(proc.wait(), 15)
    timer.cancel()
    return code_, time.monotonic() - started


GENEROUS = Rlimits(address_space_bytes=1 << 34, nproc=100_000, cpu_seconds=60)


# --- rlimits and the timer


def test_rlimits_stand_in_for_the_scope_properties() -> None:
    limits = EngineLimits(memory_max_bytes=1 << 28, cpu_quota_percent=100, tasks_max=32)
    got = rlimits_for(limits, duration_s=30, grace_s=10, user_tasks_now=200)
    # RLIMIT_NPROC counts all of the user's tasks: the engine may add tasks_max to them.
    assert got == Rlimits(address_space_bytes=1 << 28, nproc=232, cpu_seconds=40)


def test_an_engine_over_its_cpu_rlimit_is_killed() -> None:
    asyncio.run(_an_engine_over_its_cpu_rlimit_is_killed_body())


async def _an_engine_over_its_cpu_rlimit_is_killed_body() -> None:
    limits = Rlimits(address_space_bytes=1 << 34, nproc=100_000, cpu_seconds=1)
    code, elapsed = await run_limited("while True: pass", limits, kill_after_s=30)
    assert code in (-signal.SIGXCPU, -signal.SIGKILL)
    assert elapsed < 10


def test_an_engine_over_its_memory_rlimit_cannot_allocate() -> None:
    asyncio.run(_an_engine_over_its_memory_rlimit_cannot_allocate_body())


async def _an_engine_over_its_memory_rlimit_cannot_allocate_body() -> None:
    limits = Rlimits(address_space_bytes=256 << 20, nproc=100_000, cpu_seconds=60)
    code, _ = await run_limited("b = bytearray(512 << 20)", limits, kill_after_s=30)
    assert code == 1  # MemoryError: the allocation was refused
    ok, _ = await run_limited("b = bytearray(16 << 20)", limits, kill_after_s=30)
    assert ok == 0


def test_the_timer_stops_an_engine_at_its_deadline() -> None:
    asyncio.run(_the_timer_stops_an_engine_at_its_deadline_body())


async def _the_timer_stops_an_engine_at_its_deadline_body() -> None:
    code, elapsed = await run_limited("import time; time.sleep(30)", GENEROUS, kill_after_s=0.5)
    assert code == -signal.SIGTERM
    assert 0.4 < elapsed < 3


# A Reflector stand-in: starts a long engine with spawn_limited, says its pid, then waits.
PARENT_OF_AN_ENGINE = """
import asyncio, os, sys
from reflector.privsep.local import Rlimits, spawn_limited
async def main():
    null = os.open(os.devnull, os.O_RDWR)
    limits = Rlimits(address_space_bytes=1 << 34, nproc=100_000, cpu_seconds=60)
    proc, _ = await spawn_limited(["sleep", "60"], limits, kill_after_s=60,
                                  stdin=null, stdout=null, stderr=null)
    print(proc.pid, flush=True)
    await asyncio.sleep(60)
asyncio.run(main())
"""


def test_an_engine_dies_with_a_reflector_killed_by_sigkill() -> None:
    """The kill timer dies with the parent; the kernel's parent-death signal does not."""
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT_OF_AN_ENGINE], stdout=subprocess.PIPE, text=True
    )
    engine: psutil.Process | None = None
    try:
        assert parent.stdout is not None
        engine = psutil.Process(int(parent.stdout.readline()))
        assert engine.name() == "sleep"
        parent.kill()
        parent.wait(10)
        engine.wait(5)  # raises TimeoutExpired if the engine outlived its parent
    finally:
        parent.kill()
        parent.wait(10)
        if engine is not None and engine.is_running():
            engine.kill()  # the test failed: still clean up what it started


# --- LocalEngineHost with the real engines


@needs_iperf3
def test_iperf3_json_comes_back_through_the_stdout_fd() -> None:
    with_host(_iperf3_json_comes_back_through_the_stdout_fd_body)


async def _iperf3_json_comes_back_through_the_stdout_fd_body(host: LocalEngineHost) -> None:
    port = BASE + 1
    handle = await start_iperf3(host, "local-iperf", port, duration_s=5)
    assert handle.ready
    assert "rlimit_as" in handle.protections
    out, err = await open_reader(handle.stdout_fd), await open_reader(handle.stderr_fd)
    await run_client("127.0.0.1", port, duration_s=1, iperf3_path=IPERF3)
    doc = json.loads(await asyncio.wait_for(out.read(), 10))  # EOF: iperf3 exited
    assert doc["end"]["sum_received"]["bytes"] > 0
    assert await err.read() == b""
    ended = await host.stop_engine("local-iperf")
    # iperf3 finished by itself: the stop that follows the EOF at once, before the exit is
    # reaped or even shows as a zombie, still reports it as the engine's own exit.
    assert (ended.exit_code, ended.stopped_by) == (0, "exit")
    assert ended.ip_ingress_bytes is None  # no kernel counters without a cgroup


@needs_iperf3
def test_another_program_of_ours_on_the_port_is_not_taken_for_the_engine() -> None:
    with_host(_another_program_on_the_port_body)


async def _another_program_on_the_port_body(host: LocalEngineHost) -> None:
    # Same uid, same port: the socket tables alone would say "ready" while iperf3 fails to bind.
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", BASE + 4))
        squatter.listen()
        handle = await start_iperf3(host, "local-squatted", BASE + 4, duration_s=5)
        assert not handle.ready
        out = await open_reader(handle.stdout_fd)
        os.close(handle.stderr_fd)
        doc = json.loads(await asyncio.wait_for(out.read(), 10))  # -J: the error is in the JSON
        assert "in use" in doc["error"]
        ended = await host.stop_engine("local-squatted")
        assert ended.exit_code != 0


@needs_iperf3
def test_the_timer_ends_an_engine_at_duration_plus_grace() -> None:
    with_host(_the_timer_ends_an_engine_at_duration_plus_grace_body)


async def _the_timer_ends_an_engine_at_duration_plus_grace_body(host: LocalEngineHost) -> None:
    started = time.monotonic()
    handle = await start_iperf3(host, "local-late", BASE + 2, duration_s=1)
    os.close(handle.stderr_fd)
    out = await open_reader(handle.stdout_fd)
    await asyncio.wait_for(out.read(), 10)  # nobody came: only the timer ends it
    elapsed = time.monotonic() - started
    assert 1 + GRACE_S - 0.2 < elapsed < 1 + GRACE_S + 2
    ended = await host.stop_engine("local-late")
    assert ended.stopped_by == "runtime_limit"


def test_the_echo_gets_its_key_on_stdin_and_prints_json_lines() -> None:
    with_host(_the_echo_gets_its_key_on_stdin_and_prints_json_lines_body)


async def _the_echo_gets_its_key_on_stdin_and_prints_json_lines_body(host: LocalEngineHost) -> None:
    key = secrets.token_bytes(32)
    handle = await host.start_engine(
        test_id="local-echo",
        kind="udp_echo",
        port=BASE,  # the control port's number, as in tunneled mode
        duration_s=5,
        bind="127.0.0.1",
        peer="127.0.0.1",
        limits=LIMITS,
        echo_key=key,
    )
    assert handle.ready
    cmdline = Path(f"/proc/{handle.pid}/cmdline").read_bytes()
    assert key.hex().encode() not in cmdline
    out, err = await open_reader(handle.stdout_fd), await open_reader(handle.stderr_fd)
    assert json.loads(await out.readline())["event"] == "listening"
    ended = await host.stop_engine("local-echo")
    assert (ended.exit_code, ended.stopped_by) == (0, "stop")
    assert json.loads(await out.readline())["event"] == "stopped"
    assert await err.read() == b""


def test_the_fallback_applies_the_same_policy() -> None:
    with_host(_the_fallback_applies_the_same_policy_body)


async def _the_fallback_applies_the_same_policy_body(host: LocalEngineHost) -> None:
    with pytest.raises(PrivsepError) as outside:
        await host.start_engine(
            test_id="x",
            kind="iperf3",
            port=BASE + 11,
            duration_s=5,
            bind="127.0.0.1",
            peer="127.0.0.1",
            limits=LIMITS,
        )
    assert outside.value.code == "out_of_range"
    with pytest.raises(PrivsepError) as holes:
        await host.open_hole(
            test_id="x", peer_addr="192.0.2.1", proto="tcp", port=BASE + 1, ttl_s=5
        )
    assert holes.value.code == "not_permitted"  # tunneled mode has no holes
    with pytest.raises(PrivsepError) as unknown:
        await host.stop_engine("never-started")
    assert unknown.value.code == "unknown_test"


# --- The helper's socket, served here with the local launcher


async def serve(path: Path, allowed_uid: int) -> tuple[asyncio.Task[None], asyncio.Event]:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen()
    stop = asyncio.Event()
    task = asyncio.get_running_loop().create_task(
        serve_helper(
            CONFIG,
            listener,
            allowed_uids={allowed_uid},
            launcher=LocalLauncher(GRACE_S),
            stop=stop,
        )
    )
    return task, stop


@needs_iperf3
def test_the_helper_passes_the_engine_output_over_its_socket(tmp_path: Path) -> None:
    asyncio.run(_the_helper_passes_the_engine_output_over_its_socket_body(tmp_path))


async def _the_helper_passes_the_engine_output_over_its_socket_body(tmp_path: Path) -> None:
    path = tmp_path / "privd.sock"
    task, stop = await serve(path, os.getuid())
    try:
        client = PrivsepClient(path)
        handle = await client.start_engine(
            test_id="sock-iperf",
            kind="iperf3",
            port=BASE + 3,
            duration_s=5,
            bind="127.0.0.1",
            peer="127.0.0.1",
            limits=LIMITS,
        )
        assert handle.ready
        assert os.get_inheritable(handle.stdout_fd) is False
        out = await open_reader(handle.stdout_fd)
        os.close(handle.stderr_fd)
        await run_client("127.0.0.1", BASE + 3, duration_s=1, iperf3_path=IPERF3)
        assert "end" in json.loads(await asyncio.wait_for(out.read(), 10))
        ended = await client.stop_engine("sock-iperf")
        assert ended.exit_code == 0
        with pytest.raises(PrivsepError) as refused:
            await client.start_engine(
                test_id="sock-2",
                kind="iperf3",
                port=80,
                duration_s=5,
                bind="127.0.0.1",
                peer="127.0.0.1",
                limits=LIMITS,
            )
        assert refused.value.code == "out_of_range"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def test_the_helper_refuses_any_other_uid(tmp_path: Path) -> None:
    asyncio.run(_the_helper_refuses_any_other_uid_body(tmp_path))


async def _the_helper_refuses_any_other_uid_body(tmp_path: Path) -> None:
    path = tmp_path / "privd.sock"
    task, stop = await serve(path, os.getuid() + 4242)
    try:
        with pytest.raises(PrivsepError) as refused:
            await PrivsepClient(path).stop_engine("t1")
        assert refused.value.code == "not_permitted"
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


def raw_exchange(path: Path, data: bytes) -> object:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(data)
        reader = FrameReader()
        while (doc := reader.next_frame()) is None:
            chunk = sock.recv(65536)
            assert chunk, "the helper closed without answering"
            reader.feed(chunk)
        return decode_response(doc)


def test_the_helper_refuses_oversized_and_unknown_frames(tmp_path: Path) -> None:
    asyncio.run(_the_helper_refuses_oversized_and_unknown_frames_body(tmp_path))


async def _the_helper_refuses_oversized_and_unknown_frames_body(tmp_path: Path) -> None:
    path = tmp_path / "privd.sock"
    task, stop = await serve(path, os.getuid())
    try:
        oversized = HEADER.pack(MAX_FRAME_BYTES + 1) + b"{"
        unknown = json.dumps({"type": "exec", "argv": ["/bin/sh"]}).encode()
        for data in (oversized, HEADER.pack(len(unknown)) + unknown):
            response = await asyncio.to_thread(raw_exchange, path, data)
            assert getattr(response, "code", None) == "bad_request", response
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)


# --- which engine host runs


def test_the_engine_host_is_the_helper_else_local_except_for_the_deployed_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "privd.sock"
    text = f'[privsep]\nhelper_socket = "{missing}"\n'
    monkeypatch.delenv("REFLECTOR_SERVICE", raising=False)
    # A laptop, or `make test` under a CI runner's unit (INVOCATION_ID says nothing about us).
    monkeypatch.setenv("INVOCATION_ID", "0123456789abcdef0123456789abcdef")
    assert isinstance(select_engine_host(parse_config_text(text)), LocalEngineHost)
    monkeypatch.setenv("REFLECTOR_SERVICE", "1")  # units/reflector.service
    assert isinstance(select_engine_host(parse_config_text(text)), HelperMissing)
    allowed = text + "allow_local_engines = true\n"
    assert isinstance(select_engine_host(parse_config_text(allowed)), LocalEngineHost)
    with socket.socket(socket.AF_UNIX) as listening:
        listening.bind(str(missing))
        assert isinstance(select_engine_host(parse_config_text(text)), PrivsepClient)


def test_a_service_without_its_helper_refuses_tests_and_says_what_to_start(
    tmp_path: Path,
) -> None:
    host = HelperMissing(tmp_path / "privd.sock")

    async def body() -> None:
        with pytest.raises(PrivsepError, match=r"start reflector-privd\.socket") as err:
            await host.start_engine(test_id="t", kind="iperf3", port=BASE + 1)
        assert err.value.code == "helper_unavailable"
        with pytest.raises(FirewallUnavailable):
            await host.prepare_firewall()

    asyncio.run(body())


def _stat_line(state: str, flags: int) -> str:
    fields = [state, "1", "1", "1", "0", "-1", str(flags)] + ["0"] * 45
    return "4242 (iperf3 (x) y) " + " ".join(fields) + "\n"


def test_a_task_inside_exit_or_a_zombie_counts_as_ending_by_itself() -> None:
    # PF_EXITING (0x4) is set before the kernel closes the task's files, so a caller who saw EOF
    # finds it set even while the state still reads R or D; the command may contain ")".
    assert stat_says_exiting(_stat_line("R", 0x400044))
    assert stat_says_exiting(_stat_line("D", 0x4))
    assert stat_says_exiting(_stat_line("Z", 0x0))
    assert not stat_says_exiting(_stat_line("S", 0x400040))
    assert not stat_says_exiting("4242 (truncated) S 1")


def test_a_live_child_is_not_ending_and_an_unreaped_or_reaped_one_is() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    try:
        assert not child_is_exiting(proc.pid)
        proc.kill()
        deadline = time.monotonic() + 10
        while not child_is_exiting(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert child_is_exiting(proc.pid)  # killed, a zombie: asked without reaping it
        assert child_is_exiting(proc.pid)
        os.waitpid(proc.pid, 0)  # as asyncio's watcher thread does before the loop hears
        assert child_is_exiting(proc.pid)
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        with contextlib.suppress(ChildProcessError):
            proc.wait()
