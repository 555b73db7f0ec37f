"""The engines and holes of running tests: the I/O shell behind both `EngineHost`s.

The helper (root, systemd scopes) and the local fallback (no systemd: rlimits and a timer) share
everything but the launch: the same `HelperPolicy` decides, the same fixed command lines run,
the same pipes carry the engine's output to the parent, the same exit bookkeeping feeds the
audit trail. A `Launcher` is the one part that differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Protocol

from reflector.config import Config
from reflector.firewall import FirewallError, NftFirewall
from reflector.privsep.protocol import (
    ENGINE_KINDS,
    MAX_MESSAGE_LEN,
    CloseHole,
    EngineStarted,
    EngineStopped,
    FirewallReady,
    HelperPolicy,
    HoleClosed,
    HoleCounted,
    HoleOpened,
    OpenHole,
    PrepareFirewall,
    ReadHole,
    Refused,
    StartEngine,
    StopEngine,
    StoppedBy,
)
from reflector.privsep.scope import EngineCommand, engine_command

__all__ = [
    "STARTUP_TIMEOUT_S",
    "Engine",
    "EngineSupervisor",
    "Firewall",
    "Launcher",
    "bound_sockets",
    "load_firewall",
]

_log = logging.getLogger(__name__)

# iperf3 binds in milliseconds, the Python echo in a few hundred; systemd-run adds a D-Bus round
# trip. Five seconds still covers a cold start on a small VPS.
STARTUP_TIMEOUT_S: Final = 5.0
# How often start() looks for the engine's socket while it starts.
READY_POLL_S: Final = 0.02
# After a stop, the engine must be gone within systemd's stop timeout plus this margin; then it
# is SIGKILLed directly (asyncio has not reported its exit, so its pid is not reused yet).
STOP_MARGIN_S: Final = 3.0
# An engine that ended is kept for its stop_engine (the exit status) this long at most, in
# count: a parent that never asks cannot grow the table.
MAX_EXITED_KEPT: Final = 64
# An exit within this much of RuntimeMaxSec= is systemd's (or the local timer's) doing.
RUNTIME_LIMIT_SLACK_S: Final = 1.0
# asyncio tells the watch task of an exit a few loop turns after the status is known.
WATCH_WAIT_S: Final = 1.0


@dataclass
class Engine:
    """One running (or ended, not yet collected) engine."""

    request: StartEngine
    proc: asyncio.subprocess.Process
    unit: str
    runtime_max_s: int
    protections: tuple[str, ...]
    started: float
    uid: int  # the engine's user: its sockets show who bound them
    ended: float | None = None
    stop_requested_at: float | None = None
    ip_counters: tuple[int | None, int | None] = (None, None)
    extra: dict[str, Any] = field(default_factory=dict)  # the launcher's own state (timers)
    watcher: asyncio.Task[None] | None = None  # records the end; kept so it is not collected

    @property
    def running(self) -> bool:
        return self.proc.returncode is None


class Launcher(Protocol):
    """Starts an engine's command under the host's protections, and stops it."""

    name: str

    async def launch(
        self, req: StartEngine, command: EngineCommand, *, stdin: int, stdout: int, stderr: int
    ) -> Engine:
        """Spawn `command` for `req` with the given fds; raise OSError/ValueError on failure."""
        ...

    async def stop(self, engine: Engine) -> None:
        """Ask the engine to end now (SIGTERM, then SIGKILL after a short grace)."""
        ...

    async def read_counters(self, engine: Engine) -> tuple[int | None, int | None]:
        """Kernel IP byte counts (ingress, egress) for the engine, None where unknown."""
        ...

    def ended(self, engine: Engine) -> None:
        """The engine exited: release anything held for it (timers)."""
        ...


class Firewall(Protocol):
    """The holes side of `reflector.firewall.Firewall`, as the helper uses it (blocking calls)."""

    def open_hole(self, test_id: str, peer: str, proto: str, port: int, ttl_s: int) -> None: ...

    def close_hole(self, test_id: str) -> Any: ...  # HoleCounters | None

    def hole_counters(self, test_id: str) -> Any: ...  # HoleCounters | None


def load_firewall(config: Config) -> Firewall | str:
    """Reflector's nftables table, installed afresh (stale holes dropped), or why not.

    Called once, when the helper starts in direct mode or at the first hole: a table left by a
    previous run is resynchronised before anything is opened.
    """
    port_range = (config.network.data_port_range_start, config.network.data_port_range_end)
    try:
        firewall = NftFirewall(port_range)
        firewall.ensure_table(port_range)
    except (FirewallError, ValueError) as exc:  # no libnftables, no permission: stay closed
        return f"nftables unavailable: {' '.join(str(exc).split()) or type(exc).__name__}"
    return firewall


class EngineSupervisor:
    """Decides (via `HelperPolicy`) and acts on the helper's requests; one per helper or host."""

    def __init__(
        self,
        config: Config,
        launcher: Launcher,
        *,
        firewall: Firewall | str | None = None,
        python: str = sys.executable,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.policy = HelperPolicy.from_config(config)
        self.launcher = launcher
        self.python = python
        self.engines: dict[str, Engine] = {}
        self.holes: dict[str, list[OpenHole]] = {}
        # When each test's holes expire in the kernel (monotonic): a hole whose parent died is
        # gone from nftables by then, so it must stop counting against capacity too.
        self._hole_expiry: dict[str, float] = {}
        self._firewall = firewall
        self._clock = clock
        self._start_lock = asyncio.Lock()

    # --- engines

    def running_by_kind(self) -> dict[str, int]:
        counts: dict[str, int] = dict.fromkeys(ENGINE_KINDS, 0)
        for engine in self.engines.values():
            if engine.running:
                counts[engine.request.kind] += 1
        return counts

    async def start(self, req: StartEngine) -> tuple[EngineStarted | Refused, list[int]]:
        """Start `req`'s engine; on success also the read ends of its stdout and stderr.

        The caller owns the returned fds (send them, then close them).
        """
        async with self._start_lock:  # check-then-launch must not interleave
            refusal = self.policy.check(req, running=self.running_by_kind())
            if refusal is None and req.test_id in self.engines:
                refusal = Refused(code="exists", message=f"test {req.test_id} has an engine")
            if refusal is not None:
                return refusal, []
            return await self._launch(req)

    async def _launch(self, req: StartEngine) -> tuple[EngineStarted | Refused, list[int]]:
        try:
            command = engine_command(
                req,
                iperf3=self.config.iperf3,
                python=self.python,
                max_udp_echo_pps=self.config.quotas.max_udp_echo_pps,
            )
        except ValueError as exc:
            return Refused(code="out_of_range", message=_short(str(exc))), []
        pipes = [os.pipe() for _ in range(3)]  # stdin, stdout, stderr
        (in_r, in_w), (out_r, out_w), (err_r, err_w) = pipes
        try:
            engine = await self.launcher.launch(
                req, command, stdin=in_r, stdout=out_w, stderr=err_w
            )
        except (OSError, ValueError) as exc:
            for fd in (in_r, in_w, out_r, out_w, err_r, err_w):
                os.close(fd)
            _log.warning("engine for test %s did not start: %s", req.test_id, exc)
            return Refused(code="engine_failed", message=_short(f"cannot start: {exc}")), []
        for fd in (in_r, out_w, err_w):
            os.close(fd)
        try:
            os.write(in_w, command.stdin)  # < 100 bytes: never blocks on a fresh pipe
        except OSError:
            pass  # the engine already exited; its stderr says why
        finally:
            os.close(in_w)
        self.engines[req.test_id] = engine
        engine.watcher = asyncio.get_running_loop().create_task(self._watch(engine))
        ready = await self._wait_ready(engine)
        if not ready and engine.running:
            await self.launcher.stop(engine)
        _log.info(
            "engine %s for test %s: pid %d, unit %s, ready %s, protections %s",
            req.kind,
            req.test_id,
            engine.proc.pid,
            engine.unit,
            ready,
            ",".join(engine.protections),
        )
        started = EngineStarted(
            test_id=req.test_id,
            pid=engine.proc.pid,
            unit=engine.unit,
            ready=ready,
            protections=engine.protections,
        )
        return started, [out_r, err_r]

    async def _watch(self, engine: Engine) -> None:
        await engine.proc.wait()
        engine.ended = self._clock()
        self.launcher.ended(engine)
        self._trim_exited()

    def _trim_exited(self) -> None:
        exited = [e for e in self.engines.values() if not e.running]
        for engine in sorted(exited, key=lambda e: e.ended or 0.0)[:-MAX_EXITED_KEPT]:
            del self.engines[engine.request.test_id]

    async def _wait_ready(self, engine: Engine) -> bool:
        deadline = self._clock() + STARTUP_TIMEOUT_S
        while self._clock() < deadline and engine.running:
            if _has_socket(engine):
                return True
            await asyncio.sleep(READY_POLL_S)
        return False

    async def stop(self, req: StopEngine) -> EngineStopped | Refused:
        engine = self.engines.get(req.test_id)
        if engine is None:
            return Refused(code="unknown_test", message=f"no engine for test {req.test_id}")
        if engine.running and child_is_exiting(engine.proc.pid):
            # It is ending by itself (the caller saw EOF): let it, so it is not counted as ours.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(engine.proc.wait(), timeout=STOP_MARGIN_S)
        if engine.running:
            engine.ip_counters = await self.launcher.read_counters(engine)
            engine.stop_requested_at = self._clock()
            await self.launcher.stop(engine)
            await self._reap(engine)
        else:
            engine.ip_counters = await self.launcher.read_counters(engine)
        await self._watched(engine)
        self.engines.pop(req.test_id, None)  # a second stop may have come meanwhile
        ended = engine.ended if engine.ended is not None else self._clock()
        runtime_ms = max(0, round((ended - engine.started) * 1000))
        code = engine.proc.returncode
        assert code is not None
        return EngineStopped(
            test_id=req.test_id,
            exit_code=code,
            runtime_ms=runtime_ms,
            stopped_by=_stopped_by(engine, runtime_ms),
            ip_ingress_bytes=engine.ip_counters[0],
            ip_egress_bytes=engine.ip_counters[1],
        )

    @staticmethod
    async def _watched(engine: Engine) -> None:
        """Wait until _watch has recorded the end: asyncio tells it a few loop turns after the
        exit status is known, and the runtime (so `stopped_by`) is measured to that moment."""
        if engine.watcher is not None:
            await asyncio.wait({engine.watcher}, timeout=WATCH_WAIT_S)  # never raises or cancels

    async def _reap(self, engine: Engine) -> None:
        try:
            await asyncio.wait_for(engine.proc.wait(), timeout=STOP_MARGIN_S + 2.0)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(engine.proc.pid, signal.SIGKILL)
            await engine.proc.wait()

    def prepare_firewall(self) -> None:
        """In direct mode, install the table now (at start-up), not at the first hole."""
        if self.policy.mode == "direct_ephemeral" and self._firewall is None:
            self._firewall = load_firewall(self.config)
            if isinstance(self._firewall, str):
                _log.warning("direct mode without holes: %s", self._firewall)

    async def stop_all(self) -> None:
        """Stop every engine and close every hole (shutdown)."""
        for test_id in list(self.engines):
            await self.stop(StopEngine(test_id=test_id))
        for test_id in list(self.holes):
            await self.close_hole(CloseHole(test_id=test_id))

    # --- holes

    async def prepare(self, req: PrepareFirewall) -> FirewallReady | Refused:
        """Install Reflector's table if it is not in place, or say why it cannot be."""
        refusal = self.policy.check(req, running=self.running_by_kind())
        if refusal is not None:
            return refusal
        firewall = self._firewall_or_refusal()
        return firewall if isinstance(firewall, Refused) else FirewallReady()

    def _firewall_or_refusal(self) -> Firewall | Refused:
        if self._firewall is None:
            self._firewall = load_firewall(self.config)
        if isinstance(self._firewall, str):
            return Refused(code="firewall_unavailable", message=_short(self._firewall))
        return self._firewall

    async def open_hole(self, req: OpenHole) -> HoleOpened | Refused:
        refusal = self.policy.check(req, running=self.running_by_kind())
        if refusal is not None:
            return refusal
        self._forget_expired_holes()
        held = self.holes.get(req.test_id, [])
        if any(h.proto == req.proto for h in held):
            return Refused(code="exists", message=f"test {req.test_id} has a {req.proto} hole")
        # Each test holds at most one hole per protocol (iperf3's UDP tests need both).
        if len(self.holes) >= self.policy.max_engines_per_kind and not held:
            return Refused(code="busy", message="as many tests hold holes as may run at once")
        firewall = self._firewall_or_refusal()
        if isinstance(firewall, Refused):
            return firewall
        try:
            await asyncio.to_thread(
                firewall.open_hole, req.test_id, req.peer_addr, req.proto, req.port, req.ttl_s
            )
        except ValueError as exc:  # the firewall's own checks (e.g. held by another test)
            return Refused(code="out_of_range", message=_short(str(exc)))
        except Exception as exc:  # any failure means: nothing was opened
            _log.warning("hole for test %s not opened: %s", req.test_id, exc)
            return Refused(code="firewall_unavailable", message=_short(str(exc)))
        self.holes.setdefault(req.test_id, []).append(req)
        expiry = time.monotonic() + req.ttl_s
        self._hole_expiry[req.test_id] = max(expiry, self._hole_expiry.get(req.test_id, 0.0))
        return HoleOpened(test_id=req.test_id)

    def _forget_expired_holes(self) -> None:
        now = time.monotonic()
        for test_id, expiry in list(self._hole_expiry.items()):
            if now >= expiry:
                self.holes.pop(test_id, None)
                del self._hole_expiry[test_id]

    async def close_hole(self, req: CloseHole) -> HoleClosed | Refused:
        counts = await self._count_holes(req.test_id, "closed", lambda fw, t: fw.close_hole(t))
        if isinstance(counts, Refused):
            return counts
        del self.holes[req.test_id]
        self._hole_expiry.pop(req.test_id, None)
        return HoleClosed(test_id=req.test_id, **counts)

    async def read_hole(self, req: ReadHole) -> HoleCounted | Refused:
        """The counters of a test's open holes; nothing changes."""
        self._forget_expired_holes()
        counts = await self._count_holes(req.test_id, "read", lambda fw, t: fw.hole_counters(t))
        if isinstance(counts, Refused):
            return counts
        return HoleCounted(test_id=req.test_id, **counts)

    async def _count_holes(
        self, test_id: str, done: str, act: Callable[[Firewall, str], Any]
    ) -> dict[str, int | None] | Refused:
        """Close or read (`act`) a test's holes: the counts they report, or why not."""
        if test_id not in self.holes:
            return Refused(code="unknown_test", message=f"no hole for test {test_id}")
        firewall = self._firewall_or_refusal()
        if isinstance(firewall, Refused):
            return firewall
        try:
            counters = await asyncio.to_thread(act, firewall, test_id)
        except Exception as exc:  # reported; the kernel's timeout still closes the hole
            _log.warning("holes of test %s not %s: %s", test_id, done, exc)
            return Refused(code="firewall_unavailable", message=_short(str(exc)))
        return _hole_count(counters)


def _hole_count(counters: object) -> dict[str, int | None]:
    """The fields of a hole_closed/hole_counted response from the firewall's HoleCounters."""
    return {
        "packets": _count(getattr(counters, "packets", None)),
        "bytes": _count(getattr(counters, "bytes", None)),
        "expired": _count(getattr(counters, "expired", None)),
    }


def _stopped_by(engine: Engine, runtime_ms: int) -> StoppedBy:
    """Who ended the engine: its RuntimeMaxSec= (or the local timer), our stop, or itself.

    Anything that ended at its runtime limit was ended by it, whatever its code (iperf3 catches
    SIGTERM and exits 1) and even if a stop arrived at the same moment (the caller saw EOF
    before the exit was reaped). No engine ends on its own that late: iperf3's idle timeout is
    30 s beyond the test.
    """
    limit = engine.runtime_max_s - RUNTIME_LIMIT_SLACK_S
    if engine.stop_requested_at is not None:
        return "runtime_limit" if engine.stop_requested_at - engine.started >= limit else "stop"
    return "runtime_limit" if runtime_ms >= limit * 1000 else "exit"


# /proc/net/tcp's state column for a listening socket.
_TCP_LISTEN: Final = "0A"


@dataclass(frozen=True)
class BoundSocket:
    """One row of a /proc/net/{tcp,tcp6,udp,udp6} table: who holds which local port."""

    port: int
    uid: int
    inode: int


def bound_sockets(table: str, *, listening_only: bool) -> list[BoundSocket]:
    """The sockets of a /proc/net/{tcp,tcp6,udp,udp6} table (TCP LISTEN only, if asked)."""
    found: list[BoundSocket] = []
    for line in table.splitlines()[1:]:
        cols = line.split()
        if len(cols) < 10 or ":" not in cols[1]:
            continue
        if listening_only and cols[3] != _TCP_LISTEN:
            continue
        try:
            port = int(cols[1].rsplit(":", 1)[1], 16)
            found.append(BoundSocket(port=port, uid=int(cols[7]), inode=int(cols[9])))
        except ValueError:
            continue
    return found


def _has_socket(engine: Engine) -> bool:
    """Whether the engine itself has bound its port (TCP LISTEN for iperf3).

    Read from the kernel's socket tables, never by connecting: a probe connection would be the
    one client that `iperf3 --one-off` serves. /proc/net is world-readable; the socket must be
    the engine user's, and where we may read the engine's descriptors (our own uid: the local
    fallback) one of them, so another program of that uid on the port is not taken for it. The
    helper may not (no CAP_SYS_PTRACE), and its engine user runs nothing but engines.
    """
    req = engine.request
    proto = "tcp" if req.kind == "iperf3" else "udp"
    inodes: set[int] = set()
    for suffix in ("", "6"):
        try:
            with open(f"/proc/net/{proto}{suffix}", encoding="ascii") as fh:
                table = fh.read()
        except OSError:
            continue
        for sock in bound_sockets(table, listening_only=proto == "tcp"):
            if sock.port == req.port and sock.uid == engine.uid:
                inodes.add(sock.inode)
    if not inodes:
        return False
    held = socket_inodes(engine.proc.pid)
    return held is None or not inodes.isdisjoint(held)


def socket_inodes(pid: int) -> set[int] | None:
    """The inodes of the sockets `pid` holds; None if we may not look (another uid)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except PermissionError:
        return None
    except OSError:
        return set()  # gone
    held: set[int] = set()
    for name in names:
        with contextlib.suppress(OSError):
            target = os.readlink(f"{fd_dir}/{name}")
            if target.startswith("socket:[") and target.endswith("]"):
                held.add(int(target[8:-1]))
    return held


# The kernel's flag for a task inside exit(); it is set before the task closes its files.
_PF_EXITING: Final = 0x4


def child_is_exiting(pid: int) -> bool:
    """Whether our child `pid` is ending by itself, or has ended and is not yet reported.

    A caller that saw EOF on the engine's stdout may ask us to stop it before the exit shows:
    the kernel closes a task's files before it turns it into a zombie, and asyncio's watcher
    thread reaps a child a moment before the event loop hears of it. So: a zombie (waitid with
    WNOWAIT, which does not reap), a child reaped already (ChildProcessError), or a task inside
    exit() (PF_EXITING, set before its files close). /proc is read for that flag only, so a
    /proc that hides the engine user's processes (hidepid) reads as "running".
    """
    try:
        if os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None:
            return True
    except ChildProcessError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat_says_exiting(stat)


def stat_says_exiting(stat: str) -> bool:
    """Read /proc/PID/stat's state (field 3) and flags (field 9) past the command's ")"."""
    fields = stat.rpartition(")")[2].split()
    if len(fields) < 7 or not fields[6].isdigit():
        return False
    return fields[0] in ("Z", "X") or bool(int(fields[6]) & _PF_EXITING)


def _count(value: object) -> int | None:
    return value if isinstance(value, int) and value >= 0 else None


def _short(text: str) -> str:
    line = " ".join(text.split())
    return line[:MAX_MESSAGE_LEN]
