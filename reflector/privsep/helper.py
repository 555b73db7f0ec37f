"""The privileged helper: a socket-activated root daemon with six requests and nothing else.

Run by `reflector-privd.service` (`python -m reflector.privsep.helper --config FILE`) on the
listening socket of `reflector-privd.socket` (sd_listen_fds: LISTEN_FDS/LISTEN_PID, fd 3).
Each connection carries one request and one response:

1. SO_PEERCRED names the caller; only the parent's uid (and root) is served, anyone else gets
   `not_permitted` and a log line.
2. One frame, bounded (protocol.MAX_FRAME_BYTES) and read under a timeout, decoded against the
   request table (protocol.REQUESTS), checked for meaning against the helper's OWN reading of
   the config file (protocol.HelperPolicy).
3. The handler acts: an engine starts as `systemd-run --scope --uid=<engine user>` with the caps
   from the config (scope.py), or a hole opens in (is read from, or closes in) Reflector's
   nftables table.
4. The response goes back, with the engine's stdout and stderr read ends beside it (SCM_RIGHTS).

The helper enforces no time limit itself: systemd kills a scope at RuntimeMaxSec=.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import pwd
import signal
import socket
import struct
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Final

from reflector.config import DEFAULT_CONFIG_PATH, Config, load_config
from reflector.errors import ReflectorError
from reflector.privsep.protocol import (
    MAX_FRAME_BYTES,
    CloseHole,
    EngineStarted,
    FrameReader,
    OpenHole,
    PrepareFirewall,
    ProtocolError,
    ReadHole,
    Refused,
    Request,
    Response,
    StartEngine,
    StopEngine,
    decode_request,
    encode_frame,
)
from reflector.privsep.scope import (
    ENGINE_ENV,
    SYSTEMD_RUN,
    EngineCommand,
    HostSupport,
    cgroup_limit_files,
    ip_counters_from_journal,
    ip_counters_from_show,
    parse_probe_output,
    probe_argv,
    runtime_max_s,
    scope_argv,
    scope_protections,
    unit_name,
)
from reflector.privsep.supervisor import Engine, EngineSupervisor, Launcher

__all__ = [
    "DEFAULT_ENGINE_USER",
    "DEFAULT_PARENT_USER",
    "SystemdLauncher",
    "main",
    "peer_uid",
    "sd_listen_fds",
    "serve_helper",
]

_log = logging.getLogger("reflector.privsep.helper")

DEFAULT_PARENT_USER: Final = "reflector"
DEFAULT_ENGINE_USER: Final = "reflector-engine"
SYSTEMCTL: Final = "/usr/bin/systemctl"
JOURNALCTL: Final = "/usr/bin/journalctl"
# sd_listen_fds(3): passed descriptors start at 3.
SD_LISTEN_FDS_START: Final = 3
# A caller has this long to send its one request; a stuck or slow caller cannot hold a slot.
REQUEST_TIMEOUT_S: Final = 5.0
# Bound on connections handled at once; the parent makes one request at a time per test.
MAX_CONNECTIONS: Final = 16
# systemctl/journalctl answer in milliseconds; a stop waits for TimeoutStopSec= (2 s).
SYSTEMCTL_TIMEOUT_S: Final = 10.0
# The scope exists once systemd-run has moved itself into it, after one D-Bus round trip.
SCOPE_TIMEOUT_S: Final = 5.0
SCOPE_POLL_S: Final = 0.01
# After an engine's own exit, systemd stops its scope once it hears the cgroup is empty: a few
# milliseconds, up to a second on a busy host. Past this bound, stop_engine answers anyway.
SCOPE_GONE_TIMEOUT_S: Final = 3.0
# journald stores what it has received in milliseconds; a stuck one costs us the counters only.
JOURNAL_SYNC_TIMEOUT_S: Final = 2.0
SCOPE_GONE_POLL_S: Final = 0.02  # each poll is a systemctl process
# A send with fds on a fresh connection never blocks in practice; retry briefly if it does.
SEND_RETRIES: Final = 50
_PEERCRED: Final = struct.Struct("3i")  # struct ucred: pid, uid, gid


# --------------------------------------------------------------------------------------------
# Socket activation and peer credentials
# --------------------------------------------------------------------------------------------


def sd_listen_fds(environ: dict[str, str] | None = None) -> list[socket.socket]:
    """The sockets systemd passed us (LISTEN_PID/LISTEN_FDS), removed from the environment.

    Unset afterwards so no child (engine) inherits the variables; the fds are non-inheritable.
    """
    env = os.environ if environ is None else environ
    pid, count = env.pop("LISTEN_PID", ""), env.pop("LISTEN_FDS", "")
    env.pop("LISTEN_FDNAMES", None)
    if not pid.isdigit() or int(pid) != os.getpid() or not count.isdigit():
        return []
    sockets = []
    for fd in range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)):
        os.set_inheritable(fd, False)
        sockets.append(socket.socket(fileno=fd))
    return sockets


def peer_uid(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end of a Unix socket, from the kernel."""
    raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
    pid, uid, _gid = _PEERCRED.unpack(raw)
    return pid, uid


# --------------------------------------------------------------------------------------------
# systemd scopes
# --------------------------------------------------------------------------------------------


async def _run(
    argv: list[str],
    timeout: float = SYSTEMCTL_TIMEOUT_S,
    env: Mapping[str, str] | None = None,
) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *argv,
        env=None if env is None else dict(env),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout=timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
        return -1, f"{argv[0]} timed out"
    return proc.returncode or 0, out.decode("utf-8", "replace")


class SystemdLauncher:
    """Launcher that runs each engine in a transient scope under the engine user."""

    name = "systemd"

    def __init__(
        self, *, engine_user: str, grace_s: int, python: str, systemd_run: str = SYSTEMD_RUN
    ) -> None:
        self.engine_user = engine_user
        self.engine_uid = pwd.getpwnam(engine_user).pw_uid  # KeyError: no such user
        self.grace_s = grace_s
        self.python = python
        self.systemd_run = systemd_run
        self.support = HostSupport(ip_firewall=False, socket_bind=False)

    async def probe(self, port: int) -> HostSupport:
        """Find out once whether the host enforces IPAddressDeny=/SocketBindDeny=."""
        unit = f"reflector-probe-{os.getpid()}-{time.monotonic_ns()}"
        argv = probe_argv(
            unit=unit,
            engine_user=self.engine_user,
            python=self.python,
            port=port,
            systemd_run=self.systemd_run,
        )
        # The engines' clean environment: nothing of the helper's may leak into the probe (in the
        # single binary, PyInstaller's _PYI_* variables would point it at the helper's private
        # unpack directory, which the engine user cannot read).
        code, out = await _run(argv, env=ENGINE_ENV)
        if code != 0:
            raise ReflectorError(f"systemd-run probe failed ({code}): {' '.join(out.split())}")
        self.support = parse_probe_output(out)
        _log.info(
            "host support: IPAddressAllow=%s SocketBindAllow=%s",
            "enforced" if self.support.ip_firewall else "not enforced (no cgroup v2 BPF)",
            "enforced" if self.support.socket_bind else "not enforced (no cgroup v2 BPF)",
        )
        return self.support

    async def launch(
        self, req: StartEngine, command: EngineCommand, *, stdin: int, stdout: int, stderr: int
    ) -> Engine:
        argv = scope_argv(
            req,
            command,
            engine_user=self.engine_user,
            grace_s=self.grace_s,
            support=self.support,
            systemd_run=self.systemd_run,
        )
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=stdin, stdout=stdout, stderr=stderr, env=dict(ENGINE_ENV), cwd="/"
        )
        started = time.monotonic()
        unit = unit_name(req.test_id)
        cgroup = await _await_scope(proc, unit)
        protections = self._protections(cgroup)
        return Engine(
            request=req,
            proc=proc,
            unit=unit,
            runtime_max_s=runtime_max_s(req.duration_s, self.grace_s),
            protections=tuple(protections),
            started=started,
            uid=self.engine_uid,
        )

    def _protections(self, cgroup: str | None) -> list[str]:
        enforced = dict.fromkeys(("memory_max", "cpu_quota", "tasks_max"), False)
        if cgroup is not None:
            for name, files in cgroup_limit_files(cgroup).items():
                enforced[name] = any(os.path.exists(str(f)) for f in files)
        return scope_protections(self.support, limits_enforced=enforced)

    async def stop(self, engine: Engine) -> None:
        code, out = await _run([SYSTEMCTL, "stop", "--", engine.unit])
        if code != 0:
            _log.warning("systemctl stop %s: %s", engine.unit, " ".join(out.split()))

    async def read_counters(self, engine: Engine) -> tuple[int | None, int | None]:
        if engine.running:
            argv = [SYSTEMCTL, "show", "-p", "IPIngressBytes,IPEgressBytes", "--", engine.unit]
            _, out = await _run(argv)
            return ip_counters_from_show(out)
        # Ended by itself: once systemd has stopped the scope, it has logged the counters, and
        # the sync makes journald store that record before we read it.
        await _scope_gone(engine.unit)
        await _run([JOURNALCTL, "--sync"], timeout=JOURNAL_SYNC_TIMEOUT_S)
        argv = [JOURNALCTL, "-o", "json", "--no-pager", "-n", "20", f"--unit={engine.unit}"]
        _, out = await _run(argv)
        records: list[dict[str, Any]] = []
        for line in out.splitlines():
            with contextlib.suppress(ValueError):
                doc = json.loads(line)
                if isinstance(doc, dict):
                    records.append(doc)
        return ip_counters_from_journal(records)

    def ended(self, engine: Engine) -> None:
        pass  # systemd owns the timer (RuntimeMaxSec=)


async def _await_scope(proc: asyncio.subprocess.Process, unit: str) -> str | None:
    """The scope's cgroup path once systemd-run has moved into it (None if it never did)."""
    deadline = time.monotonic() + SCOPE_TIMEOUT_S
    while time.monotonic() < deadline and proc.returncode is None:
        try:
            text = Path(f"/proc/{proc.pid}/cgroup").read_text()
        except OSError:
            return None
        for line in text.splitlines():
            path = line.split(":", 2)[-1]
            if path.endswith("/" + unit):
                return path
        await asyncio.sleep(SCOPE_POLL_S)
    return None


async def _scope_gone(unit: str) -> None:
    """Wait, bounded, until systemd has stopped `unit` (inactive, which an unloaded unit also
    reads; a failed one is unloaded soon, as it was started with --collect). By then systemd
    has logged its counters, and a caller that asks right after sees it stopped."""
    deadline = time.monotonic() + SCOPE_GONE_TIMEOUT_S
    argv = [SYSTEMCTL, "show", "-p", "ActiveState", "--value", "--", unit]
    while (left := deadline - time.monotonic()) > 0:
        code, out = await _run(argv, timeout=left)
        if code != 0 or out.strip() == "inactive":
            return
        await asyncio.sleep(SCOPE_GONE_POLL_S)
    _log.warning(
        "scope %s still not stopped %.0f s after its engine exited", unit, SCOPE_GONE_TIMEOUT_S
    )


async def stop_stale_scopes() -> None:
    """Stop scopes a previous helper left behind: no engine runs without a helper tracking it."""
    code, out = await _run([SYSTEMCTL, "stop", "--", "reflector-test-*.scope"])
    if code != 0:
        _log.warning("stopping stale test scopes: %s", " ".join(out.split()))


# --------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------


class _Server:
    def __init__(self, supervisor: EngineSupervisor, allowed_uids: frozenset[int]) -> None:
        self.supervisor = supervisor
        self.allowed_uids = allowed_uids
        self.slots = asyncio.Semaphore(MAX_CONNECTIONS)
        self.handlers: dict[type[Any], Callable[[Any], Awaitable[tuple[Response, list[int]]]]] = {
            StartEngine: self.supervisor.start,
            StopEngine: self._no_fds(self.supervisor.stop),
            OpenHole: self._no_fds(self.supervisor.open_hole),
            CloseHole: self._no_fds(self.supervisor.close_hole),
            ReadHole: self._no_fds(self.supervisor.read_hole),
            PrepareFirewall: self._no_fds(self.supervisor.prepare),
        }

    @staticmethod
    def _no_fds(
        handler: Callable[[Any], Awaitable[Response]],
    ) -> Callable[[Any], Awaitable[tuple[Response, list[int]]]]:
        async def call(request: Any) -> tuple[Response, list[int]]:
            return await handler(request), []

        return call

    async def handle(self, conn: socket.socket) -> None:
        async with self.slots:
            with conn:
                conn.setblocking(False)
                response, fds = await self._answer(conn)
                try:
                    await _send(conn, encode_frame(response), fds)
                except OSError as exc:
                    _log.warning("response not delivered: %s", exc)
                finally:
                    for fd in fds:
                        os.close(fd)

    async def _answer(self, conn: socket.socket) -> tuple[Response, list[int]]:
        pid, uid = peer_uid(conn)
        if uid not in self.allowed_uids:
            _log.warning("refused a request from uid %d (pid %d): not the parent", uid, pid)
            return Refused(code="not_permitted", message=f"uid {uid} may not use the helper"), []
        try:
            request = await asyncio.wait_for(_read_request(conn), timeout=REQUEST_TIMEOUT_S)
        except ProtocolError as exc:
            _log.warning("bad request from pid %d: %s", pid, exc.message)
            return Refused(code="bad_request", message=exc.message), []
        except (TimeoutError, OSError) as exc:
            return Refused(code="bad_request", message=f"no complete request: {exc}"), []
        try:
            response, fds = await self.handlers[type(request)](request)
        except Exception:
            _log.exception("handler for %s failed", type(request).__name__)
            return Refused(code="internal", message="the helper failed; see its log"), []
        if isinstance(response, Refused):
            _log.info("refused %s from pid %d: %s", request.TYPE, pid, response.message)
        elif not isinstance(response, EngineStarted):
            # read_hole comes every few seconds while a test runs and changes nothing.
            level = logging.DEBUG if isinstance(request, ReadHole) else logging.INFO
            test = getattr(request, "test_id", "-")
            _log.log(level, "%s for test %s from pid %d: done", request.TYPE, test, pid)
        return response, fds


async def _read_request(conn: socket.socket) -> Request:
    loop = asyncio.get_running_loop()
    reader = FrameReader()
    while True:
        data = await loop.sock_recv(conn, MAX_FRAME_BYTES + 4)
        if not data:
            raise ProtocolError("connection closed before a complete frame")
        reader.feed(data)
        frame = reader.next_frame()
        if frame is not None:
            if reader.pending:
                raise ProtocolError("one request per connection")
            return decode_request(frame)


async def _send(conn: socket.socket, frame: bytes, fds: list[int]) -> None:
    loop = asyncio.get_running_loop()
    if fds:
        for _ in range(SEND_RETRIES):
            try:
                sent = socket.send_fds(conn, [frame], fds)
                break
            except BlockingIOError:
                await asyncio.sleep(0.01)
        else:
            raise OSError("socket stayed full")
        frame = frame[sent:]
    if frame:
        await loop.sock_sendall(conn, frame)


async def serve_helper(
    config: Config,
    listener: socket.socket,
    *,
    allowed_uids: Iterable[int],
    launcher: Launcher,
    stop: asyncio.Event | None = None,
) -> None:
    """Serve requests on `listener` until `stop` is set; then stop every engine and hole."""
    supervisor = EngineSupervisor(config, launcher)
    supervisor.prepare_firewall()
    server = _Server(supervisor, frozenset(allowed_uids))
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    listener.setblocking(False)
    tasks: set[asyncio.Task[None]] = set()
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while not stop.is_set():
            accepting = asyncio.ensure_future(loop.sock_accept(listener))
            done, _ = await asyncio.wait({accepting, stopping}, return_when="FIRST_COMPLETED")
            if accepting not in done:
                accepting.cancel()
                break
            conn, _ = accepting.result()
            task = loop.create_task(server.handle(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        stopping.cancel()
        for task in list(tasks):
            task.cancel()
        await supervisor.stop_all()


# --------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="reflector privd",
        description="Reflector's privileged helper (socket-activated; see SECURITY.md).",
    )
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG_PATH)
    parser.add_argument(
        "--socket", type=Path, help="listen here when not socket-activated (tests, debugging)"
    )
    parser.add_argument("--parent-user", default=DEFAULT_PARENT_USER)
    parser.add_argument("--engine-user", default=None, help="default: [privsep] engine_user")
    return parser.parse_args(argv)


def _listener(args: argparse.Namespace) -> socket.socket:
    passed = sd_listen_fds()
    if len(passed) == 1:
        return passed[0]
    if passed:
        raise ReflectorError(f"expected one socket from systemd, got {len(passed)}")
    if args.socket is None:
        raise ReflectorError("not socket-activated and no --socket given")
    with contextlib.suppress(FileNotFoundError):
        args.socket.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o117)
    try:
        sock.bind(str(args.socket))
    finally:
        os.umask(old)
    sock.listen(MAX_CONNECTIONS)
    return sock


def _engine_user(args: argparse.Namespace, config: Config) -> str:
    if args.engine_user:
        return str(args.engine_user)
    section = getattr(config, "privsep", None)
    return str(getattr(section, "engine_user", DEFAULT_ENGINE_USER))


async def _main_async(args: argparse.Namespace) -> None:
    config = load_config(args.config)
    try:
        parent_uid = pwd.getpwnam(args.parent_user).pw_uid
        launcher = SystemdLauncher(
            engine_user=_engine_user(args, config),
            grace_s=config.limits.runtime_grace_sec,
            python=sys.executable,
        )
    except KeyError as exc:
        raise ReflectorError(f"no such user: {exc.args[0]}") from None
    listener = _listener(args)
    await stop_stale_scopes()
    await launcher.probe(config.network.data_port_range_start)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    _log.info("serving uid %d (and root); engines run as %s", parent_uid, launcher.engine_user)
    await serve_helper(config, listener, allowed_uids={parent_uid, 0}, launcher=launcher, stop=stop)


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = _parse_args(argv)
    if os.geteuid() != 0:
        print("error: the privileged helper must run as root (see units/)", file=sys.stderr)
        sys.exit(1)
    try:
        asyncio.run(_main_async(args))
    except ReflectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
