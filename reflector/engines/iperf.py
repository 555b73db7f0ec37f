"""The iperf3 throughput engine (spec §7.1): the endpoint's one-off server, the appliance's client.

Both run the installed iperf3 as a child in its own process group, stdin from /dev/null and
stdout (`-J`) captured with a size bound; every run ends by a deadline, killing the whole group
if need be, so the data port is always freed. Argument lists are built only from validated
integers, an IP literal (or, on the appliance, a DNS name) and the operator's configured path:
nothing a peer sends becomes free text on a command line.

What is enforced where (checked against `iperf3 --help` of iperf3 3.12, Debian 12's version,
which has `--idle-timeout`, `--rcv-timeout` and `--server-bitrate-limit`; older than 3.9 lacks
some of them and is not supported):
- Duration: `IperfServer.wait(deadline)` kills the server at the deadline whether or not a
  client came. `--idle-timeout` is only a backstop for when Reflector itself dies.
- Streams: iperf3 3.12 has no server-side cap on parallel streams. The session manager refuses
  a request above `max_streams` before starting; in tunneled mode the tunnel can count data
  connections (streams + 1 control); afterwards `grant_mismatches` flags a client that ran more.
- Bitrate: with `max_bitrate_bps` > 0 the server gets `--server-bitrate-limit`. iperf3 does not
  throttle to it: it *aborts* the test once the total rate, averaged over
  SERVER_BITRATE_AVERAGING_S, exceeds it. Appliances should pass a `-b` below the limit.
- Protocol and direction come from the client; `grant_mismatches` checks them afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import math
import os
import re
import signal
import time
from collections.abc import Callable
from typing import Any, Final

import psutil

from reflector.config import Iperf3Config
from reflector.engines.throughput_result import (
    EngineError,
    EngineErrorCode,
    ThroughputResult,
    normalize_iperf3,
)

__all__ = [
    "EngineError",
    "EngineErrorCode",
    "IperfServer",
    "client_argv",
    "run_client",
    "server_argv",
]

DEFAULT_IPERF3_PATH: Final = "/usr/bin/iperf3"
# iperf3 binds its port within milliseconds; 3 s still covers a cold start on a small VPS.
STARTUP_TIMEOUT_S: Final = 3.0
# How often start() looks for the LISTEN socket; short, as the whole wait is a few ms.
LISTEN_POLL_S: Final = 0.02
# iperf3 answers SIGTERM by writing its JSON and exiting at once; 1 s is generous before SIGKILL.
TERM_GRACE_S: Final = 1.0
# After exit, the pipes reach EOF at once; bounded in case something else still holds them.
DRAIN_TIMEOUT_S: Final = 2.0
# `--idle-timeout` backstop beyond the test's duration: if Reflector dies while its server waits
# for a client, iperf3 leaves by itself. Our own deadline normally comes long before.
IDLE_BACKSTOP_S: Final = 30
# `--rcv-timeout`: a client silent this long mid-test has broken the measurement; iperf3's
# default of 120 s would hold the test slot for nothing. It does not apply before a client comes.
RCV_TIMEOUT_MS: Final = 5000
# `--server-bitrate-limit RATE/N`: iperf3's default 5 s window never trips for short tests; 2 s
# stops an over-rate test early yet tolerates the start-up burst of a correctly paced flow.
SERVER_BITRATE_AVERAGING_S: Final = 2
# The normalized result keeps this many interval samples; the server's `-i` is stretched so a
# longer test still reports about this many and its JSON stays small.
TARGET_INTERVALS: Final = 120
# -J output is ~400 bytes per stream per interval: 129 x 120 x 400 is about 6 MB; beyond 16 MiB
# it is not a run we granted.
MAX_OUTPUT_BYTES: Final = 16 * 1024 * 1024
# Enough of stderr to explain a crash ("error while loading shared libraries ...").
MAX_STDERR_BYTES: Final = 8192
# The longest test the config allows (quotas.max_test_duration_sec's upper bound).
MAX_DURATION_S: Final = 3600
# iperf3 refuses more than 128 parallel streams.
MAX_STREAMS: Final = 128
# The config's upper bound for iperf3.max_bitrate_bps: 1 Tbit/s.
MAX_BITRATE_BPS: Final = 10**12
# Data ports come from network.data_port_range_*, which the config bounds to 1024-65535.
MIN_DATA_PORT: Final = 1024
# Client: time to set up the control connection before iperf3 gives up.
CONNECT_TIMEOUT_MS: Final = 5000
# Client: allowance beyond -t for connecting, parameter exchange and the final result exchange.
CLIENT_GRACE_S: Final = 15.0
# Client: how often `progress` hears that the run is still going.
PROGRESS_INTERVAL_S: Final = 1.0
# What iperf3 3.12 says when its listening port is taken.
_PORT_IN_USE_TEXT: Final = "Address already in use"
# DNS host names (RFC 1123 labels); never starts with "-", so it cannot read as an option.
_HOSTNAME_RE: Final = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$"
)


# --- Argument lists (pure).


def server_argv(cfg: Iperf3Config, port: int, bind: str, duration_s: int) -> list[str]:
    """The endpoint's one-off iperf3 server for one granted test; raises ValueError on bad input.

    `bind` must be an IP literal (127.0.0.1 in tunneled mode, a public address when direct).
    """
    _check_int("port", port, MIN_DATA_PORT, 65535)
    _check_int("duration_s", duration_s, 1, MAX_DURATION_S)
    address = str(ipaddress.ip_address(bind))
    interval_s = max(1, math.ceil(duration_s / TARGET_INTERVALS))
    argv = [
        cfg.path,
        "-s",
        "-p",
        str(port),
        "--one-off",
        "-J",
        "-B",
        address,
        "-i",
        str(interval_s),
        "--idle-timeout",
        str(duration_s + IDLE_BACKSTOP_S),
        "--rcv-timeout",
        str(RCV_TIMEOUT_MS),
    ]
    if cfg.max_bitrate_bps > 0:
        _check_int("max_bitrate_bps", cfg.max_bitrate_bps, 1, MAX_BITRATE_BPS)
        limit = f"{cfg.max_bitrate_bps}/{SERVER_BITRATE_AVERAGING_S}"
        argv += ["--server-bitrate-limit", limit]
    return argv


def client_argv(
    host: str,
    port: int,
    *,
    duration_s: int,
    streams: int = 1,
    reverse: bool = False,
    udp: bool = False,
    bitrate_bps: int | None = None,
    iperf3_path: str = DEFAULT_IPERF3_PATH,
) -> list[str]:
    """The appliance's iperf3 client; `bitrate_bps` None keeps iperf3's default (-b omitted)."""
    _check_host(host)
    _check_int("port", port, 1, 65535)
    _check_int("duration_s", duration_s, 1, MAX_DURATION_S)
    _check_int("streams", streams, 1, MAX_STREAMS)
    argv = [
        iperf3_path,
        "-c",
        host,
        "-p",
        str(port),
        "-t",
        str(duration_s),
        "-P",
        str(streams),
        "-J",
        "--connect-timeout",
        str(CONNECT_TIMEOUT_MS),
    ]
    if reverse:
        argv.append("-R")
    if udp:
        argv.append("-u")
    if bitrate_bps is not None:
        _check_int("bitrate_bps", bitrate_bps, 0, MAX_BITRATE_BPS)
        argv += ["-b", str(bitrate_bps)]
    return argv


def _check_int(name: str, value: int, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"{name} must be an integer between {lo} and {hi}, got {value!r}")


def _check_host(host: str) -> None:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if not _HOSTNAME_RE.fullmatch(host):
            raise ValueError(f"host must be an IP address or a DNS name, got {host!r}") from None


# --- One child process (the I/O shell shared by server and client).


class _Child:
    """An iperf3 process in its own process group, its output read concurrently with a bound."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.started = time.monotonic()
        self.ended: float | None = None
        self.stdout = bytearray()
        self.stdout_overflow = False
        self.stderr = bytearray()
        assert proc.stdout is not None
        assert proc.stderr is not None
        self._readers = [
            asyncio.ensure_future(self._read(proc.stdout, self.stdout, MAX_OUTPUT_BYTES, True)),
            asyncio.ensure_future(self._read(proc.stderr, self.stderr, MAX_STDERR_BYTES, False)),
        ]

    @classmethod
    async def spawn(cls, argv: list[str]) -> _Child:
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,  # own process group: the kill reaches all of it
            )
        except OSError as exc:  # absent, not executable, a directory...
            reason = exc.strerror or type(exc).__name__
            message = f"cannot run iperf3 at {argv[0]}: {reason}"
            raise EngineError("iperf3_missing", message) from None
        return cls(proc)

    async def _read(
        self, stream: asyncio.StreamReader, into: bytearray, limit: int, is_stdout: bool
    ) -> None:
        # Keep reading past the limit (discarding) so iperf3 never blocks on a full pipe.
        while chunk := await stream.read(65536):
            if len(into) + len(chunk) <= limit:
                into += chunk
            elif is_stdout:
                self.stdout_overflow = True

    @property
    def running(self) -> bool:
        return self.proc.returncode is None

    async def wait_until(self, deadline: float) -> bool:
        """Wait for the exit until `deadline` (time.monotonic()); False if still running."""
        try:
            await asyncio.wait_for(self.proc.wait(), timeout=max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            return False
        return True

    async def kill(self) -> None:
        """SIGTERM the group, then SIGKILL it after a short grace.

        Only while asyncio has not reported the leader's exit: its pid is then ours, or reaped a
        moment ago by asyncio's watcher thread, far too recently for the group id to have been
        reused. The last wait is bounded too: a process stuck in the kernel must not hang us.
        """
        self._signal_group(signal.SIGTERM)
        if not await self.wait_until(time.monotonic() + TERM_GRACE_S):
            self._signal_group(signal.SIGKILL)
            await self.wait_until(time.monotonic() + TERM_GRACE_S)

    def _signal_group(self, sig: signal.Signals) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    async def finish(self) -> None:
        """Collect the remaining output and note the end time (after the process exited)."""
        _, pending = await asyncio.wait(self._readers, timeout=DRAIN_TIMEOUT_S)
        for task in pending:
            task.cancel()
        if self.ended is None:
            self.ended = time.monotonic()

    def stderr_line(self) -> str:
        text = self.stderr.decode("utf-8", "replace")
        line = " ".join(text.split())
        return line[-200:] if line else "no message on stderr"


def _parse_json(child: _Child) -> dict[str, Any] | EngineError:
    """The child's stdout as a JSON object, or the error that explains why there is none."""
    code = child.proc.returncode
    if child.stdout_overflow:
        return EngineError("iperf3_bad_output", f"iperf3 output exceeded {MAX_OUTPUT_BYTES} bytes")
    if not child.stdout.strip():
        if code == 0:
            return EngineError("iperf3_bad_output", "iperf3 exited without output")
        return EngineError("iperf3_failed", f"iperf3 exited with {code}: {child.stderr_line()}")
    try:
        doc = json.loads(child.stdout)
    except (UnicodeDecodeError, json.JSONDecodeError):
        if code != 0:
            return EngineError("iperf3_failed", f"iperf3 exited with {code}: {child.stderr_line()}")
        return EngineError("iperf3_bad_output", "iperf3 output is not JSON")
    if not isinstance(doc, dict):
        return EngineError("iperf3_bad_output", "iperf3 output is not a JSON object")
    return doc


# --- The endpoint's server.


class IperfServer:
    """One granted throughput test: an `iperf3 -s --one-off` that ends by its deadline.

    Use: `await start()` (raises EngineError), `await wait(deadline)`, then `result()`.
    `pid`, `exit_code` and `runtime_s` are for the audit trail (spec §8.3).
    """

    def __init__(self, cfg: Iperf3Config, *, port: int, bind: str, duration_s: int) -> None:
        self.port = port
        self.argv = server_argv(cfg, port, bind, duration_s)
        self._child: _Child | None = None
        self._timed_out = False
        self._finished = False
        self._start_error: EngineError | None = None

    @property
    def pid(self) -> int | None:
        return self._child.proc.pid if self._child else None

    @property
    def exit_code(self) -> int | None:
        return self._child.proc.returncode if self._child else None

    @property
    def runtime_s(self) -> float | None:
        if self._child is None or self._child.ended is None:
            return None
        return self._child.ended - self._child.started

    @property
    def timed_out(self) -> bool:
        return self._timed_out

    async def start(self) -> None:
        """Spawn iperf3 and return once it LISTENs on the port; raise EngineError otherwise.

        Readiness is read from the child's own sockets (psutil), never by connecting: a probe
        connection would be the one client that `--one-off` serves.
        """
        if self._child is not None:
            raise RuntimeError("IperfServer.start() called twice")
        try:
            self._child = await _Child.spawn(self.argv)
        except EngineError as exc:
            self._start_error = exc
            self._finished = True
            raise
        try:
            if await self._wait_listening():
                return
        except BaseException:  # cancelled: do not leave a listener behind
            await self._child.kill()
            await self._child.finish()
            self._start_error = EngineError("iperf3_failed", "start was cancelled")
            self._finished = True
            raise
        child = self._child
        if child.running:
            await child.kill()
            await child.finish()
            self._start_error = EngineError(
                "iperf3_failed",
                f"iperf3 did not listen on port {self.port} within {STARTUP_TIMEOUT_S:g} s",
            )
        else:
            await child.finish()
            self._start_error = self._early_exit_error(child)
        self._finished = True
        raise self._start_error

    async def _wait_listening(self) -> bool:
        assert self._child is not None
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            if not self._child.running:
                return False
            if _is_listening(self._child.proc.pid, self.port):
                return True
            await asyncio.sleep(LISTEN_POLL_S)
        return False

    def _early_exit_error(self, child: _Child) -> EngineError:
        parsed = _parse_json(child)
        if isinstance(parsed, EngineError):
            return parsed
        error = parsed.get("error")
        if isinstance(error, str) and _PORT_IN_USE_TEXT in error:
            return EngineError("port_unavailable", f"data port {self.port} is already in use")
        why = " ".join(str(error).split())[:200] if error is not None else "no error text"
        code = child.proc.returncode
        return EngineError("iperf3_failed", f"iperf3 exited with {code} before listening: {why}")

    async def wait(self, deadline: float) -> None:
        """Return when iperf3 exits, or kill it (the whole group) at `deadline`.

        `deadline` is a time.monotonic() value; one in the past stops the server now. If the
        caller is cancelled while waiting, the server keeps running: call `stop()` in a
        `finally`.
        """
        if self._child is None:
            raise RuntimeError("IperfServer.wait() before start()")
        if self._finished:
            return
        if not await self._child.wait_until(deadline):
            self._timed_out = True
            await self._child.kill()
        await self._child.finish()
        self._finished = True

    async def stop(self) -> None:
        """Stop now (the session closed early or the caller failed); safe to call any time."""
        if self._child is not None and not self._finished:
            await self.wait(time.monotonic())

    def result(self, client_json: dict[str, Any] | None = None) -> ThroughputResult | EngineError:
        """The normalized result, or the EngineError that explains why there is none."""
        if self._start_error is not None:
            return self._start_error
        if self._child is None or not self._finished:
            raise RuntimeError("IperfServer.result() before wait() returned")
        parsed = _parse_json(self._child)
        if self._timed_out:
            return EngineError("iperf3_timeout", self._timeout_message(parsed))
        if self._child.proc.returncode == 0 and not self._child.stdout.strip():
            # --one-off with --idle-timeout exits 0 silently when nobody came.
            return EngineError("iperf3_timeout", "no client connected before the idle timeout")
        if isinstance(parsed, EngineError):
            return parsed
        try:
            return normalize_iperf3(parsed, client_json)
        except EngineError as exc:
            return exc

    def output_json(self) -> dict[str, Any] | None:
        """iperf3's own JSON document, when it printed one (to archive or to cross-check)."""
        if self._child is None or not self._finished:
            return None
        parsed = _parse_json(self._child)
        return None if isinstance(parsed, EngineError) else parsed

    def _timeout_message(self, parsed: dict[str, Any] | EngineError) -> str:
        runtime = self.runtime_s or 0.0
        start = parsed.get("start") if isinstance(parsed, dict) else None
        connected = isinstance(start, dict) and bool(start.get("connected"))
        what = "the test was still running" if connected else "no client connected"
        return f"{what} at the deadline; iperf3 was stopped after {runtime:.1f} s"

    def audit(self) -> dict[str, Any]:
        """Subprocess details for the audit log: argv (no secrets in it), pid, exit, runtime."""
        runtime = self.runtime_s
        return {
            "argv": list(self.argv),
            "pid": self.pid,
            "exit_code": self.exit_code,
            "runtime_s": None if runtime is None else round(runtime, 3),
            "timed_out": self._timed_out,
        }


def _is_listening(pid: int, port: int) -> bool:
    try:
        proc = psutil.Process(pid)
        # psutil >= 6 renamed connections() to net_connections().
        lister = getattr(proc, "net_connections", None) or proc.connections
        conns = lister(kind="tcp")
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    return any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port for c in conns)


# --- The appliance's client.


async def run_client(
    host: str,
    port: int,
    *,
    duration_s: int,
    streams: int = 1,
    reverse: bool = False,
    udp: bool = False,
    bitrate_bps: int | None = None,
    iperf3_path: str = DEFAULT_IPERF3_PATH,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run `iperf3 -c ... -J` and return its parsed JSON; raise EngineError on any failure.

    Bounded by duration + CLIENT_GRACE_S. `progress` hears a short line about once a second:
    iperf3 3.12 prints its JSON only at the end, so this is elapsed time, not live rates.
    """
    argv = client_argv(
        host,
        port,
        duration_s=duration_s,
        streams=streams,
        reverse=reverse,
        udp=udp,
        bitrate_bps=bitrate_bps,
        iperf3_path=iperf3_path,
    )
    child = await _Child.spawn(argv)
    deadline = child.started + duration_s + CLIENT_GRACE_S
    try:
        if progress is not None:
            progress(f"iperf3 client started (pid {child.proc.pid}), {duration_s} s test")
        while not await child.wait_until(min(deadline, time.monotonic() + PROGRESS_INTERVAL_S)):
            if time.monotonic() >= deadline:
                await child.kill()
                raise EngineError(
                    "iperf3_timeout",
                    f"iperf3 client still running {CLIENT_GRACE_S:g} s after "
                    f"its {duration_s} s test; stopped",
                )
            if progress is not None:
                elapsed = time.monotonic() - child.started
                progress(f"iperf3 running: {elapsed:.0f} of {duration_s} s")
    finally:
        if child.running:
            await child.kill()
        await child.finish()
    parsed = _parse_json(child)
    if isinstance(parsed, EngineError):
        raise parsed
    error = parsed.get("error")
    if error is not None:
        # iperf3 3.12 exits 0 even when it could not connect: the JSON is the only signal.
        text = " ".join(str(error).split())[:200]
        raise EngineError("iperf3_error", f"iperf3 client reported: {text}")
    if progress is not None:
        progress("iperf3 client finished")
    return parsed
