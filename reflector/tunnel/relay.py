"""A bidirectional byte relay between two asyncio transports, with flow control and counters.

Built on `asyncio.Protocol` callbacks rather than Streams: PERFORMANCE.md measured the Protocol
API with pause/resume_reading 1.4-1.6x faster through a TLS tunnel, because no coroutine is
resumed per chunk. Each transport gets one `RelaySide` protocol; the two sides of a `Relay` know
each other, and every chunk one side reads is written straight to the other side's transport.

Flow control: when a side's transport buffers more than `WRITE_HIGH_WATER` bytes (its peer
reads slower than we receive), asyncio calls that side's `pause_writing()` and the relay stops
reading the *other* transport until `resume_writing()`. So a relay holds at most about one
high-water mark plus one read chunk per direction, whatever the two ends do.

Naming: the two sides are named after the iperf3 roles they face. The `client` side faces the
iperf3 client (on the endpoint: the TLS tunnel; on the appliance: the local TCP connection),
the `server` side faces the iperf3 server. `upstream` bytes travel client → server, whatever
the test's direction (`-R` only changes which way the bulk flows).

Counting: bytes are counted as they are handed to the outgoing transport, on the data plane
itself, never taken from a peer's report (spec §8 accounting). Bytes still buffered when a relay
is aborted were counted but may not have reached the far end: at most one high-water mark.

Half-close: an EOF on one side becomes `write_eof()` on the other when both transports support
it (plain TCP). TLS transports cannot: Python's asyncio answers a TLS EOF with a full shutdown
and has no `write_eof` for TLS, so when either side is TLS an EOF closes the whole relay, each
transport first flushing what it has buffered (`close()`, not `abort()`). iperf3 never relies on
half-closed sockets, so nothing is lost.

Closing: when either side closes, the other is closed gracefully; if a peer does not drain its
buffer within `CLOSE_GRACE` the relay aborts it. `stop()` (session expiry) aborts both at once.

Before `start()`: a side's transport is paused in `connection_made`, but Python before 3.11.4
(Debian 12 ships 3.11.2) ignores a `pause_reading()` made there on a plain TCP transport
(CPython gh-103607) and reads anyway. So bytes that arrive before `start()` (iperf3's cookie,
sent the moment it connects, while the tunnel is still being opened) are held, at most
`MAX_HELD_BYTES`, and written out by `start()` ahead of anything read later; dropping them
would leave iperf3's server waiting for a cookie that never comes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

__all__ = [
    "CLOSE_GRACE",
    "MAX_HELD_BYTES",
    "WRITE_HIGH_WATER",
    "WRITE_LOW_WATER",
    "Relay",
    "RelayClosed",
    "RelaySide",
    "TunnelCounters",
]

# Per-direction write buffer limits. 256 KiB is what asyncio reads in one call (its TCP and TLS
# read size), so the buffer can take a whole chunk without pausing at once; PERFORMANCE.md
# measured the relay at this size (64 KiB, asyncio's TCP default, costs throughput).
WRITE_HIGH_WATER: Final = 256 * 1024
# Resume at a quarter: the buffer still holds enough to keep the socket busy while the other
# side's next read arrives, without a pause/resume cycle per chunk.
WRITE_LOW_WATER: Final = 64 * 1024
# Bytes a side may hold before `start()` (see the module docstring). iperf3 sends 37 bytes and
# waits; a local process that sends more than a write buffer's worth before the tunnel is open is
# not iperf3, and its relay is stopped rather than allowed to grow.
MAX_HELD_BYTES: Final = WRITE_HIGH_WATER
# A graceful close waits for buffered bytes to drain; a peer that stopped reading must not
# hold the connection open forever. 10 s drains a full buffer over any working link.
CLOSE_GRACE: Final = 10.0


class TunnelCounters:
    """The data-plane ledger of one session: bytes each way and the relays now open.

    One instance per session, shared by every tunnel connection of that session (iperf3 opens
    a control connection plus one per stream), so the totals aggregate across them. The live
    set lets expiry stop them all (`stop_all`) and lets a server cap them (`open_connections`).
    """

    __slots__ = ("_live", "connections_opened", "downstream_bytes", "upstream_bytes")

    def __init__(self) -> None:
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self.connections_opened = 0
        self._live: set[Relay] = set()

    @property
    def open_connections(self) -> int:
        return len(self._live)

    @property
    def live(self) -> frozenset[Relay]:
        return frozenset(self._live)

    def stop_all(self) -> None:
        """Abort every live relay of this session (expiry, revocation, shutdown)."""
        for relay in list(self._live):
            relay.stop()


@dataclass(frozen=True, kw_only=True)
class RelayClosed:
    """What one relay carried, reported once when both of its transports are gone."""

    upstream_bytes: int
    downstream_bytes: int
    stopped: bool  # ended by `stop()` rather than by its ends
    error: str | None  # the first transport error seen, if any


class RelaySide(asyncio.Protocol):
    """The protocol of one transport in a relay; owners may also call these methods directly.

    Reading starts paused: a side only reads once `Relay.start()` has seen both transports, so
    no byte can arrive before there is somewhere to put it (or before a handshake reply).
    """

    def __init__(self, relay: Relay, *, upstream: bool) -> None:
        self._relay = relay
        self._upstream = upstream  # this side reads the upstream direction
        self.peer: RelaySide  # set by Relay right after construction
        self.transport: asyncio.Transport | None = None
        self.lost = False
        self.eof = False
        self.write_paused = False
        self.held = bytearray()  # read before start(), for start() to write out

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        if self._relay.closing:
            transport.abort()
            return
        transport.pause_reading()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        _set_nodelay(transport)

    def data_received(self, data: bytes) -> None:
        if not self._relay.started and not self._relay.closing:
            self.held += data
            if len(self.held) > MAX_HELD_BYTES:
                self._relay.stop()
            return
        self._deliver(data)

    def _deliver(self, data: bytes) -> None:
        out = self.peer.transport
        if out is None or out.is_closing():
            return  # the relay is closing: nothing more can be delivered
        out.write(data)
        self._relay.count(self._upstream, len(data))

    def flush_held(self) -> None:
        """Write out what arrived before `start()` (called by it, before any later read)."""
        held, self.held = bytes(self.held), bytearray()
        if held:
            self._deliver(held)

    def eof_received(self) -> bool:
        self.eof = True
        mine, out = self.transport, self.peer.transport
        half_close = (
            mine is not None
            and out is not None
            and not out.is_closing()
            and mine.can_write_eof()
            and out.can_write_eof()
        )
        if not half_close or out is None:
            self._relay.close()
            return False
        out.write_eof()
        if self.peer.eof:
            self._relay.close()  # both directions have ended
        return True  # keep our own write direction open for the peer's remaining bytes

    def pause_writing(self) -> None:
        self.write_paused = True
        self.peer.set_reading(False)

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._relay.started:
            self.peer.set_reading(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self._relay.side_lost(exc)

    def set_reading(self, on: bool) -> None:
        transport = self.transport
        # After an EOF a TCP transport must stay paused or unpaused as it is: resuming would
        # read the EOF again and report it twice.
        if transport is None or transport.is_closing() or self.eof:
            return
        if on:
            transport.resume_reading()
        else:
            transport.pause_reading()

    @property
    def done(self) -> bool:
        """True once this side's transport is gone or, while closing, was never attached."""
        return self.lost or self.transport is None


class Relay:
    """Two `RelaySide` protocols joined back to back; see the module docstring.

    Owners attach transports to `client_side` and `server_side` (as the protocol of a new
    connection, or by calling `connection_made` themselves), then call `start()`. The relay
    registers with `counters` at once, so it counts toward the session's open connections
    even while its second transport is still connecting.
    """

    def __init__(
        self,
        counters: TunnelCounters,
        *,
        on_close: Callable[[RelayClosed], None] | None = None,
    ) -> None:
        self.counters = counters
        self.upstream_bytes = 0
        self.downstream_bytes = 0
        self.client_side = RelaySide(self, upstream=True)
        self.server_side = RelaySide(self, upstream=False)
        self.client_side.peer = self.server_side
        self.server_side.peer = self.client_side
        self.started = False
        self.closing = False
        self._stopped = False
        self._finished = False
        self._error: str | None = None
        self._on_close = on_close
        self._grace: asyncio.TimerHandle | None = None
        counters._live.add(self)
        counters.connections_opened += 1

    def count(self, upstream: bool, nbytes: int) -> None:
        if upstream:
            self.upstream_bytes += nbytes
            self.counters.upstream_bytes += nbytes
        else:
            self.downstream_bytes += nbytes
            self.counters.downstream_bytes += nbytes

    def start(self) -> None:
        """Begin reading both transports (each unless the other is over its high-water mark)."""
        if self.closing or self.started:
            return
        if self.client_side.transport is None or self.server_side.transport is None:
            raise RuntimeError("Relay.start() needs both transports attached")
        self.started = True
        for side in (self.client_side, self.server_side):
            side.flush_held()
        for side in (self.client_side, self.server_side):
            if not side.peer.write_paused:
                side.set_reading(True)

    def close(self) -> None:
        """Close both transports gracefully: each flushes its buffer first (`CLOSE_GRACE`)."""
        if self.closing:
            return
        self.closing = True
        for side in (self.client_side, self.server_side):
            if side.transport is not None and not side.lost:
                side.transport.close()
        if not self._maybe_finish():
            loop = asyncio.get_running_loop()
            self._grace = loop.call_later(CLOSE_GRACE, self.stop)

    def stop(self) -> None:
        """Abort both transports now, dropping buffered bytes (session expiry)."""
        if self._finished:
            return
        self._stopped = True
        self.closing = True
        for side in (self.client_side, self.server_side):
            if side.transport is not None and not side.lost:
                side.transport.abort()
        self._maybe_finish()

    def side_lost(self, exc: Exception | None) -> None:
        if exc is not None and self._error is None:
            self._error = f"{type(exc).__name__}: {exc}"
        self.close()
        self._maybe_finish()

    def _maybe_finish(self) -> bool:
        """Report once, when closing and neither transport is still open."""
        if self._finished:
            return True
        if not (self.closing and self.client_side.done and self.server_side.done):
            return False
        self._finished = True
        if self._grace is not None:
            self._grace.cancel()
        self.counters._live.discard(self)
        if self._on_close is not None:
            self._on_close(
                RelayClosed(
                    upstream_bytes=self.upstream_bytes,
                    downstream_bytes=self.downstream_bytes,
                    stopped=self._stopped,
                    error=self._error,
                )
            )
        return True


def _set_nodelay(transport: asyncio.BaseTransport) -> None:
    """TCP_NODELAY: iperf3's small control messages must not wait on Nagle + delayed ACK.

    asyncio's own TCP transports already set it; other event loops may not. A TLS transport
    passes the request for its socket through to the TCP transport below it.
    """
    sock = transport.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
