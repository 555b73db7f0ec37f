"""The system-test harness itself: a real systemd boots, its limits and journal work, peers
reach each other, and nothing is left behind however a test ends."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from . import harness
from .harness import CommandError, NetnsPair, SystemdHost

pytestmark = pytest.mark.system

# systemd stops a RuntimeMaxSec=2 scope at 2 s; starting systemd-run through nsenter costs a
# few hundred ms, so the kill is seen between these bounds (the sleep alone would last 30 s).
RUNTIME_MAX_SEC = 2
EARLIEST_KILL_S = 1.5
LATEST_KILL_S = 10.0
# journald forwards a systemd-cat line in milliseconds; 10 s only bounds a broken journal.
JOURNAL_WAIT_S = 10.0


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(harness.POLL_INTERVAL_S)


def _mounts_mentioning(fragment: str) -> list[str]:
    return [line for line in Path("/proc/mounts").read_text().splitlines() if fragment in line]


def _process_alive(pid: int) -> bool:
    return harness._start_time(pid) is not None


# --- the booted host ---------------------------------------------------------------------------


def test_container_boots_a_real_systemd_as_pid_1(systemd_host: SystemdHost) -> None:
    state = systemd_host.run(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in {"running", "degraded"}
    assert systemd_host.run(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    # Its own network namespace, so nothing inside touches the machine's network: none of the
    # host's interfaces is there (services booted inside, e.g. lxc-net, may add their own).
    inside = os.readlink(f"/proc/{systemd_host.pid}/ns/net")
    assert inside != os.readlink("/proc/self/ns/net")
    links = systemd_host.run(["ip", "-o", "link", "show"]).stdout.splitlines()
    names = {line.split(":")[1].strip().split("@")[0] for line in links}
    host_links = {p.name for p in Path("/sys/class/net").iterdir()} - {"lo"}
    assert "lo" in names
    assert not names & host_links
    print(f"boot took {systemd_host.boot_seconds:.1f} s")
    assert systemd_host.boot_seconds < harness.BOOT_TIMEOUT_S


def test_commands_run_as_root_or_as_a_user_with_files_written_from_outside(
    systemd_host: SystemdHost,
) -> None:
    # /tmp is a tmpfs that exists only inside the container: written through /proc/PID/root.
    systemd_host.write_file("/tmp/harness/greeting.txt", "hello\n", mode=0o640, owner="nobody")
    listing = systemd_host.run("stat -c '%U %a' /tmp/harness/greeting.txt").stdout.split()
    assert listing == ["nobody", "640"]
    assert systemd_host.run(["id", "-un"], user="nobody").stdout.strip() == "nobody"
    readable = systemd_host.run(["cat", "/tmp/harness/greeting.txt"], user="nobody")
    assert readable.stdout == "hello\n"
    # The caller's environment does not leak in.
    assert "VIRTUAL_ENV" not in systemd_host.run(["env"]).stdout


def test_a_failed_command_raises_with_its_output(systemd_host: SystemdHost) -> None:
    with pytest.raises(CommandError) as failure:
        systemd_host.run("echo partial; echo 'no such widget' >&2; exit 3")
    assert failure.value.returncode == 3
    assert "no such widget" in str(failure.value)
    assert "partial" in str(failure.value)
    unchecked = systemd_host.run(["false"], check=False)
    assert unchecked.returncode == 1


def test_a_command_past_its_timeout_is_killed_inside_the_container(
    systemd_host: SystemdHost,
) -> None:
    marker = f"{30 + secrets.randbelow(1000) / 1000:.3f}"  # a sleep no other test runs
    with pytest.raises(subprocess.TimeoutExpired):
        systemd_host.run(["sleep", marker], timeout=0.5)
    survivors = systemd_host.run(["pgrep", "-f", f"^sleep {marker}$"], check=False)
    assert survivors.returncode == 1, f"sleep still running: {survivors.stdout}"


def test_runtime_max_sec_kills_a_transient_scope_at_its_deadline(
    systemd_host: SystemdHost,
) -> None:
    unit = f"harness-probe-{secrets.token_hex(4)}"
    cmd = [
        "systemd-run",
        "--scope",
        f"--unit={unit}",
        "-p",
        "MemoryMax=64M",
        "-p",
        f"RuntimeMaxSec={RUNTIME_MAX_SEC}",
        "sleep",
        "30",
    ]
    started = time.monotonic()
    proc = systemd_host.popen(cmd)
    try:

        def scope_active() -> bool:
            show = ["systemctl", "show", f"{unit}.scope", "-p", "ActiveState"]
            return systemd_host.run(show, check=False).stdout.strip() == "ActiveState=active"

        _wait_for(scope_active, LATEST_KILL_S, f"{unit}.scope to start")
        props = systemd_host.run(
            ["systemctl", "show", f"{unit}.scope", "-p", "MemoryMax", "-p", "RuntimeMaxUSec"]
        ).stdout.split()
        # The properties are set (the kernel does not enforce the memory cap here; see
        # ENVIRONMENT.md), and the time limit is enforced by systemd itself:
        assert sorted(props) == ["MemoryMax=67108864", f"RuntimeMaxUSec={RUNTIME_MAX_SEC}s"]
        returncode = proc.wait(timeout=LATEST_KILL_S)
        elapsed = time.monotonic() - started
    finally:
        harness.stop_process(proc)
    assert returncode != 0
    assert EARLIEST_KILL_S <= elapsed < LATEST_KILL_S


def test_journal_has_a_message_logged_with_systemd_cat(
    systemd_host: SystemdHost, tmp_path: Path
) -> None:
    tag = f"harness-{secrets.token_hex(4)}"
    message = f"reflector harness check {secrets.token_hex(8)}"
    systemd_host.run(["systemd-cat", "-t", tag, "-p", "warning", "echo", message])

    def entries() -> list[dict[str, str]]:
        out = systemd_host.run(["journalctl", "-t", tag, "-o", "json", "--no-pager"]).stdout
        return [json.loads(line) for line in out.splitlines()]

    _wait_for(lambda: len(entries()) > 0, JOURNAL_WAIT_S, f"{message!r} in the journal")
    [entry] = entries()
    assert entry["MESSAGE"] == message
    assert entry["PRIORITY"] == "4"  # warning
    # What a failed test leaves in test-artifacts contains it too.
    saved = harness.save_journal(systemd_host, tmp_path)
    assert message in saved.read_text()


# --- teardown -----------------------------------------------------------------------------


def _boot_and_leave(how: str, artifacts: Path) -> dict[str, object]:
    """Boot a container, leave it by `how`, and report what the machine looked like inside."""
    seen: dict[str, object] = {}

    def body() -> None:
        with harness.systemd_host(name=f"rfl-{how}", artifacts_dir=artifacts) as host:
            seen.update(
                machine=host.machine,
                base_dir=host.base_dir,
                pid=host.pid,
                nspawn_pid=host.nspawn_pid,
                mounted=len(_mounts_mentioning(str(host.base_dir))),
            )
            host.run(["systemd-cat", "-t", "harness-teardown", "echo", f"leaving by {how}"])
            if how == "interrupt":
                raise KeyboardInterrupt
            if how == "error":
                raise RuntimeError("a test failed inside the container")

    if how == "interrupt":
        with pytest.raises(KeyboardInterrupt):
            body()
    elif how == "error":
        with pytest.raises(RuntimeError, match="a test failed"):
            body()
    else:
        body()
    return seen


def test_teardown_leaves_nothing_behind_on_exit_error_or_interrupt(
    require_systemd: None, tmp_path: Path
) -> None:
    ways = ["normal", "error", "interrupt"]
    # In parallel: this also shows that containers with unique names do not collide.
    with ThreadPoolExecutor(max_workers=len(ways)) as pool:
        futures = {how: pool.submit(_boot_and_leave, how, tmp_path / how) for how in ways}
        results = {how: future.result() for how, future in futures.items()}
    for how, seen in results.items():
        base_dir = seen["base_dir"]
        assert isinstance(base_dir, Path)
        assert seen["mounted"] == 2, f"{how}: tmpfs and overlay were mounted while it ran"
        assert _mounts_mentioning(str(base_dir)) == [], f"{how}: mounts left behind"
        assert not base_dir.exists(), f"{how}: {base_dir} left behind"
        for key in ("pid", "nspawn_pid"):
            pid = seen[key]
            assert isinstance(pid, int)
            assert not _process_alive(pid), f"{how}: {key} {pid} still running"
        assert not (harness._NSPAWN_PROPAGATE_DIR / str(seen["machine"])).exists()
    # Only the failed body left a journal, and it has the last thing the test did.
    journal = tmp_path / "error" / "journal.txt"
    assert "leaving by error" in journal.read_text()
    assert not (tmp_path / "normal").exists()
    assert not (tmp_path / "interrupt" / "journal.txt").exists()


def test_a_boot_that_fails_is_torn_down_and_keeps_the_console(
    require_systemd: None, tmp_path: Path
) -> None:
    name = f"rfl-bootfail-{secrets.token_hex(2)}"
    with (
        pytest.raises(harness.BootError, match="did not"),
        harness.systemd_host(name=name, boot_timeout=0.01, artifacts_dir=tmp_path),
    ):
        pytest.fail("the body must not run when the boot failed")
    assert _mounts_mentioning(name) == []
    assert list(Path("/tmp").glob(f"{name}-*")) == []
    leftover = [
        proc
        for proc in Path("/proc").glob("[0-9]*/cmdline")
        if name.encode() in _read_or_empty(proc)
    ]
    assert leftover == []
    assert (tmp_path / "console.txt").exists()


def _read_or_empty(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError:
        return b""


# --- peers -------------------------------------------------------------------------------


def test_netns_pair_reaches_across_the_veth_in_both_families(netns_pair: NetnsPair) -> None:
    endpoint, peer = netns_pair.endpoint, netns_pair.peer
    assert (endpoint.ipv4, endpoint.ipv6) == ("198.51.100.1", "2001:db8:1::1")
    assert (peer.ipv4, peer.ipv6) == ("198.51.100.2", "2001:db8:1::2")
    for address in (endpoint.ipv4, endpoint.ipv6):
        assert netns_pair.ping(peer, address) < harness.PING_TIMEOUT_S
    for address in (peer.ipv4, peer.ipv6):
        assert netns_pair.ping(endpoint, address) < harness.PING_TIMEOUT_S


def test_a_second_peer_shares_the_segment_with_its_own_address(netns_pair: NetnsPair) -> None:
    second = netns_pair.add_peer()
    assert (second.ipv4, second.ipv6) == ("198.51.100.3", "2001:db8:1::3")
    netns_pair.ping(second, netns_pair.endpoint.ipv4)
    netns_pair.ping(second, netns_pair.peer.ipv6)
    # The endpoint learns each peer at its own link-layer address, as on a real LAN.
    netns_pair.ping(netns_pair.endpoint, netns_pair.peer.ipv4)
    neighbours = netns_pair.run_in(netns_pair.endpoint, ["ip", "-4", "neigh", "show"]).stdout
    assert "198.51.100.2" in neighbours
    assert "198.51.100.3" in neighbours


def test_netns_pair_namespaces_are_deleted_afterwards_even_on_error(require_netns: None) -> None:
    names: list[str] = []
    sleepers: list[subprocess.Popen[str]] = []

    def fail_inside() -> None:
        with harness.netns_pair() as pair:
            pair.add_peer()
            names.extend(ns.name for ns in pair.namespaces)
            # A process still running inside must not keep a namespace alive.
            sleepers.append(pair.popen_in(pair.peer, ["sleep", "30"]))
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert len(names) == 3
    assert not any(name in listed for name in names)
    [sleeper] = sleepers
    assert harness.stop_process(sleeper) == -9  # killed by the teardown, not by us


def test_netns_pair_inside_the_container(
    systemd_host: SystemdHost, container_netns_pair: NetnsPair
) -> None:
    pair = container_netns_pair
    assert pair.ping(pair.peer, pair.endpoint.ipv4) < harness.PING_TIMEOUT_S
    assert pair.ping(pair.endpoint, pair.peer.ipv6) < harness.PING_TIMEOUT_S
    inside = systemd_host.run(["ip", "netns", "list"]).stdout
    assert pair.endpoint.name in inside
    on_machine = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert pair.endpoint.name not in on_machine


# A stand-in for a test run: installs the harness's handler, holds a "resource" whose release
# is in a finally (as every fixture's teardown is), says it is ready, then waits to be stopped.
HELD_UNTIL_SIGTERM = """
import pathlib, sys, time
from tests.system.harness import interrupt_on_sigterm
interrupt_on_sigterm()
marker = pathlib.Path(sys.argv[1])
try:
    print("ready", flush=True)
    time.sleep(60)
finally:
    marker.write_text("released")
"""


def test_a_run_stopped_with_sigterm_still_runs_its_teardown(tmp_path: Path) -> None:
    marker = tmp_path / "released"
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD_UNTIL_SIGTERM, str(marker)],
        cwd=Path(__file__).resolve().parents[2],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert marker.read_text() == "released"
    assert "KeyboardInterrupt: stopped by signal 15" in err
