"""An iperf3 server started through an `EngineHost` (the privileged helper or the local fallback).

The parent never spawns iperf3 itself: it asks the host, which builds the command line from the
config, runs it in a transient scope under the engine user (or as a child with rlimits), and
hands back the read ends of its stdout and stderr. This class reads them, stops the engine at
the deadline, and turns what iperf3 printed into the same results `IperfServer` gives.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from reflector.engines.iperf import MAX_OUTPUT_BYTES, EngineError
from reflector.engines.throughput_result import ThroughputResult, normalize_iperf3
from reflector.privsep import (
    HELPER_UNAVAILABLE,
    EngineExit,
    EngineHost,
    EngineLimits,
    PrivsepError,
    open_reader,
)

# iperf3's stderr is only read for a one-line reason; more is noise.
MAX_STDERR_BYTES = 64 * 1024
# After the host stops the engine, its pipes reach EOF at once; bound the wait anyway.
DRAIN_TIMEOUT_SEC = 5.0
PORT_IN_USE_TEXT = "Address already in use"


class HostedIperf:
    """One granted throughput test's iperf3, owned by the engine host."""

    def __init__(
        self,
        host: EngineHost,
        *,
        test_id: str,
        port: int,
        bind: str,
        peer: str,
        duration_s: int,
        limits: EngineLimits,
    ) -> None:
        self.host = host
        self.test_id = test_id
        self.port = port
        self._start_args = {"bind": bind, "peer": peer, "duration_s": duration_s}
        self._limits = limits
        self.pid: int | None = None
        self.unit: str | None = None
        self.protections: tuple[str, ...] = ()
        self.exit: EngineExit | None = None
        self._stdout = bytearray()
        self._stderr = bytearray()
        self._overflow = False
        self._readers: list[asyncio.Task[None]] = []
        self._stopped = False
        self._final: ThroughputResult | EngineError | None = None
        self._cut_short = False

    @property
    def exit_code(self) -> int | None:
        return self.exit.exit_code if self.exit else None

    async def start(self) -> None:
        """Start the engine; EngineError if the host refuses or iperf3 cannot listen."""
        try:
            handle = await self.host.start_engine(
                test_id=self.test_id,
                kind="iperf3",
                port=self.port,
                limits=self._limits,
                **self._start_args,  # type: ignore[arg-type]
            )
        except PrivsepError as exc:
            if exc.code == HELPER_UNAVAILABLE:
                raise EngineError("engine_unavailable", exc.message) from None
            if "port" in exc.code:
                raise EngineError("port_unavailable", f"engine host refused: {exc}") from None
            raise EngineError("iperf3_failed", f"engine host refused: {exc}") from None
        self.pid, self.unit, self.protections = handle.pid, handle.unit, handle.protections
        out = await open_reader(handle.stdout_fd)
        err = await open_reader(handle.stderr_fd)
        self._readers = [
            asyncio.create_task(self._drain(out, self._stdout, MAX_OUTPUT_BYTES)),
            asyncio.create_task(self._drain(err, self._stderr, MAX_STDERR_BYTES)),
        ]
        if not handle.ready:
            await self.stop()
            text = (self._stdout + self._stderr).decode(errors="replace")
            if PORT_IN_USE_TEXT in text:
                raise EngineError("port_unavailable", f"data port {self.port} is already in use")
            raise EngineError("iperf3_failed", f"iperf3 did not listen on port {self.port}")

    async def wait(self, deadline: float) -> None:
        """Return when iperf3 exits (its output ends), or stop it at `deadline` (monotonic)."""
        # asyncio.wait, not wait_for: a timeout must not cancel the readers (stop drains them).
        await asyncio.wait(self._readers, timeout=max(0.0, deadline - time.monotonic()))
        await self.stop()

    async def stop(self) -> None:
        """Stop the engine (idempotent) and collect its exit for the audit trail."""
        if self._stopped:
            return
        self._stopped = True
        # Output still flowing when we stop it means iperf3 had not finished on its own. (The
        # host waits for an engine that is already exiting, so its `stopped_by` says "exit".)
        self._cut_short = any(not task.done() for task in self._readers)
        try:
            self.exit = await self.host.stop_engine(self.test_id)
        except PrivsepError as exc:
            self._stderr += f"\nstop failed: {exc}".encode()
        if self._readers:
            await asyncio.wait(self._readers, timeout=DRAIN_TIMEOUT_SEC)
        for task in self._readers:
            task.cancel()

    @property
    def timed_out(self) -> bool:
        return self._cut_short

    @property
    def runtime_s(self) -> float | None:
        return self.exit.runtime_ms / 1000 if self.exit else None

    def result(self) -> ThroughputResult | EngineError:
        """The normalized result; computed once when the engine has stopped (its output final),
        since both the engine-ended check and the session's finish ask for it."""
        if self._final is not None:
            return self._final
        outcome = self._outcome()
        if self._stopped:
            self._final = outcome
        return outcome

    def _outcome(self) -> ThroughputResult | EngineError:
        parsed = self._parse()
        if self.timed_out:
            start = parsed.get("start") if isinstance(parsed, dict) else None
            connected = isinstance(start, dict) and bool(start.get("connected"))
            what = "the test was still running" if connected else "no client connected"
            return EngineError("iperf3_timeout", f"{what} at the deadline; iperf3 was stopped")
        if isinstance(parsed, EngineError):
            return parsed
        try:
            return normalize_iperf3(parsed)
        except EngineError as exc:
            return exc

    def audit(self) -> dict[str, Any]:
        return {
            "pid": self.pid,
            "unit": self.unit,
            "protections": list(self.protections),
            "stopped_by": self.exit.stopped_by if self.exit else None,
            "ip_ingress_bytes": self.exit.ip_ingress_bytes if self.exit else None,
            "ip_egress_bytes": self.exit.ip_egress_bytes if self.exit else None,
        }

    def _parse(self) -> dict[str, Any] | EngineError:
        if self._overflow:
            return EngineError("iperf3_bad_output", f"output exceeded {MAX_OUTPUT_BYTES} bytes")
        text = bytes(self._stdout).strip()
        if not text:
            reason = bytes(self._stderr).decode(errors="replace").strip().splitlines()
            why = reason[-1][:200] if reason else "no output"
            return EngineError("iperf3_failed", f"iperf3 printed no result: {why}")
        try:
            doc = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return EngineError("iperf3_bad_output", "iperf3 output is not JSON")
        if not isinstance(doc, dict):
            return EngineError("iperf3_bad_output", "iperf3 output is not a JSON object")
        return doc

    async def _drain(self, reader: asyncio.StreamReader, into: bytearray, limit: int) -> None:
        while chunk := await reader.read(65536):
            if len(into) + len(chunk) > limit:
                self._overflow = self._overflow or into is self._stdout
                continue  # keep draining so the engine never blocks on a full pipe
            into += chunk
