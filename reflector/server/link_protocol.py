"""The asyncio shell around `ServerConnection`: one per authenticated `pp-link/1` connection.

A short loop in the aioquic manner: feed bytes to the sans-IO core, hand each request to the
service as its own task (requests are multiplexed), write what comes back, and keep one idle
timer. All decisions (who may do what) are the service's; this class only moves bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Protocol

from reflector.link import NEED_DATA, LocalProtocolError, ProtocolViolation, ServerConnection
from reflector.link.messages import ErrorResponse, Request, Response

_log = logging.getLogger(__name__)

# A peer whose socket stops draining must not make us buffer its answers without bound.
WRITE_BUFFER_HIGH = 256 * 1024


class CloseAfter(Exception):
    """Raised by a handler: send `response`, then close the connection."""

    def __init__(self, response: Response) -> None:
        super().__init__(response)
        self.response = response


class LinkService(Protocol):
    """What the link protocol asks of the service."""

    async def handle(self, link: LinkProtocol, request: Request) -> Response: ...

    def link_opened(self, link: LinkProtocol) -> None: ...

    def link_closed(self, link: LinkProtocol) -> None: ...

    def protocol_violation(self, link: LinkProtocol, violation: ProtocolViolation) -> bool:
        """Record a violation; True closes the connection once its reply is written."""
        ...

    def link_deadline_passed(self, link: LinkProtocol) -> None:
        """The connection's `deadline` passed and it is still not authorized."""
        ...


class LinkProtocol(asyncio.Protocol):
    """One control connection from an authenticated (not necessarily authorized) peer."""

    def __init__(
        self,
        service: LinkService,
        *,
        peer_id: str,
        source: tuple[str, int],
        max_frame_size: int,
        idle_timeout: float,
        deadline: float | None = None,
    ) -> None:
        self.service = service
        self.peer_id = peer_id
        self.source = source
        # Set by the service once the peer proved it is on the allowlist (or just paired).
        self.authorized = False
        # Our own address and port as the peer reached them (set on connection_made).
        self.local: tuple[str, int] | None = None
        self._conn = ServerConnection(max_frame_size=max_frame_size)
        self._idle_timeout = idle_timeout
        # Seconds an unauthorized peer has to become authorized (pair) before it is closed.
        self._deadline = deadline
        self._transport: asyncio.Transport | None = None
        self._idle: asyncio.TimerHandle | None = None
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False

    # --- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self.local = transport.get_extra_info("sockname")
        transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        self._arm_idle()
        if self._deadline is not None:
            loop = asyncio.get_running_loop()
            self._deadline_timer = loop.call_later(self._deadline, self._deadline_passed)
        self.service.link_opened(self)

    def data_received(self, data: bytes) -> None:
        if self._closing:
            return
        self._conn.receive_data(data)
        while not self._closing:
            event = self._conn.next_event()
            if event is NEED_DATA:
                break
            # Only a whole frame counts as activity: a peer trickling one byte at a time
            # (slowloris) does not keep its connection alive by that alone.
            self._arm_idle()
            if isinstance(event, ProtocolViolation):
                close = self.service.protocol_violation(self, event)
                self._write(event.reply)
                if event.close or close:
                    self.close()
                continue
            assert isinstance(event, Request)
            task = asyncio.get_running_loop().create_task(self._answer(event))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._idle is not None:
            self._idle.cancel()
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        for task in self._tasks:
            task.cancel()
        self.service.link_closed(self)

    # --- used by the service

    def close(self) -> None:
        """Stop reading and close once pending writes are flushed."""
        if self._closing:
            return
        self._closing = True
        if self._transport is not None:
            self._transport.close()

    def abort_with(self, code: str, message: str) -> None:
        """Tell the peer why (an unattributed error) and close: used for revocation."""
        if self._closing:
            return
        self._write_unattributed(code, message)
        self.close()

    # --- internals

    async def _answer(self, request: Request) -> None:
        close = False
        try:
            response = await self.service.handle(self, request)
        except CloseAfter as exc:
            response, close = exc.response, True
        except asyncio.CancelledError:
            raise
        except Exception:
            _log.exception("internal error answering %s from %s", request.TYPE, self.peer_id)
            response = ErrorResponse(
                request_id=request.request_id, code="internal_error", message="internal error"
            )
        if self._closing:
            return
        try:
            data = self._conn.send(response)
        except LocalProtocolError:  # a bug of ours: fail closed rather than send nonsense
            _log.exception("cannot send %s to %s", response.TYPE, self.peer_id)
            self.abort_with("internal_error", "internal error")
            return
        self._write(data)
        if close:
            self.close()

    def _write(self, data: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(data)

    def _write_unattributed(self, code: str, message: str) -> None:
        from reflector.link import encode_frame

        frame = {"type": "error", "request_id": 0, "code": code, "message": message}
        with contextlib.suppress(Exception):
            self._write(encode_frame(frame))

    def _arm_idle(self) -> None:
        if self._idle is not None:
            self._idle.cancel()
        loop = asyncio.get_running_loop()
        self._idle = loop.call_later(self._idle_timeout, self._idle_expired)

    def _deadline_passed(self) -> None:
        self._deadline_timer = None
        if not self.authorized and not self._closing:
            self.service.link_deadline_passed(self)

    def _idle_expired(self) -> None:
        if self._tasks:  # a long request (e.g. a result wait) is not idleness
            self._arm_idle()
            return
        self.abort_with("idle_timeout", f"no request for {self._idle_timeout:.0f} s")
