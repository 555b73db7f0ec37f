"""The asyncio shell of the control port: accept, admit, TLS, then hand over by ALPN.

Order of defences for every TCP connection (spec §5, §9.2):
1. `AdmissionGate`: total and per-source connection caps and a handshake rate per source,
   decided before any TLS work, so a flood costs us an accept and a close.
2. TLS 1.3 mutual handshake bounded by `handshake_timeout_sec`.
3. The peer's ID from the public key in its certificate (never from a name in it).
4. ALPN picks the protocol: `pp-link/1` → `LinkProtocol` (RPC), `pp-tunnel/1` → the tunnel
   relay. Authorization of the ID happens there, per request, against the live allowlist.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import time
from asyncio import sslproto
from collections.abc import Callable
from typing import Protocol

from reflector.access.gate import AdmissionGate
from reflector.certificate import BadCertificate
from reflector.config import NetworkConfig, parse_address
from reflector.link import encode_frame
from reflector.tls import ALPN_HTTP, ALPN_LINK, ALPN_TUNNEL, AlertingSSLProtocol, peer_id_of

_log = logging.getLogger(__name__)

# Kernel accept queue (capped by net.core.somaxconn): large enough that a burst of connects is
# accepted and judged by the gate at once instead of waiting for SYN retransmits.
LISTEN_BACKLOG = 1024
# asyncio's TLS protocol allocates its read buffer (256 KiB by default) for every connection at
# accept time: 1,000 strangers in their handshake would cost 256 MB. Until a peer has proved a
# key, one TLS record (16 KiB + overhead) at a time is plenty; tunnels get the large buffer
# back once authenticated, because bulk relaying reads in big chunks.
PRE_AUTH_READ_BUFFER = 20 * 1024
TUNNEL_READ_BUFFER = 256 * 1024


class ConnectionHandler(Protocol):
    """What the listener hands an authenticated TLS connection to."""

    def link_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol: ...

    def tunnel_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol: ...

    def http_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol: ...

    def connection_denied(self, source: str, reason: str, peer_id: str | None) -> None: ...


class _GatedTLS(AlertingSSLProtocol):
    """asyncio's TLS server protocol, behind the admission gate and with a bounded handshake.

    `connection_made` (raw TCP, before any TLS work) asks the gate; a refused connection is
    aborted at once. The gate slot is released when the connection is lost, however it ends.
    """

    max_size = PRE_AUTH_READ_BUFFER

    def __init__(self, listener: Listener) -> None:
        self._listener = listener
        self._source: str | None = None
        self._raw: asyncio.Transport | None = None
        super().__init__(
            asyncio.get_running_loop(),
            _Dispatch(listener, self),
            listener.ssl_context,
            None,  # type: ignore[arg-type]  # no waiter: nobody awaits a server connection
            server_side=True,
            ssl_handshake_timeout=listener.handshake_timeout,  # type: ignore[arg-type]
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        refusal = self._listener.admit(source)
        if refusal is not None:
            assert isinstance(transport, asyncio.Transport)
            transport.abort()
            self._listener.handler.connection_denied(source, refusal, None)
            return
        self._source = source
        assert isinstance(transport, asyncio.Transport)
        self._raw = transport
        self._listener.live.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().connection_made(transport)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None and self._source is not None:
            reason = _handshake_reason(handshake_exc)
            self._listener.handler.connection_denied(self._source, reason, None)
        super()._on_handshake_complete(handshake_exc)

    def _check_handshake_timeout(self) -> None:
        # asyncio aborts a handshake that outlives the timeout without calling
        # _on_handshake_complete, so the refusal would go unaudited: report it here.
        state = self._state  # type: ignore[attr-defined]  # asyncio private, as above
        if state == sslproto.SSLProtocolState.DO_HANDSHAKE and self._source is not None:
            self._listener.handler.connection_denied(self._source, "handshake_timeout", None)
        super()._check_handshake_timeout()

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._source is None:
            return  # refused by the gate: TLS never started
        self._listener.release(self._source)
        self._listener.live.discard(self)
        self._source = None
        super().connection_lost(exc)

    def abort(self) -> None:
        """Drop the connection now (shutdown)."""
        if self._raw is not None:
            self._raw.abort()


class _Dispatch(asyncio.Protocol):
    """The application side of a fresh TLS connection: identify the peer, route by ALPN."""

    def __init__(self, listener: Listener, tls: _GatedTLS) -> None:
        self._listener = listener
        self._tls = tls
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._inner = self._listener.route(transport)
        ssl_object = transport.get_extra_info("ssl_object")
        if self._inner is not None and ssl_object.selected_alpn_protocol() == ALPN_TUNNEL:
            # Per instance on purpose (typeshed calls it a class variable); grows at the next read.
            self._tls.max_size = TUNNEL_READ_BUFFER  # type: ignore[misc]
        if self._inner is not None:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)


class Listener:
    """Binds the control port(s) and runs every connection through the defences above."""

    def __init__(
        self,
        net: NetworkConfig,
        ssl_context: ssl.SSLContext,
        handler: ConnectionHandler,
        *,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ssl_context = ssl_context
        self.handler = handler
        self.handshake_timeout = float(net.handshake_timeout_sec)
        self._net = net
        self._gate = AdmissionGate(
            max_connections=net.max_connections,
            max_per_source=net.max_connections_per_source,
            handshakes_per_sec=net.max_handshakes_per_sec_per_source,
        )
        self._servers: list[asyncio.Server] = []
        self._clock = clock or time.monotonic
        self.live: set[_GatedTLS] = set()

    @property
    def open_connections(self) -> int:
        return self._gate.open_connections

    async def start(self, addresses: list[str] | None = None) -> list[tuple[str, int]]:
        """Bind every listen address; return what was bound (port 0 resolved)."""
        loop = asyncio.get_running_loop()
        bound: list[tuple[str, int]] = []
        for text in addresses or self._net.listen_address:
            host, port = parse_address(text, allow_ephemeral=True)
            server = await loop.create_server(
                lambda: _GatedTLS(self),
                host=host,
                port=port,
                backlog=LISTEN_BACKLOG,
                reuse_address=True,
            )
            self._servers.append(server)
            for sock in server.sockets:
                addr = sock.getsockname()
                bound.append((addr[0], addr[1]))
        return bound

    async def close(self) -> None:
        """Stop accepting, then drop every connection still open (handshaking or not)."""
        for server in self._servers:
            server.close()
        for conn in list(self.live):
            conn.abort()
        await asyncio.sleep(0)  # let connection_lost callbacks run
        for server in self._servers:
            await server.wait_closed()

    def admit(self, source: str) -> str | None:
        return self._gate.admit(source, self._clock())

    def release(self, source: str) -> None:
        self._gate.release(source)

    def route(self, tls: asyncio.Transport) -> asyncio.Protocol | None:
        """Identify the peer by its key and pick the protocol by ALPN; None if refused."""
        peer = tls.get_extra_info("peername")
        source = (str(peer[0]), int(peer[1]))
        ssl_object = tls.get_extra_info("ssl_object")
        try:
            peer_id = peer_id_of(ssl_object)
        except BadCertificate as exc:
            _refuse(tls, "bad_certificate", str(exc))
            self.handler.connection_denied(source[0], "bad_certificate", None)
            return None
        alpn = ssl_object.selected_alpn_protocol()
        if alpn == ALPN_LINK:
            return self.handler.link_protocol(peer_id, source)
        if alpn == ALPN_TUNNEL:
            return self.handler.tunnel_protocol(peer_id, source)
        if alpn == ALPN_HTTP:
            return self.handler.http_protocol(peer_id, source)
        _refuse(tls, "bad_alpn", f"ALPN must be {ALPN_LINK}, {ALPN_TUNNEL} or {ALPN_HTTP}")
        self.handler.connection_denied(source[0], "bad_alpn", peer_id)
        return None


def _refuse(tls: asyncio.Transport, code: str, message: str) -> None:
    """Send one error frame (request_id 0: not tied to a request) and close."""
    frame = {"type": "error", "request_id": 0, "code": code, "message": message}
    with contextlib.suppress(Exception):
        tls.write(encode_frame(frame))
    tls.close()


def _handshake_reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "handshake_timeout"
    if isinstance(exc, ssl.SSLError):
        text = (exc.reason or str(exc)).lower()
        if "certificate" in text or "peer did not return" in text:
            return "bad_certificate"
        if "version" in text or "protocol" in text:
            return "bad_tls_version"
        return "tls_error"
    return "connection_error"
