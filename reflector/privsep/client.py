"""What the unprivileged parent uses to run engines and open holes: an `EngineHost`.

Two implementations with one shape:
- `PrivsepClient(socket_path)`: asks the root helper over its Unix socket (systemd hosts).
- `LocalEngineHost(config)`: the fallback without systemd (reflector.privsep.local).
`select_engine_host(config)` picks the helper when its socket exists, and logs which it chose.

An engine's output comes back as two file descriptors (stdout, stderr) owned by the caller;
`open_reader(fd)` turns one into an asyncio StreamReader. EOF on stdout means the engine
exited; `stop_engine` then returns its status (it also stops an engine that still runs).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
from pathlib import Path
from typing import Final, Protocol

from reflector.config import Config
from reflector.privsep.local import LocalEngineHost
from reflector.privsep.protocol import (
    MAX_FDS,
    MAX_FRAME_BYTES,
    CloseHole,
    EngineExit,
    EngineHandle,
    EngineKind,
    EngineLimits,
    EngineStarted,
    EngineStopped,
    FirewallReady,
    FirewallUnavailable,
    FrameReader,
    HoleClosed,
    HoleCounted,
    HoleOpened,
    HoleTotals,
    OpenHole,
    PrepareFirewall,
    PrivsepError,
    ProtocolError,
    ReadHole,
    Refused,
    Request,
    Response,
    StartEngine,
    StopEngine,
    decode_response,
    encode_frame,
)

__all__ = [
    "DEFAULT_HELPER_SOCKET",
    "EngineExit",
    "EngineHandle",
    "EngineHost",
    "EngineLimits",
    "FirewallUnavailable",
    "HoleTotals",
    "LocalEngineHost",
    "PrivsepClient",
    "PrivsepError",
    "open_reader",
    "select_engine_host",
]

_log = logging.getLogger(__name__)

DEFAULT_HELPER_SOCKET: Final = "/run/reflector/privd.sock"
# A start waits for the scope (<= 5 s) and the engine's port (<= 5 s); a stop for an exiting
# engine (<= 3 s), then systemd's stop timeout (2 s) and the reap, or the scope's teardown
# (<= 3 s) and a journal sync (<= 2 s). Beyond 30 s the helper is stuck: fail, not hang.
CALL_TIMEOUT_S: Final = 30.0
# An engine's JSON can be megabytes on one line (iperf3 -J); StreamReader's 64 KiB would split.
READER_LIMIT: Final = 16 * 1024 * 1024


# PrivsepError code: no helper to ask (see HelperMissing).
HELPER_UNAVAILABLE = "helper_unavailable"


class EngineHost(Protocol):
    """Runs test engines and opens firewall holes for the parent."""

    name: str

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
    ) -> EngineHandle: ...

    async def stop_engine(self, test_id: str) -> EngineExit: ...

    async def open_hole(
        self, *, test_id: str, peer_addr: str, proto: str, port: int, ttl_s: int
    ) -> None: ...

    async def close_hole(self, test_id: str) -> HoleTotals | None: ...

    async def read_hole(self, test_id: str) -> HoleTotals | None:
        """What a test's open holes have carried so far (they stay open)."""
        ...

    async def prepare_firewall(self) -> None:
        """Direct mode: ensure Reflector's table is in place, or raise FirewallUnavailable."""
        ...

    async def close(self) -> None: ...


class PrivsepClient:
    """`EngineHost` backed by the privileged helper: one connection per request."""

    def __init__(self, socket_path: str | Path, *, timeout_s: float = CALL_TIMEOUT_S) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self.name = f"systemd scopes via the privileged helper at {self.socket_path}"

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
        response, fds = await self._call(request)
        assert isinstance(response, EngineStarted)
        return response.handle(stdout_fd=fds[0], stderr_fd=fds[1])

    async def stop_engine(self, test_id: str) -> EngineExit:
        response, _ = await self._call(StopEngine(test_id=test_id))
        assert isinstance(response, EngineStopped)
        return response.exit()

    async def open_hole(
        self, *, test_id: str, peer_addr: str, proto: str, port: int, ttl_s: int
    ) -> None:
        if proto not in ("tcp", "udp"):
            raise ProtocolError(f"proto must be tcp or udp, got {proto!r}")
        request = OpenHole(
            test_id=test_id,
            peer_addr=peer_addr,
            proto="tcp" if proto == "tcp" else "udp",
            port=port,
            ttl_s=ttl_s,
        )
        response, _ = await self._call(request)
        assert isinstance(response, HoleOpened)

    async def close_hole(self, test_id: str) -> HoleTotals | None:
        response, _ = await self._call(CloseHole(test_id=test_id))
        assert isinstance(response, HoleClosed)
        return response.totals()

    async def read_hole(self, test_id: str) -> HoleTotals | None:
        response, _ = await self._call(ReadHole(test_id=test_id))
        assert isinstance(response, HoleCounted)
        return response.totals()

    async def prepare_firewall(self) -> None:
        response, _ = await self._call(PrepareFirewall())
        assert isinstance(response, FirewallReady)

    async def close(self) -> None:
        """Nothing to release: each request has its own connection."""

    async def _call(self, request: Request) -> tuple[Response, list[int]]:
        """Send `request`; return the response, or raise the refusal as PrivsepError."""
        response, fds = await asyncio.to_thread(self.call_blocking, request)
        if isinstance(response, Refused):
            raise response.error()
        return response, fds

    def call_blocking(self, request: Request) -> tuple[Response, list[int]]:
        """One request over a fresh connection (blocking; for tests and tools)."""
        frame = encode_frame(request)  # refuses an oversized frame before sending it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except OSError as exc:
                reason = exc.strerror or type(exc).__name__
                raise PrivsepError(
                    "helper_unreachable", f"cannot reach the helper at {self.socket_path}: {reason}"
                ) from None
            # A helper that refused us before reading has still sent its answer.
            with contextlib.suppress(BrokenPipeError):
                sock.sendall(frame)
            return _receive(sock, expect_fds=isinstance(request, StartEngine))


def _receive(sock: socket.socket, *, expect_fds: bool) -> tuple[Response, list[int]]:
    reader = FrameReader()
    fds: list[int] = []
    try:
        while (doc := reader.next_frame()) is None:
            data, got, _flags, _addr = socket.recv_fds(sock, MAX_FRAME_BYTES + 4, MAX_FDS)
            fds += got
            for fd in got:  # recvmsg does not set close-on-exec: our children must not inherit
                os.set_inheritable(fd, False)
            if not data:
                raise ProtocolError("the helper closed the connection without a response")
            reader.feed(data)
        response = decode_response(doc)
        if isinstance(response, EngineStarted) != (len(fds) == 2) or (fds and not expect_fds):
            raise ProtocolError(f"{len(fds)} file descriptors with a {response.TYPE} response")
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return response, fds


async def open_reader(fd: int, *, limit: int = READER_LIMIT) -> asyncio.StreamReader:
    """An asyncio StreamReader over an engine's output fd (takes ownership of the fd)."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=limit)
    protocol = asyncio.StreamReaderProtocol(reader)
    await loop.connect_read_pipe(lambda: protocol, os.fdopen(fd, "rb", buffering=0))
    return reader


class HelperMissing:
    """`EngineHost` for a service whose helper socket is missing: every test is refused.

    For the deployed service the helper is how engines run (scopes, a separate uid,
    nftables); running them as the service's own children there would drop those protections
    without anyone noticing. Fail closed, and say what to start.
    """

    def __init__(self, path: Path) -> None:
        self.name = f"none: the privileged helper's socket {path} is missing"
        self._why = (
            f"the privileged helper is not running (no socket at {path}); start"
            " reflector-privd.socket, or set privsep.allow_local_engines = true"
        )

    async def start_engine(self, **_: object) -> EngineHandle:
        raise PrivsepError(HELPER_UNAVAILABLE, self._why)

    async def stop_engine(self, test_id: str) -> EngineExit:
        raise PrivsepError(HELPER_UNAVAILABLE, self._why)

    async def open_hole(self, **_: object) -> None:
        raise FirewallUnavailable(self._why)

    async def close_hole(self, test_id: str) -> HoleTotals | None:
        raise FirewallUnavailable(self._why)

    async def read_hole(self, test_id: str) -> HoleTotals | None:
        raise FirewallUnavailable(self._why)

    async def prepare_firewall(self) -> None:
        raise FirewallUnavailable(self._why)

    async def close(self) -> None:
        """Nothing was started."""


# Set by units/reflector.service: this process is the deployed service, not a developer's run.
SERVICE_MARKER_ENV = "REFLECTOR_SERVICE"


def deployed_as_service() -> bool:
    """Whether this is the deployed service (its unit sets REFLECTOR_SERVICE=1).

    An explicit marker rather than systemd's INVOCATION_ID, which every process started under
    any unit inherits (a CI runner's `make test`, for one).
    """
    return os.environ.get(SERVICE_MARKER_ENV) == "1"


def select_engine_host(config: Config) -> EngineHost:
    """The helper when its socket exists, else the local fallback; logs which one runs.

    The deployed service without the helper gets the local fallback only with
    privsep.allow_local_engines; otherwise `HelperMissing` refuses every test (see there).
    """
    section = getattr(config, "privsep", None)
    path = Path(str(getattr(section, "helper_socket", DEFAULT_HELPER_SOCKET)))
    host: EngineHost
    if path.is_socket():
        host = PrivsepClient(path)
        _log.info("engines: %s", host.name)
    elif deployed_as_service() and not getattr(section, "allow_local_engines", False):
        host = HelperMissing(path)
        _log.error("engines: %s; throughput tests and direct mode are refused", host.name)
    else:
        host = LocalEngineHost(config)
        _log.warning(
            "engines: %s; no helper socket at %s, so no transient scopes, separate uid or"
            " IP allowlist (see SECURITY.md)",
            host.name,
            path,
        )
    return host
