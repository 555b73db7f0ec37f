"""The appliance's end of a tunnel: a loopback port whose every connection becomes a tunnel.

`TunnelClient.start()` listens on 127.0.0.1 on an ephemeral port; the appliance points its
iperf3 client there. For each local TCP connection (iperf3's control connection and each of its
streams) the client opens its own mTLS connection to the endpoint's control port with ALPN
`pp-tunnel/1`, checks that the endpoint proved the pinned key, sends `tunnel_open`, waits for
`tunnel_ok` (everything bounded by `open_timeout`), then relays bytes both ways (relay.py).

Local reading stays paused until the tunnel is open, so iperf3's first bytes wait in the kernel
rather than in our memory. When a tunnel cannot be opened the failure is recorded (`failures`,
and `on_failure` if given) and the local connection is closed, which iperf3 reports as a
connection error: the appliance learns the reason from `failures`.

Any local process can connect to the loopback port while it is open; what it reaches is only
the granted session's iperf3 server, for the session's lifetime, which is what the appliance
asked for.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from reflector.certificate import BadCertificate
from reflector.link.frames import RemoteProtocolError
from reflector.tls import ALPN_TUNNEL, HANDSHAKE_TIMEOUT, EndpointMismatch, check_expected_peer
from reflector.tunnel.relay import Relay, TunnelCounters
from reflector.tunnel.wire import (
    MAX_REPLY_FRAME_SIZE,
    TunnelOpen,
    encode_tunnel_open,
    parse_tunnel_reply,
    split_first_frame,
)

__all__ = [
    "LOCAL_HOST",
    "MAX_KEPT_FAILURES",
    "MAX_LOCAL_CONNECTIONS",
    "OPEN_TIMEOUT",
    "TunnelClient",
    "TunnelFailure",
]

_log = logging.getLogger(__name__)

# Only processes on this machine may use the tunnel.
LOCAL_HOST: Final = "127.0.0.1"
# TCP connect + TLS handshake + one round trip for tunnel_open: a few round trips even on a
# slow WAN. 15 s is above the handshake's own 10 s bound, so that bound reports first.
OPEN_TIMEOUT: Final = 15.0
# iperf3 allows 128 streams plus its control connection; the endpoint enforces the session's
# real cap, this only stops a runaway local client from opening TLS connections without end.
MAX_LOCAL_CONNECTIONS: Final = 130
# Failures are kept for the caller to read; a client retrying in a loop must not grow them
# without bound, and the most recent ones are the interesting ones.
MAX_KEPT_FAILURES: Final = 64


@dataclass(frozen=True, kw_only=True)
class TunnelFailure:
    """Why one local connection could not be tunneled.

    `code` is the endpoint's error code when it refused (e.g. "not_authorized"), else one of
    ours: endpoint_unreachable, tls_failed, endpoint_mismatch, bad_reply, open_timeout, closed,
    too_many_connections.
    """

    code: str
    message: str


class _TunnelFailed(Exception):
    def __init__(self, failure: TunnelFailure) -> None:
        super().__init__(f"{failure.code}: {failure.message}")
        self.failure = failure


class TunnelClient:
    """Tunnels every connection to a local port to the endpoint's iperf3 server for a session."""

    def __init__(
        self,
        endpoint: tuple[str, int],
        ssl_context: ssl.SSLContext,
        expected_id: str,
        session_id: str,
        token: str,
        *,
        open_timeout: float = OPEN_TIMEOUT,
        on_failure: Callable[[TunnelFailure], None] | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.counters = TunnelCounters()
        self._ssl_context = ssl_context
        self._expected_id = expected_id
        self._open_frame = encode_tunnel_open(TunnelOpen(session_id=session_id, token=token))
        self._open_timeout = open_timeout
        self._on_failure = on_failure
        self._failures: collections.deque[TunnelFailure] = collections.deque(
            maxlen=MAX_KEPT_FAILURES
        )
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def failures(self) -> list[TunnelFailure]:
        return list(self._failures)

    async def start(self) -> tuple[str, int]:
        """Listen on an ephemeral loopback port; return its address for the iperf3 client."""
        if self._server is not None or self._closed:
            raise RuntimeError("TunnelClient.start() may be called once")
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _LocalConnection(self), LOCAL_HOST, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def close(self) -> None:
        """Stop listening, abandon tunnels being opened and abort every live relay."""
        self._closed = True
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        self.counters.stop_all()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _accept(self, relay: Relay) -> asyncio.Task[None] | None:
        """Start opening a tunnel for a new local connection, or refuse it."""
        if self._closed:
            relay.stop()
            return None
        if self.counters.open_connections > MAX_LOCAL_CONNECTIONS:
            self._report(
                TunnelFailure(
                    code="too_many_connections",
                    message=f"more than {MAX_LOCAL_CONNECTIONS} local connections at once",
                )
            )
            relay.stop()
            return None
        task = asyncio.get_running_loop().create_task(self._open_tunnel(relay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _open_tunnel(self, relay: Relay) -> None:
        loop = asyncio.get_running_loop()
        opening = _Opening(relay, self._expected_id, self._open_frame, loop.create_future())
        host, port = self.endpoint
        try:
            async with asyncio.timeout(self._open_timeout):
                await loop.create_connection(
                    lambda: opening,
                    host,
                    port,
                    ssl=self._ssl_context,
                    ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                )
                await opening.result
            return
        except _TunnelFailed as exc:
            failure = exc.failure
        except TimeoutError:
            failure = TunnelFailure(
                code="open_timeout", message=f"no tunnel_ok within {self._open_timeout:g} s"
            )
        except ssl.SSLError as exc:
            failure = TunnelFailure(code="tls_failed", message=f"TLS handshake failed: {exc}")
        except OSError as exc:
            failure = TunnelFailure(
                code="endpoint_unreachable",
                message=f"cannot connect to {host}:{port}: {exc.strerror or exc}",
            )
        except asyncio.CancelledError:
            opening.abort()
            relay.stop()
            raise
        opening.abort()
        relay.close()
        self._report(failure)

    def _report(self, failure: TunnelFailure) -> None:
        _log.warning("tunnel to %s:%s failed: %s", *self.endpoint, failure.message)
        self._failures.append(failure)
        if self._on_failure is not None:
            self._on_failure(failure)


class _LocalConnection(asyncio.Protocol):
    """A local iperf3 connection: handed to the relay's client side, plus the opener task."""

    def __init__(self, client: TunnelClient) -> None:
        self._client = client
        self._relay = Relay(client.counters)
        self._side = self._relay.client_side
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._side.connection_made(transport)  # reading stays paused until the tunnel is open
        self._task = self._client._accept(self._relay)

    def data_received(self, data: bytes) -> None:
        self._side.data_received(data)

    def eof_received(self) -> bool:
        return self._side.eof_received()

    def pause_writing(self) -> None:
        self._side.pause_writing()

    def resume_writing(self) -> None:
        self._side.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
        self._side.connection_lost(exc)


class _Opening(asyncio.Protocol):
    """The TLS connection to the endpoint: the opening exchange, then the relay's server side."""

    def __init__(
        self, relay: Relay, expected_id: str, open_frame: bytes, result: asyncio.Future[None]
    ) -> None:
        self.result = result
        self._relay = relay
        self._expected_id = expected_id
        self._open_frame = open_frame
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._attached = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            check_expected_peer(ssl_object, self._expected_id)
        except (EndpointMismatch, BadCertificate) as exc:
            self._fail("endpoint_mismatch", str(exc))
            return
        alpn = ssl_object.selected_alpn_protocol()
        if alpn != ALPN_TUNNEL:
            self._fail("tls_failed", f"the endpoint did not agree to {ALPN_TUNNEL} (got {alpn})")
            return
        transport.write(self._open_frame)

    def data_received(self, data: bytes) -> None:
        if self._attached:
            self._relay.server_side.data_received(data)
            return
        if self.result.done():
            return
        self._buffer += data
        try:
            split = split_first_frame(bytes(self._buffer), MAX_REPLY_FRAME_SIZE)
            if split is None:
                return
            payload, rest = split
            reply = parse_tunnel_reply(payload)
        except RemoteProtocolError as exc:
            self._fail("bad_reply", f"the endpoint's reply is invalid: {exc}")
            return
        if not reply.ok:
            self._fail(reply.code, reply.message)
            return
        self._attach(rest)

    def eof_received(self) -> bool | None:
        if self._attached:
            return self._relay.server_side.eof_received()
        self._fail("closed", "the endpoint closed the tunnel without answering")
        return None

    def pause_writing(self) -> None:
        if self._attached:
            self._relay.server_side.pause_writing()

    def resume_writing(self) -> None:
        if self._attached:
            self._relay.server_side.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._attached:
            self._relay.server_side.connection_lost(exc)
        else:
            self._fail("closed", "the endpoint closed the tunnel without answering")

    def abort(self) -> None:
        """Drop the TLS connection if the relay never took it over."""
        if not self._attached and self._transport is not None:
            self._transport.abort()

    def _attach(self, rest: bytes) -> None:
        assert self._transport is not None
        self._attached = True
        side = self._relay.server_side
        side.connection_made(self._transport)  # aborts it if the local side is already gone
        if rest:
            side.data_received(rest)  # the endpoint may already have relayed target bytes
        self._relay.start()
        self.result.set_result(None)

    def _fail(self, code: str, message: str) -> None:
        if not self.result.done():
            self.result.set_exception(_TunnelFailed(TunnelFailure(code=code, message=message)))
        if self._transport is not None:
            with contextlib.suppress(Exception):
                self._transport.abort()
