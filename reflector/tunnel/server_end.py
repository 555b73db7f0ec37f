"""The endpoint's end of a tunnel: one authenticated TLS connection → one local TCP connection.

The listener has already done the TLS handshake and computed the peer's ID from its key; this
protocol takes over from there (`ConnectionHandler.tunnel_protocol` in server/listener.py):

1. Read exactly one frame, `tunnel_open` (wire.py), within `first_frame_timeout`; anything
   malformed is refused with the Link error code that says why.
2. Ask `authorize(peer_id, session_id, token)`. It belongs to the session manager: it checks
   that this peer owns that live session and that the token matches (in constant time), and
   answers with a `TunnelGrant` (where to connect, the session's counters, a stream cap) or
   raises `TunnelRefused(code, message)`.
3. Check the session's cap on simultaneous tunnel connections, connect to the grant's target
   (bounded by `CONNECT_TIMEOUT`), send `tunnel_ok`, forward any bytes that followed the first
   frame, and relay (relay.py) until either end closes or the session's counters stop it.

A refusal is one `error` frame followed by a close; no target connection is made before
authorization succeeds. Reading from the tunnel stays paused between the first frame and
`tunnel_ok`, so a peer cannot make us buffer more than one read chunk meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final, TypeAlias

from reflector.errors import ReflectorError
from reflector.link.frames import RemoteProtocolError
from reflector.tunnel.relay import Relay, RelayClosed, TunnelCounters
from reflector.tunnel.wire import (
    MAX_OPEN_FRAME_SIZE,
    encode_tunnel_error,
    encode_tunnel_ok,
    parse_tunnel_open,
    split_first_frame,
)

__all__ = [
    "AUTHORIZE_TIMEOUT",
    "CONNECT_TIMEOUT",
    "FIRST_FRAME_TIMEOUT",
    "IPERF3_EXTRA_CONNECTIONS",
    "Authorizer",
    "TunnelGrant",
    "TunnelRefusal",
    "TunnelRefused",
    "TunnelServerProtocol",
    "connections_for_streams",
]

_log = logging.getLogger(__name__)

# The appliance sends tunnel_open right after the handshake, so one round trip is all it needs;
# 10 s (the handshake's own bound) caps how long a silent peer holds a connection slot.
FIRST_FRAME_TIMEOUT: Final = 10.0
# The authorizer is in-process bookkeeping; if it has not answered in 5 s something is wrong,
# and the peer gets a refusal instead of a hung connection.
AUTHORIZE_TIMEOUT: Final = 5.0
# The target is a local iperf3 server that the session manager has just started: a connect
# either succeeds in microseconds or the server is not (yet) listening.
CONNECT_TIMEOUT: Final = 5.0
# iperf3 opens one control connection besides its data streams; one more leaves room for a
# stream whose close is still in flight when a retry connects.
IPERF3_EXTRA_CONNECTIONS: Final = 2


def connections_for_streams(streams: int) -> int:
    """The tunnel connection cap for an iperf3 test with `streams` parallel streams."""
    return streams + IPERF3_EXTRA_CONNECTIONS


class TunnelRefused(ReflectorError):
    """Raised by an authorizer: the peer gets `code` and `message` in an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, kw_only=True)
class TunnelGrant:
    """What an authorizer answers for an accepted tunnel connection."""

    target: tuple[str, int]  # the local iperf3 server, e.g. ("127.0.0.1", 5201)
    counters: TunnelCounters  # the session's ledger, shared by all its tunnel connections
    max_connections: int  # simultaneous tunnel connections allowed for the session
    on_close: Callable[[RelayClosed], None] | None = None  # once per connection, at its end


@dataclass(frozen=True, kw_only=True)
class TunnelRefusal:
    """A refused tunnel connection, for the audit log (the token is never included)."""

    peer_id: str
    source: tuple[str, int]
    session_id: str | None  # None when the first frame could not be read
    code: str
    message: str


Authorizer: TypeAlias = Callable[[str, str, str], Awaitable[TunnelGrant] | TunnelGrant]


class TunnelServerProtocol(asyncio.Protocol):
    """The protocol of one `pp-tunnel/1` connection on the endpoint (see the module docstring).

    Every event is handled here until the tunnel is open, then forwarded to the relay's
    client side, which owns the TLS transport from then on.
    """

    def __init__(
        self,
        peer_id: str,
        source: tuple[str, int],
        authorize: Authorizer,
        *,
        max_first_frame: int = MAX_OPEN_FRAME_SIZE,
        first_frame_timeout: float = FIRST_FRAME_TIMEOUT,
        on_refused: Callable[[TunnelRefusal], None] | None = None,
    ) -> None:
        self.peer_id = peer_id
        self.source = source
        self._authorize = authorize
        self._max_first_frame = max_first_frame
        self._first_frame_timeout = first_frame_timeout
        self._on_refused = on_refused
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._relay: Relay | None = None
        self._session_id: str | None = None
        self._done = False  # refused, failed or lost before the relay took over

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._first_frame_timeout, self._first_frame_timed_out)

    def data_received(self, data: bytes) -> None:
        if self._relay is not None and self._relay.started:
            self._relay.client_side.data_received(data)
        elif self._done:
            return
        elif self._task is None:
            self._buffer += data
            self._try_first_frame()
        else:
            # Reading is paused while the tunnel opens, but a chunk already being delivered
            # may still land here; it is stream data and goes out right after tunnel_ok.
            self._buffer += data

    def eof_received(self) -> bool | None:
        if self._relay is not None:
            return self._relay.client_side.eof_received()
        return None  # closed before the tunnel opened: let the transport close

    def pause_writing(self) -> None:
        if self._relay is not None:
            self._relay.client_side.pause_writing()

    def resume_writing(self) -> None:
        if self._relay is not None:
            self._relay.client_side.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        self._done = True
        self._cancel_timer()
        if self._task is not None and not self._task.done():
            self._task.cancel()
        if self._relay is not None:
            self._relay.client_side.connection_lost(exc)

    # the opening

    def _try_first_frame(self) -> None:
        try:
            split = split_first_frame(bytes(self._buffer), self._max_first_frame)
            if split is None:
                return
            payload, rest = split
            request = parse_tunnel_open(payload)
        except RemoteProtocolError as exc:
            self._refuse(exc.code, exc.message)
            return
        self._cancel_timer()
        self._buffer = bytearray(rest)
        self._session_id = request.session_id
        assert self._transport is not None
        self._transport.pause_reading()  # nothing more until the tunnel is open
        self._task = asyncio.get_running_loop().create_task(
            self._open(request.session_id, request.token)
        )

    async def _open(self, session_id: str, token: str) -> None:
        try:
            grant = await self._get_grant(session_id, token)
        except TunnelRefused as exc:
            self._refuse(exc.code, exc.message)
            return
        if grant.counters.open_connections >= grant.max_connections:
            self._refuse(
                "too_many_connections",
                f"session {session_id} already has {grant.max_connections} tunnel connections",
            )
            return
        # No await between the cap check and this registration: the count cannot race.
        relay = Relay(grant.counters, on_close=grant.on_close)
        self._relay = relay
        assert self._transport is not None
        relay.client_side.connection_made(self._transport)
        await self._connect_and_start(relay, grant.target)

    async def _get_grant(self, session_id: str, token: str) -> TunnelGrant:
        try:
            async with asyncio.timeout(AUTHORIZE_TIMEOUT):
                answer = self._authorize(self.peer_id, session_id, token)
                if inspect.isawaitable(answer):
                    answer = await answer
        except TimeoutError:
            raise TunnelRefused("internal_error", "authorization timed out") from None
        except TunnelRefused:
            raise
        except Exception:
            _log.exception("tunnel authorizer failed for session %s", session_id)
            raise TunnelRefused("internal_error", "authorization failed") from None
        if not isinstance(answer, TunnelGrant):
            raise TunnelRefused("internal_error", "authorization returned no grant")
        return answer

    async def _connect_and_start(self, relay: Relay, target: tuple[str, int]) -> None:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT):
                await loop.create_connection(lambda: relay.server_side, target[0], target[1])
        except (OSError, TimeoutError) as exc:
            reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
            self._refuse("target_unreachable", f"the test server is not reachable: {reason}")
            relay.close()  # the TLS side flushes the error frame, then closes
            return
        if relay.closing:
            return  # the tunnel went away (or the session was stopped) while connecting
        assert self._transport is not None
        self._transport.write(encode_tunnel_ok())
        early, self._buffer = bytes(self._buffer), bytearray()
        if early:
            relay.client_side.data_received(early)
        relay.start()

    def _first_frame_timed_out(self) -> None:
        self._timer = None
        self._refuse("open_timeout", f"no tunnel_open within {self._first_frame_timeout:g} s")

    def _refuse(self, code: str, message: str) -> None:
        """Send one error frame and close; the relay (if any) is closed by the caller."""
        if self._done:
            return
        self._done = True
        self._cancel_timer()
        transport = self._transport
        if transport is not None and not transport.is_closing():
            with contextlib.suppress(Exception):
                transport.write(encode_tunnel_error(code, message))
            transport.close()
        if self._on_refused is not None:
            self._on_refused(
                TunnelRefusal(
                    peer_id=self.peer_id,
                    source=self.source,
                    session_id=self._session_id,
                    code=code,
                    message=message,
                )
            )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
