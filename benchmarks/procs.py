"""Processes the benchmark starts, and what it reads about them from /proc.

Every process is started through a `Processes` set and stopped by its own PID (SIGTERM, then
SIGKILL after a grace), never by name: other people's processes on a shared host are not ours.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Final

# A process gets this long to exit on SIGTERM before SIGKILL: every server here exits at once.
STOP_GRACE_S: Final = 5.0
# Waiting for a server's port: a cold start of Python plus imports takes well under this.
PORT_WAIT_S: Final = 10.0
_CLOCK_TICKS: Final = os.sysconf("SC_CLK_TCK")
_PAGE: Final = os.sysconf("SC_PAGE_SIZE")


def progress(text: str) -> None:
    """One line on stderr, so a long run shows where it is (stdout is the table or JSON)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


class Processes:
    """The processes one benchmark started; `stop_all` ends them by PID, newest first."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def start(
        self,
        argv: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        stdout: int | IO[bytes] | None = subprocess.DEVNULL,
        stderr: int | IO[bytes] | None = subprocess.DEVNULL,
        stdin: int | IO[bytes] | None = subprocess.DEVNULL,
    ) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(list(argv), env=env, stdout=stdout, stderr=stderr, stdin=stdin)
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
        for stream in (proc.stdout, proc.stderr, proc.stdin):
            if stream is not None:
                stream.close()
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self) -> None:
        for proc in reversed(list(self._procs)):
            self.stop(proc)

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop_all()


@dataclass(frozen=True, kw_only=True)
class Usage:
    """What the kernel counted for a process (all its threads), at one instant."""

    cpu_s: float
    voluntary_switches: int
    involuntary_switches: int
    rss_bytes: int
    threads: int


def usage(pid: int) -> Usage:
    """CPU time (user + system), context switches summed over threads, and RSS, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    cpu = (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS  # utime, stime: fields 14, 15
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * _PAGE
    voluntary = involuntary = threads = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread may end while we look
            for line in (task / "status").read_text().splitlines():
                if line.startswith("voluntary_ctxt_switches:"):
                    voluntary += int(line.split()[1])
                elif line.startswith("nonvoluntary_ctxt_switches:"):
                    involuntary += int(line.split()[1])
            threads += 1
    return Usage(
        cpu_s=cpu,
        voluntary_switches=voluntary,
        involuntary_switches=involuntary,
        rss_bytes=rss,
        threads=threads,
    )


def cpu_seconds(pid: int) -> float:
    return usage(pid).cpu_s


def free_port(host: str = "127.0.0.1", kind: int = socket.SOCK_STREAM) -> int:
    """A port free right now (the kernel's pick); a tiny race with other users is accepted."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_tcp_port(host: str, port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until something accepts on host:port; fail early if `proc` died."""
    deadline = time.monotonic() + PORT_WAIT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {host}:{port} after {PORT_WAIT_S:g} s")


def wait_udp_bound(port: int, proc: subprocess.Popen[bytes]) -> None:
    """Wait until a UDP socket is bound on `port` (read from /proc/net/udp)."""
    deadline = time.monotonic() + PORT_WAIT_S
    needle = f":{port:04X} "
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode} before binding")
        lines = Path("/proc/net/udp").read_text().splitlines()[1:]
        if any(line.split()[1].endswith(needle.strip()) for line in lines):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing bound UDP port {port} after {PORT_WAIT_S:g} s")


def require_tools(names: Sequence[str]) -> None:
    missing = [n for n in names if shutil.which(n) is None]
    if missing:
        raise SystemExit(f"bench: missing tools: {', '.join(missing)} (apt-get install them)")


def build_c(source: Path, out_dir: Path) -> Path:
    """Compile one of the benchmark's C files with -O2 into `out_dir`."""
    binary = out_dir / source.stem
    subprocess.run(
        ["gcc", "-O2", "-Wall", "-o", str(binary), str(source)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return binary
