"""Disposable systemd hosts and peer network namespaces for Reflector's system tests.

Why this exists: the behaviour that matters most (units, users, file ownership, nftables, peers
with their own addresses) belongs to the operating system, so it is tested against a real
systemd rather than mocks. The build machines have no systemd as PID 1, so a host is booted in
a `systemd-nspawn` container over an overlay of `/` (see /work/shared/ENVIRONMENT.md): it sees
every package the machine has, boots in a few seconds, and every write lands in a tmpfs that
is thrown away. Peers are network namespaces joined by veth links, on documentation addresses.

Everything here is usable without pytest (`with systemd_host() as host: ...`); the pytest
fixtures in conftest.py are thin wrappers. Every resource is released in `finally` blocks, so
an assertion, a boot failure or Ctrl-C never leaves mounts, containers or namespaces behind.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Protocol

__all__ = [
    "ALLOW_SKIP_ENV",
    "ARTIFACTS_DIR",
    "REPO_ROOT",
    "BootError",
    "Command",
    "CommandError",
    "CommandRunner",
    "HostRunner",
    "Netns",
    "NetnsPair",
    "SystemdHost",
    "TeardownError",
    "artifact_dir_for",
    "journal_tail",
    "missing_prerequisites",
    "netns_pair",
    "save_journal",
    "stop_process",
    "systemd_host",
    "unique_name",
]

REPO_ROOT = Path(__file__).resolve().parents[2]
# Gitignored; CI uploads it, so a failed run can be diagnosed without re-running it.
ARTIFACTS_DIR = REPO_ROOT / "test-artifacts"
# Developer laptops often lack root or nspawn; only there may system tests skip instead of fail.
ALLOW_SKIP_ENV = "REFLECTOR_ALLOW_SKIP_SYSTEM"

# A boot takes about 3 s on the 2-core build machines; 60 s absorbs a heavily loaded CI runner
# while still failing a hung boot long before the CI job limit.
BOOT_TIMEOUT_S = 60.0
# A clean poweroff takes about 1.5 s; a container still running after 20 s is hung, so kill it.
STOP_TIMEOUT_S = 20.0
# A systemd that has not finished booting may not handle the poweroff request yet, and nobody
# needs a clean shutdown of a failed boot: kill it soon.
UNBOOTED_STOP_TIMEOUT_S = 2.0
# After SIGKILL the kernel reaps the namespace at once; waiting longer would not help.
KILL_WAIT_S = 5.0
# Default limit for one command run in a container or namespace: none of the harness's own
# commands take more than a second, and a test that needs longer says so.
COMMAND_TIMEOUT_S = 60.0
# How often to look at /proc or ask systemd while waiting: cheap, and short next to a boot.
POLL_INTERVAL_S = 0.1
# Enough of a journal to show why a test failed without flooding the pytest report.
JOURNAL_TAIL_LINES = 40
# The console log only matters when a boot fails; its last lines say where it stopped.
CONSOLE_TAIL_LINES = 30
# Interface names are limited to 15 bytes by the kernel (IFNAMSIZ - 1).
_IFNAMSIZ_MAX = 15
# Random suffix length of names: collisions between parallel test runs are then negligible.
_NAME_RANDOM_BYTES = 3

# Commands inside the container start from a clean environment: the caller's venv, PATH or
# locale must not leak in and make a test pass only on one machine.
_CONTAINER_ENV = (
    "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME=/root",
    "LANG=C.UTF-8",
    "TERM=dumb",
    "SYSTEMD_PAGER=",
)
_SYSTEMD_BINARY = Path("/lib/systemd/systemd")
_NSPAWN_PROPAGATE_DIR = Path("/run/systemd/nspawn/propagate")
_BOOTED_STATES = frozenset({"running", "degraded"})

Command = Sequence[str] | str


class BootError(RuntimeError):
    """The container did not reach a running systemd in time (the message has the console)."""


class TeardownError(RuntimeError):
    """Something could not be released: a mount, a directory, a namespace or a process."""


class CommandError(subprocess.CalledProcessError):
    """A command failed; unlike CalledProcessError, str() shows its output, which says why."""

    def __str__(self) -> str:
        parts = [f"command {self.cmd!r} exited with {self.returncode}"]
        for label, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                parts.append(f"--- {label} ---\n{_tail(str(text), JOURNAL_TAIL_LINES)}")
        return "\n".join(parts)


class CommandRunner(Protocol):
    """Somewhere commands run: the machine itself or a container. Netns helpers use either."""

    def run(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]: ...

    def popen(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]: ...


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"stopped by signal {signum}")


def interrupt_on_sigterm() -> None:
    """Make SIGTERM (a CI runner stopping the job) unwind like Ctrl-C.

    Python's default for SIGTERM is to die on the spot, skipping every `finally` and fixture
    teardown: containers would keep running and overlays stay mounted. As KeyboardInterrupt,
    pytest unwinds the fixtures, which stop containers and remove mounts and namespaces.
    """
    signal.signal(signal.SIGTERM, _interrupt)


def unique_name(prefix: str) -> str:
    """A name no parallel test run will pick: prefix, our PID and random hex (hostname-safe)."""
    clean = re.sub(r"[^a-z0-9-]+", "-", prefix.lower()).strip("-") or "rfl"
    return f"{clean}-{os.getpid()}-{secrets.token_hex(_NAME_RANDOM_BYTES)}"


def missing_prerequisites(*, need_systemd: bool) -> list[str]:
    """What this machine lacks for system tests, one phrase each; empty when it can run them."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append("they need root (mounts, network namespaces, systemd-nspawn)")
    tools = ["ip", "nsenter", "runuser", "mount", "umount"]
    if need_systemd:
        tools.append("systemd-nspawn")
    problems.extend(f"`{tool}` is not installed" for tool in tools if shutil.which(tool) is None)
    if need_systemd and not _SYSTEMD_BINARY.exists():
        problems.append(f"{_SYSTEMD_BINARY} is missing (install the systemd package)")
    return problems


def user_argv(cmd: Command, user: str | None) -> list[str]:
    """The argv that runs `cmd` (a string goes through /bin/sh) as `user` (None: as root)."""
    argv = ["/bin/sh", "-c", cmd] if isinstance(cmd, str) else list(cmd)
    if user is None:
        return argv
    # runuser needs no password and no login shell, so it works for a --shell nologin user.
    return ["runuser", "-u", user, "--", *argv]


def run_argv(
    argv: Sequence[str],
    *,
    shown: Command,
    check: bool,
    timeout: float,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv to completion in its own process group, which is killed whole on timeout.

    A process group, because nsenter, runuser and `ip netns exec` fork: killing only the
    direct child would leave the real command running inside the container.
    """
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.PIPE if input_text is not None else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(input_text, timeout=timeout)
    except BaseException:
        _kill_group(proc.pid)
        # A daemon that escaped the group could hold the pipes open: do not wait for it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.communicate(timeout=KILL_WAIT_S)
        raise
    result = subprocess.CompletedProcess(shown, proc.returncode, out, err)
    if check and proc.returncode != 0:
        raise CommandError(proc.returncode, shown, out, err)
    return result


def popen_argv(
    argv: Sequence[str],
    *,
    stdout: int | IO[Any] | None,
    stderr: int | IO[Any] | None,
) -> subprocess.Popen[str]:
    """Start argv in its own process group, so `stop_process` can stop all of it."""
    return subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )


def stop_process(proc: subprocess.Popen[Any], *, timeout: float = STOP_TIMEOUT_S) -> int:
    """Stop a process started by `popen`: SIGTERM its group, wait, then SIGKILL; return its code."""
    if proc.poll() is None:
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
    # Whatever else is left in the group (a forked child) goes too.
    _kill_group(proc.pid)
    returncode = proc.wait(timeout=KILL_WAIT_S)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return returncode


class HostRunner:
    """Runs commands on the machine itself (used for namespaces that need no systemd)."""

    def run(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        argv = user_argv(cmd, user)
        return run_argv(argv, shown=cmd, check=check, timeout=timeout, input_text=input_text)

    def popen(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        return popen_argv(user_argv(cmd, user), stdout=stdout, stderr=stderr)


# --------------------------------------------------------------------------------------------
# A booted systemd in a container
# --------------------------------------------------------------------------------------------


@dataclass
class SystemdHost:
    """A running container with systemd as its PID 1; commands enter it with nsenter."""

    machine: str
    base_dir: Path
    pid: int  # the container's systemd, as a PID of the machine's own PID namespace
    nspawn_pid: int
    boot_seconds: float

    @property
    def root(self) -> Path:
        """The container's file system as the machine sees it, mounts inside included.

        /proc/PID/root resolves paths in the container's mount namespace, so /tmp and /run
        (tmpfs mounts that exist only inside) are reachable too, unlike the overlay's merged dir.
        """
        return Path(f"/proc/{self.pid}/root")

    def path(self, inside: str | PurePosixPath) -> Path:
        """Where the container's absolute path `inside` is reachable from the machine."""
        relative = PurePosixPath(inside)
        if not relative.is_absolute():
            raise ValueError(f"container path must be absolute: {inside}")
        return self.root / relative.relative_to("/")

    def _argv(self, cmd: Command, user: str | None) -> list[str]:
        enter = ["nsenter", "-t", str(self.pid), "-a", "--", "/usr/bin/env", "-i"]
        return [*enter, *_CONTAINER_ENV, *user_argv(cmd, user)]

    def run(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the container (as root, or as `user`) and wait for it."""
        argv = self._argv(cmd, user)
        return run_argv(argv, shown=cmd, check=check, timeout=timeout, input_text=input_text)

    def popen(
        self,
        cmd: Command,
        *,
        user: str | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start `cmd` inside the container; stop it with `stop_process`."""
        return popen_argv(self._argv(cmd, user), stdout=stdout, stderr=stderr)

    def write_file(
        self,
        inside: str | PurePosixPath,
        data: str | bytes,
        *,
        mode: int = 0o644,
        owner: str | None = None,
    ) -> Path:
        """Create or replace a file inside the container with exactly `mode` (and `owner`)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = data.encode() if isinstance(data, str) else data
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
        with os.fdopen(fd, "wb") as handle:
            os.fchmod(handle.fileno(), mode)  # the umask must not narrow it
            handle.write(payload)
        if owner is not None:
            # Names resolve in the container's /etc/passwd, so chown runs inside.
            self.run(["chown", f"{owner}:", str(inside)])
        return target

    def copy_in(self, source: Path, inside: str | PurePosixPath) -> Path:
        """Copy a file or a directory tree from the machine into the container (root-owned)."""
        target = self.path(inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, symlinks=True, dirs_exist_ok=True)
        else:
            shutil.copy2(source, target)
        return target

    def journal(self, *args: str) -> str:
        """The container's journal as text (extra journalctl arguments may narrow it)."""
        cmd = ["journalctl", "-o", "short-precise", "--no-pager", *args]
        result = self.run(cmd, check=False)
        return result.stdout + (f"\n[journalctl: {result.stderr}]" if result.returncode else "")


def artifact_dir_for(test_name: str) -> Path:
    """test-artifacts/<test name>, with characters that do not belong in a path replaced."""
    return ARTIFACTS_DIR / re.sub(r"[^A-Za-z0-9_.-]+", "_", test_name).strip("_")


def save_journal(host: SystemdHost, dest_dir: Path, *, filename: str = "journal.txt") -> Path:
    """Write the container's journal to dest_dir/filename (for the CI artifacts)."""
    dest_dir.mkdir(parents=True, exist_ok=True)
    path = dest_dir / filename
    path.write_text(host.journal())
    return path


def _save_journal_quietly(host: SystemdHost, dest_dir: Path) -> None:
    """Save the journal while an error propagates; a failure here must not replace that error."""
    with contextlib.suppress(Exception):
        save_journal(host, dest_dir)


def journal_tail(text: str, lines: int = JOURNAL_TAIL_LINES) -> str:
    """The last `lines` lines of a journal: what a failure report should show."""
    return _tail(text, lines)


@contextmanager
def systemd_host(
    *,
    name: str = "rfl",
    boot_timeout: float = BOOT_TIMEOUT_S,
    artifacts_dir: Path | None = None,
) -> Iterator[SystemdHost]:
    """Boot a throw-away systemd container, yield it, and always tear it down.

    If the body raises an Exception and `artifacts_dir` is given, the journal is saved there
    first. Teardown stops the container by PID, unmounts and removes its directory even when
    the boot failed or the body was interrupted.
    """
    machine = unique_name(name)
    base_dir = Path(tempfile.mkdtemp(prefix=f"{machine}-"))
    state = _Machine(machine=machine, base_dir=base_dir)
    failed = False
    try:
        _mount_overlay(state)
        _start_nspawn(state)
        host = _await_boot(state, boot_timeout, artifacts_dir)
        try:
            yield host
        except Exception:
            if artifacts_dir is not None:
                _save_journal_quietly(host, artifacts_dir)
            raise
    except BaseException:
        failed = True
        raise
    finally:
        problems = _teardown(state)
        if problems and not failed:
            raise TeardownError(f"container {machine}: " + "; ".join(problems))


@dataclass
class _Machine:
    """What has been set up so far, so teardown releases exactly that."""

    machine: str
    base_dir: Path
    mounts: list[Path] = field(default_factory=list)  # in the order they were mounted
    nspawn: subprocess.Popen[bytes] | None = None
    booted: bool = False

    @property
    def fs_dir(self) -> Path:
        return self.base_dir / "fs"

    @property
    def merged(self) -> Path:
        return self.fs_dir / "root"

    @property
    def console_log(self) -> Path:
        return self.base_dir / "console.log"


def _mount_overlay(state: _Machine) -> None:
    """A tmpfs holding the overlay's upper and work dirs, and the overlay of / on top of it."""
    state.fs_dir.mkdir()
    _check_call(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", str(state.fs_dir)])
    state.mounts.append(state.fs_dir)
    upper, work = state.fs_dir / "upper", state.fs_dir / "work"
    for directory in (upper, work, state.merged):
        directory.mkdir()
    options = f"lowerdir=/,upperdir={upper},workdir={work}"
    _check_call(["mount", "-t", "overlay", "overlay", "-o", options, str(state.merged)])
    state.mounts.append(state.merged)


def _start_nspawn(state: _Machine) -> None:
    argv = [
        "systemd-nspawn",
        "--quiet",
        "-D",
        str(state.merged),
        "-M",
        state.machine,
        "-b",
        "--register=no",
        "--keep-unit",
        "--private-network",
        "--console=read-only",
        "--",
        "systemd.firstboot=off",
    ]
    with state.console_log.open("wb") as log:
        state.nspawn = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _await_boot(state: _Machine, timeout: float, artifacts_dir: Path | None) -> SystemdHost:
    """Find the container's PID 1, then wait until its systemd reports running or degraded."""
    started = time.monotonic()
    deadline = started + timeout
    try:
        pid = _await_init_pid(state, deadline)
        assert state.nspawn is not None
        host = SystemdHost(
            machine=state.machine,
            base_dir=state.base_dir,
            pid=pid,
            nspawn_pid=state.nspawn.pid,
            boot_seconds=0,
        )
        _await_system_running(state, host, deadline)
    except BootError:
        if artifacts_dir is not None:
            artifacts_dir.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(state.console_log, artifacts_dir / "console.txt")
        raise
    host.boot_seconds = time.monotonic() - started
    state.booted = True
    return host


def _await_init_pid(state: _Machine, deadline: float) -> int:
    assert state.nspawn is not None
    while True:
        _check_nspawn_alive(state)
        for child in _children(state.nspawn.pid):
            if _comm(child) == "systemd":
                return child
        _sleep_or_fail(state, deadline, "systemd did not start in the container")


def _await_system_running(state: _Machine, host: SystemdHost, deadline: float) -> None:
    """Ask systemctl until it answers running/degraded; early on it cannot reach systemd yet."""
    last = ""
    while True:
        _check_nspawn_alive(state)
        remaining = max(deadline - time.monotonic(), POLL_INTERVAL_S)
        try:
            result = host.run(
                ["systemctl", "is-system-running", "--wait"], check=False, timeout=remaining
            )
        except subprocess.TimeoutExpired:
            result = subprocess.CompletedProcess([], 1, "", "systemctl did not answer")
        last = result.stdout.strip() or result.stderr.strip()
        if result.stdout.strip() in _BOOTED_STATES:
            return
        _sleep_or_fail(state, deadline, f"systemd did not finish booting (last state: {last!r})")


def _check_nspawn_alive(state: _Machine) -> None:
    assert state.nspawn is not None
    code = state.nspawn.poll()
    if code is not None:
        raise BootError(f"systemd-nspawn exited with {code}\n{_console_tail(state)}")


def _sleep_or_fail(state: _Machine, deadline: float, why: str) -> None:
    if time.monotonic() >= deadline:
        raise BootError(f"container {state.machine}: {why}\n{_console_tail(state)}")
    time.sleep(POLL_INTERVAL_S)


def _console_tail(state: _Machine) -> str:
    try:
        text = state.console_log.read_text(errors="replace")
    except OSError as exc:
        return f"(no console log: {exc})"
    return "--- console (last lines) ---\n" + _tail(_strip_ansi(text), CONSOLE_TAIL_LINES)


def _teardown(state: _Machine) -> list[str]:
    """Release everything in reverse order; keep going after a failure and report them all."""
    problems: list[str] = []
    for step in (_stop_container, _unmount_all, _remove_dirs):
        try:
            problems.extend(step(state))
        except Exception as exc:  # a teardown step must never stop the next one
            problems.append(f"{step.__name__}: {exc}")
    return problems


def _stop_container(state: _Machine) -> list[str]:
    """SIGTERM nspawn (it powers the container off cleanly); SIGKILL the container if it hangs."""
    nspawn = state.nspawn
    if nspawn is None:
        return []
    # Note the container's processes now: once nspawn is gone they can no longer be found.
    victims = [(pid, _start_time(pid)) for pid in _children(nspawn.pid)]
    if nspawn.poll() is None:
        nspawn.send_signal(signal.SIGTERM)
        try:
            nspawn.wait(timeout=STOP_TIMEOUT_S if state.booted else UNBOOTED_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            # Killing a PID namespace's init kills everything in it; nspawn then exits by
            # itself and cleans up after the container. Killing nspawn is the last resort.
            victims += [(pid, _start_time(pid)) for pid in _children(nspawn.pid)]
            _kill_all(victims)
            try:
                nspawn.wait(timeout=KILL_WAIT_S)
            except subprocess.TimeoutExpired:
                nspawn.kill()
                nspawn.wait(timeout=KILL_WAIT_S)
    _kill_all(victims)  # a no-op unless nspawn died and left its container behind
    survivors = [pid for pid, started in victims if not _await_gone(pid, started)]
    return [f"container process {pid} survived SIGKILL" for pid in survivors]


def _kill_all(processes: list[tuple[int, str | None]]) -> None:
    for pid, started in processes:
        if started is not None and _start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _unmount_all(state: _Machine) -> list[str]:
    problems: list[str] = []
    for mount_point in reversed(state.mounts):
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode == 0:
            continue
        # Something still holds it busy (a shell cd'ed into it): detach it lazily instead.
        lazy = subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, text=True)
        if lazy.returncode != 0:
            problems.append(f"cannot unmount {mount_point}: {lazy.stderr.strip()}")
    return problems


def _remove_dirs(state: _Machine) -> list[str]:
    if any(_is_mount_point(mount) for mount in state.mounts):
        # Removing files through a live mount would delete them from the overlay; leave it.
        return [f"{state.base_dir} kept because it is still mounted"]
    shutil.rmtree(state.base_dir, ignore_errors=True)
    return [f"cannot remove {state.base_dir}"] if state.base_dir.exists() else []


# --------------------------------------------------------------------------------------------
# Peers: network namespaces joined by veth links
# --------------------------------------------------------------------------------------------

# Documentation prefixes (RFC 5737, RFC 3849): traffic to them can never leave for a real host.
LAB_IPV4_NETWORK = ipaddress.IPv4Network("198.51.100.0/24")
LAB_IPV6_NETWORK = ipaddress.IPv6Network("2001:db8:1::/64")
# Host number of the endpoint; peers get 2, 3, ... in the order they are added.
_ENDPOINT_HOST_NUMBER = 1
_BRIDGE = "br0"
# One echo on a veth in the same machine answers in well under a millisecond; 2 s is the
# classic ping wait and leaves room for a loaded CI runner.
PING_TIMEOUT_S = 2.0
# One ICMP echo on a raw socket (the namespace's root may open one): argv is address, timeout.
# IPv4 raw sockets return the IP header and need our checksum; for ICMPv6 the kernel fills it.
_ICMP_ECHO_SCRIPT = """
import os, socket, struct, sys, time
dst, timeout = sys.argv[1], float(sys.argv[2])
v6 = ":" in dst
family, proto, request, reply = (
    (socket.AF_INET6, socket.IPPROTO_ICMPV6, 128, 129) if v6
    else (socket.AF_INET, socket.IPPROTO_ICMP, 8, 0)
)
ident, payload = os.getpid() & 0xFFFF, b"reflector-harness-echo"
def checksum(data):
    data += b"\\0" * (len(data) % 2)
    total = sum(struct.unpack("!%dH" % (len(data) // 2), data))
    total = (total >> 16) + (total & 0xFFFF)
    return ~(total + (total >> 16)) & 0xFFFF
header = struct.pack("!BBHHH", request, 0, 0, ident, 1)
check = 0 if v6 else checksum(header + payload)
sock = socket.socket(family, socket.SOCK_RAW, proto)
sock.settimeout(timeout)
start = time.monotonic()
sock.sendto(struct.pack("!BBHHH", request, 0, check, ident, 1) + payload, (dst, 0))
while True:
    try:
        data, source = sock.recvfrom(4096)
    except socket.timeout:
        sys.exit("no ICMP echo reply from %s within %s s" % (dst, timeout))
    icmp = data if v6 else data[(data[0] & 0x0F) * 4:]
    kind, _, _, got_ident, _ = struct.unpack("!BBHHH", icmp[:8])
    if kind == reply and got_ident == ident and source[0] == dst:
        print(time.monotonic() - start)
        break
"""
_PEER_IFACE = "eth0"


@dataclass(frozen=True, kw_only=True)
class Netns:
    """One network namespace of the lab and the addresses it owns."""

    name: str
    interface: str  # the interface carrying the addresses below
    ipv4: str
    ipv6: str


class NetnsPair:
    """An endpoint namespace and peer namespaces on one LAN segment.

    The endpoint owns a bridge (`br0`) with 198.51.100.1/24 and 2001:db8:1::1/64; every peer is
    a namespace whose `eth0` is a veth whose other end is a port of that bridge. A LAN rather
    than point-to-point links, so a second peer can share the subnet and test address spoofing
    and allowlists the way a real network would present them.
    """

    def __init__(self, runner: CommandRunner, prefix: str) -> None:
        self.runner = runner
        self.prefix = prefix
        self.endpoint = Netns(
            name=f"{prefix}-ep",
            interface=_BRIDGE,
            ipv4=str(LAB_IPV4_NETWORK[_ENDPOINT_HOST_NUMBER]),
            ipv6=str(LAB_IPV6_NETWORK[_ENDPOINT_HOST_NUMBER]),
        )
        self.peers: list[Netns] = []
        self._created: list[str] = []

    @property
    def peer(self) -> Netns:
        """The first peer (198.51.100.2, 2001:db8:1::2)."""
        return self.peers[0]

    @property
    def namespaces(self) -> list[Netns]:
        return [self.endpoint, *self.peers]

    def create_endpoint(self) -> None:
        ns = self.endpoint
        self._created.append(ns.name)
        self._script(
            f"ip netns add {ns.name}",
            f"ip -n {ns.name} link set lo up",
            # No STP and no forwarding delay: ports forward at once. No multicast snooping:
            # IPv6 neighbour discovery must reach every port from the first packet.
            f"ip -n {ns.name} link add {_BRIDGE} type bridge stp_state 0 forward_delay 0"
            " mcast_snooping 0",
            *_address_commands(ns),
            f"ip -n {ns.name} link set {_BRIDGE} up",
        )

    def add_peer(self, *, ipv4: str | None = None, ipv6: str | None = None) -> Netns:
        """Add a peer namespace on the segment; addresses default to the next host number."""
        number = len(self.peers) + _ENDPOINT_HOST_NUMBER + 1
        ns = Netns(
            name=f"{self.prefix}-p{number}",
            interface=_PEER_IFACE,
            ipv4=str(ipaddress.IPv4Address(ipv4 or LAB_IPV4_NETWORK[number])),
            ipv6=str(ipaddress.IPv6Address(ipv6 or LAB_IPV6_NETWORK[number])),
        )
        port = f"vp{number}"
        if len(port) > _IFNAMSIZ_MAX:
            raise ValueError(f"too many peers for interface names: {port}")
        self._created.append(ns.name)
        ep = self.endpoint.name
        self._script(
            f"ip netns add {ns.name}",
            f"ip -n {ns.name} link set lo up",
            f"ip -n {ep} link add {port} type veth peer name {_PEER_IFACE} netns {ns.name}",
            f"ip -n {ep} link set {port} master {_BRIDGE}",
            f"ip -n {ep} link set {port} up",
            *_address_commands(ns),
            f"ip -n {ns.name} link set {_PEER_IFACE} up",
        )
        self.peers.append(ns)
        return ns

    def argv_in(self, ns: Netns, cmd: Command, *, user: str | None = None) -> list[str]:
        """The argv that runs `cmd` in namespace `ns`, dropping to `user` after entering it."""
        return ["ip", "netns", "exec", ns.name, *user_argv(cmd, user)]

    def run_in(
        self,
        ns: Netns,
        cmd: Command,
        *,
        user: str | None = None,
        check: bool = True,
        timeout: float = COMMAND_TIMEOUT_S,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside namespace `ns` and wait for it."""
        argv = self.argv_in(ns, cmd, user=user)
        result = self.runner.run(argv, check=check, timeout=timeout, input_text=input_text)
        return subprocess.CompletedProcess(cmd, result.returncode, result.stdout, result.stderr)

    def popen_in(
        self,
        ns: Netns,
        cmd: Command,
        *,
        user: str | None = None,
        stdout: int | IO[Any] | None = subprocess.PIPE,
        stderr: int | IO[Any] | None = subprocess.PIPE,
    ) -> subprocess.Popen[str]:
        """Start `cmd` inside namespace `ns` (a server, say); stop it with `stop_process`."""
        return self.runner.popen(self.argv_in(ns, cmd, user=user), stdout=stdout, stderr=stderr)

    def ping(self, source: Netns, destination: str, *, timeout: float = PING_TIMEOUT_S) -> float:
        """Send one ICMP echo from namespace `source` to `destination`; return the RTT in s.

        Raises CommandError when no reply comes. Done with a few lines of Python on a raw
        socket, because the build machines have no `ping` binary.
        """
        address = str(ipaddress.ip_address(destination))
        cmd = ["python3", "-c", _ICMP_ECHO_SCRIPT, address, str(timeout)]
        result = self.run_in(source, cmd, timeout=timeout + COMMAND_TIMEOUT_S)
        return float(result.stdout.strip())

    def delete(self) -> list[str]:
        """Kill what still runs in the namespaces and delete them; return what is left over."""
        lines = []
        for name in reversed(self._created):
            lines.append(f"for p in $(ip netns pids {name} 2>/dev/null); do kill -9 $p; done")
            lines.append(f"ip netns del {name}")
        self.runner.run("\n".join(lines) or "true", check=False)
        listed = self.runner.run(["ip", "netns", "list"], check=False).stdout
        present = {line.split()[0] for line in listed.splitlines() if line.strip()}
        leftovers = [name for name in self._created if name in present]
        self._created = leftovers
        return [f"network namespace {name} not deleted" for name in leftovers]

    def _script(self, *commands: str) -> None:
        self.runner.run(["/bin/sh", "-ec", "\n".join(commands)])


def _address_commands(ns: Netns) -> list[str]:
    # nodad: an address still in duplicate address detection is unusable for ~2 s; tests
    # would race it. The lab's addresses are unique by construction.
    v4 = f"{ns.ipv4}/{LAB_IPV4_NETWORK.prefixlen}"
    v6 = f"{ns.ipv6}/{LAB_IPV6_NETWORK.prefixlen}"
    return [
        f"ip -n {ns.name} addr add {shlex.quote(v4)} dev {ns.interface}",
        f"ip -n {ns.name} addr add {shlex.quote(v6)} dev {ns.interface} nodad",
    ]


@contextmanager
def netns_pair(runner: CommandRunner | None = None, *, name: str = "rfl") -> Iterator[NetnsPair]:
    """An endpoint and one peer namespace (more with `add_peer`), always deleted afterwards.

    `runner` says where: None for this machine, or a `SystemdHost` to build them inside a
    container (the same ip commands run there).
    """
    pair = NetnsPair(runner or HostRunner(), unique_name(name))
    failed = False
    try:
        pair.create_endpoint()
        pair.add_peer()
        yield pair
    except BaseException:
        failed = True
        raise
    finally:
        problems = pair.delete()
        if problems and not failed:
            raise TeardownError("; ".join(problems))


# --------------------------------------------------------------------------------------------
# Small process and /proc helpers
# --------------------------------------------------------------------------------------------


def _check_call(argv: list[str]) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise CommandError(result.returncode, argv, result.stdout, result.stderr)


def _signal_group(pgid: int, signum: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signum)


def _kill_group(pgid: int) -> None:
    _signal_group(pgid, signal.SIGKILL)


def _children(pid: int) -> list[int]:
    children: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            children.extend(int(child) for child in task.read_text().split())
        except OSError:
            continue
    return children


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str | None:
    """Field 22 of /proc/PID/stat: with the PID, it identifies a process even if PIDs wrap.

    None when the process is gone or a zombie (dead; its parent may never reap it, because the
    machine's PID 1 is not necessarily an init that reaps orphans).
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it follow the last ')'.
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] in {"Z", "X"} else fields[19]


def _await_gone(pid: int, start_time: str | None) -> bool:
    deadline = time.monotonic() + KILL_WAIT_S
    while start_time is not None and _start_time(pid) == start_time:
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL_S)
    return True


def _is_mount_point(path: Path) -> bool:
    target = str(path)
    with open("/proc/self/mounts") as mounts:
        return any(line.split()[1] == target for line in mounts)


def _tail(text: str, lines: int) -> str:
    return "\n".join(text.splitlines()[-lines:])


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)


# Debian's interpreter: world-executable, the same minor version, and Debian's `wheel` package.
SYSTEM_PYTHON = "/usr/bin/python3"
# Building and installing the wheel offline takes about 3 s; two minutes means it is stuck.
INSTALL_TIMEOUT_S = 120.0


def install_package(host: SystemdHost, venv: str = "/opt/reflector") -> None:
    """Install the repository's package into `venv` inside the container, offline.

    Debian's python3 (world-executable, unlike a per-user pyenv build) makes the venv; a .pth
    line points it at the test run's own site-packages for the dependencies, pip and
    setuptools, so the versions are exactly the ones the unit tests ran with.
    """
    version = host.run([SYSTEM_PYTHON, "-c", "import sys; print(*sys.version_info[:2])"])
    ours = f"{sys.version_info.major} {sys.version_info.minor}"
    assert version.stdout.strip() == ours, (
        f"{SYSTEM_PYTHON} is Python {version.stdout.strip()}, the test venv {ours}: compiled"
        " dependencies would not load"
    )
    # No pip of its own (ensurepip alone takes 7 s): the test run's pip and setuptools build
    # the package, with Debian's `wheel` from the system site-packages.
    # The container overlays this machine's /: state someone left on the host must not leak in.
    host.run(["rm", "-rf", "/var/lib/reflector", "/etc/reflector", venv])
    host.run([SYSTEM_PYTHON, "-m", "venv", "--without-pip", "--system-site-packages", venv])
    site_packages = host.run(
        [f"{venv}/bin/python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]
    ).stdout.strip()
    # A .pth line puts the test run's own dependencies on the path: offline, same versions.
    dependency_dirs = dict.fromkeys(sysconfig.get_paths()[key] for key in ("purelib", "platlib"))
    host.write_file(f"{site_packages}/reflector-test-deps.pth", "\n".join(dependency_dirs) + "\n")
    host.run(
        "PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1"
        f" {venv}/bin/python -m pip install --quiet --no-index --no-deps --no-build-isolation"
        f" {REPO_ROOT}",
        timeout=INSTALL_TIMEOUT_S,
    )
