"""The documented fallback without systemd: engines as plain child processes, rlimits and a timer.

For a developer's laptop, `make demo` and CI outside a container. The same `HelperPolicy`
checks every request and the same fixed command lines run, but the protections are weaker
than a scope's, and the log and `reflector status` say so:

- RLIMIT_AS from limits.memory_max: address space, not resident memory (stricter than
  MemoryMax=: an engine that maps more fails its allocation instead of being reclaimed).
- RLIMIT_NPROC from limits.tasks_max: the kernel counts *all* tasks of the user, so the limit is
  the user's current task count plus tasks_max. Root is exempt (CAP_SYS_RESOURCE).
- RLIMIT_CPU at duration + runtime_grace_sec: SIGXCPU (fatal) once the engine has used that
  much CPU time, then SIGKILL a second later.
- A timer at duration + runtime_grace_sec sends SIGTERM to the engine's process group, then
  SIGKILL after a short grace: the RuntimeMaxSec= of this mode.
- PR_SET_PDEATHSIG: the kernel SIGKILLs the engine when Reflector dies (kill -9, a crash),
  since the timer above dies with it. A scope needs no such thing: systemd outlives us.
- No separate uid, no IP allowlist, no kernel byte counters; holes only if we are root and
  `reflector.firewall` exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import resource
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import psutil

from reflector.config import Config
from reflector.privsep.protocol import (
    CloseHole,
    EngineExit,
    EngineHandle,
    EngineKind,
    EngineLimits,
    EngineStarted,
    HoleTotals,
    OpenHole,
    PrepareFirewall,
    ReadHole,
    Refused,
    StartEngine,
    StopEngine,
    decode_request,
    to_wire,
)
from reflector.privsep.scope import ENGINE_ENV, EngineCommand, runtime_max_s
from reflector.privsep.supervisor import Engine, EngineSupervisor, Firewall

__all__ = [
    "LOCAL_PROTECTIONS",
    "TERM_GRACE_S",
    "LocalEngineHost",
    "LocalLauncher",
    "Rlimits",
    "rlimits_for",
    "spawn_limited",
]

# iperf3 answers SIGTERM by writing its JSON and exiting at once; 1 s is generous.
TERM_GRACE_S: Final = 1.0
# RLIMIT_CPU's hard limit is this far above the soft one: SIGXCPU first, then SIGKILL.
CPU_HARD_MARGIN_S: Final = 1
LOCAL_PROTECTIONS: Final = (
    "rlimit_as",
    "rlimit_nproc",
    "rlimit_cpu",
    "kill_timer",
    "parent_death_kill",
)
# prctl(2) option: the signal the child gets when the thread that forked it dies.
PR_SET_PDEATHSIG: Final = 1


@dataclass(frozen=True, kw_only=True)
class Rlimits:
    """The rlimits of one engine (soft values; CPU's hard limit is a second higher)."""

    address_space_bytes: int
    nproc: int
    cpu_seconds: int


def rlimits_for(
    limits: EngineLimits, *, duration_s: int, grace_s: int, user_tasks_now: int
) -> Rlimits:
    """The rlimits that stand in for a scope's MemoryMax=, TasksMax= and RuntimeMaxSec=."""
    return Rlimits(
        address_space_bytes=limits.memory_max_bytes,
        nproc=user_tasks_now + limits.tasks_max,
        cpu_seconds=runtime_max_s(duration_s, grace_s),
    )


def user_task_count(uid: int) -> int:
    """Threads of every process of `uid` (what the kernel compares with RLIMIT_NPROC)."""
    total = 0
    for proc in psutil.process_iter(["uids", "num_threads"]):
        info = proc.info
        uids = info.get("uids")
        if uids is not None and uids.real == uid:
            total += int(info.get("num_threads") or 1)
    return total


def _set_rlimit(kind: int, soft: int, hard: int) -> None:
    # Never above the current hard limit: raising it needs CAP_SYS_RESOURCE, and a lower
    # limit someone already set is stricter than ours anyway.
    _, current = resource.getrlimit(kind)
    if current != resource.RLIM_INFINITY:
        soft, hard = min(soft, current), min(hard, current)
    resource.setrlimit(kind, (soft, hard))


def _die_with_parent(parent_pid: int) -> None:
    """In the child: be SIGKILLed when the parent dies; exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
        os._exit(126)  # no protection, no engine (fail closed)
    if os.getppid() != parent_pid:  # died between fork and prctl: nobody would stop us
        os._exit(126)


def _apply_rlimits(limits: Rlimits) -> Callable[[], None]:
    parent_pid = os.getpid()

    def apply() -> None:  # runs in the child between fork and exec
        _die_with_parent(parent_pid)
        size = limits.address_space_bytes
        _set_rlimit(resource.RLIMIT_AS, size, size)
        _set_rlimit(resource.RLIMIT_NPROC, limits.nproc, limits.nproc)
        cpu = limits.cpu_seconds
        _set_rlimit(resource.RLIMIT_CPU, cpu, cpu + CPU_HARD_MARGIN_S)

    return apply


async def spawn_limited(
    argv: tuple[str, ...] | list[str],
    limits: Rlimits,
    *,
    kill_after_s: float,
    stdin: int,
    stdout: int,
    stderr: int,
) -> tuple[asyncio.subprocess.Process, asyncio.TimerHandle]:
    """Start argv in its own process group under `limits`; a timer stops it at kill_after_s.

    Returns the process and the timer (cancel it once the process has been reaped).
    """
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=stdin,
        stdout=stdout,
        stderr=stderr,
        env=dict(ENGINE_ENV),
        cwd="/",
        start_new_session=True,  # own process group: the kill reaches all of it
        preexec_fn=_apply_rlimits(limits),
    )
    loop = asyncio.get_running_loop()
    timer = loop.call_later(kill_after_s, terminate_group, proc)
    return proc, timer


def terminate_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the process group, SIGKILL it after TERM_GRACE_S if the leader still runs.

    Only while asyncio has not reported the leader's exit: its pid is then ours, or reaped a
    moment ago by asyncio's watcher thread, far too recently for the group id to have been
    reused (that needs the whole pid space to wrap).
    """
    if proc.returncode is not None:
        return
    _signal_group(proc, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    loop.call_later(TERM_GRACE_S, _signal_group, proc, signal.SIGKILL)


def _signal_group(proc: asyncio.subprocess.Process, sig: signal.Signals) -> None:
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


class LocalLauncher:
    """Launcher for the fallback: rlimits and a kill timer instead of a transient scope."""

    name = "local"

    def __init__(self, grace_s: int) -> None:
        self.grace_s = grace_s

    async def launch(
        self, req: StartEngine, command: EngineCommand, *, stdin: int, stdout: int, stderr: int
    ) -> Engine:
        runtime = runtime_max_s(req.duration_s, self.grace_s)
        limits = rlimits_for(
            req.limits,
            duration_s=req.duration_s,
            grace_s=self.grace_s,
            user_tasks_now=user_task_count(os.getuid()),
        )
        proc, timer = await spawn_limited(
            command.argv, limits, kill_after_s=runtime, stdin=stdin, stdout=stdout, stderr=stderr
        )
        return Engine(
            request=req,
            proc=proc,
            unit="",
            runtime_max_s=runtime,
            protections=LOCAL_PROTECTIONS,
            started=time.monotonic(),
            uid=os.getuid(),
            extra={"timer": timer},
        )

    async def stop(self, engine: Engine) -> None:
        terminate_group(engine.proc)

    async def read_counters(self, engine: Engine) -> tuple[int | None, int | None]:
        return None, None  # no kernel byte counts without a cgroup

    def ended(self, engine: Engine) -> None:
        timer = engine.extra.get("timer")
        if isinstance(timer, asyncio.TimerHandle):
            timer.cancel()


def _local_firewall(config: Config) -> Firewall | str | None:
    """None: load the firewall at the first hole (we are root); a reason: holes are refused."""
    if os.geteuid() != 0:
        return "holes need root and Reflector runs unprivileged without the helper"
    return None


class LocalEngineHost:
    """`EngineHost` without systemd: the supervisor in-process with `LocalLauncher`."""

    def __init__(self, config: Config, *, python: str = sys.executable) -> None:
        self.name = "local child processes (rlimits and timers; no systemd helper)"
        launcher = LocalLauncher(config.limits.runtime_grace_sec)
        self._supervisor = EngineSupervisor(
            config, launcher, firewall=_local_firewall(config), python=python
        )
        # Direct mode: set up Reflector's table now, so a missing nftables shows at start-up
        # (and stale holes of a crashed run are cleared before anything is granted).
        self._supervisor.prepare_firewall()

    async def start_engine(
        self,
        *,
        test_id: str,
        kind: EngineKind,
        port: int,
        duration_s: int,
        bind: str,
        peer: str,
        limits: EngineLimits,
        echo_key: bytes | None = None,
    ) -> EngineHandle:
        request = StartEngine(
            test_id=test_id,
            kind=kind,
            port=port,
            duration_s=duration_s,
            bind=bind,
            peer=peer,
            limits=limits,
            echo_key=echo_key,
        )
        # The same format checks as the helper applies to what arrives on its socket.
        checked = decode_request(to_wire(request))
        assert isinstance(checked, StartEngine)
        response, fds = await self._supervisor.start(checked)
        if isinstance(response, Refused):
            raise response.error()
        assert isinstance(response, EngineStarted)
        return response.handle(stdout_fd=fds[0], stderr_fd=fds[1])

    async def stop_engine(self, test_id: str) -> EngineExit:
        response = await self._supervisor.stop(StopEngine(test_id=test_id))
        if isinstance(response, Refused):
            raise response.error()
        return response.exit()

    async def open_hole(
        self, *, test_id: str, peer_addr: str, proto: str, port: int, ttl_s: int
    ) -> None:
        checked = decode_request(
            {
                "type": "open_hole",
                "test_id": test_id,
                "peer_addr": peer_addr,
                "proto": proto,
                "port": port,
                "ttl_s": ttl_s,
            }
        )
        assert isinstance(checked, OpenHole)
        response = await self._supervisor.open_hole(checked)
        if isinstance(response, Refused):
            raise response.error()

    async def close_hole(self, test_id: str) -> HoleTotals | None:
        response = await self._supervisor.close_hole(CloseHole(test_id=test_id))
        if isinstance(response, Refused):
            raise response.error()
        return response.totals()

    async def read_hole(self, test_id: str) -> HoleTotals | None:
        response = await self._supervisor.read_hole(ReadHole(test_id=test_id))
        if isinstance(response, Refused):
            raise response.error()
        return response.totals()

    async def prepare_firewall(self) -> None:
        response = await self._supervisor.prepare(PrepareFirewall())
        if isinstance(response, Refused):
            raise response.error()

    async def close(self) -> None:
        """Stop every engine and close every hole (at shutdown)."""
        await self._supervisor.stop_all()
