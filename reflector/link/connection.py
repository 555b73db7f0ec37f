"""Paramedic Link connection state machines, without I/O (the h11 shape).

Feed bytes read from the peer to `receive_data()`, then call `next_event()` until it returns
`NEED_DATA`; `send()` / `send_request()` return bytes for the caller to write. Nothing here
touches a socket, a clock or a thread, so the asyncio shell stays a short loop and the protocol
can be fuzzed.

Sequencing (the whole rule is the `_ADMITTED` table below): the first request on a connection
must be `hello`, exactly once; every other request, `pair` included, is admitted only after it.
Pairing is thus an ordinary request of an open connection: whether this peer may pair, or must
already be authorised, is the session layer's decision, not the protocol's. Requests may be
pipelined: a client may send `hello` and further requests without waiting for `server_hello`.

How the server answers a peer's mistake depends on whether the byte stream is still in sync:
- framing errors (oversized or zero-length frame): the next frame boundary is unknown, so the
  `ProtocolViolation` carries an error reply and `close=True`; the connection is finished;
- anything wrong inside a well-delimited frame (bad JSON, unknown type, bad field, sequencing,
  too many requests): an error reply echoing the request_id when it could be read, and the
  connection continues.
The client, having no one to reply to, raises `RemoteProtocolError` and stays failed.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from reflector.link.frames import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    LocalProtocolError,
    NeedDataType,
    RemoteProtocolError,
    decode_json,
    encode_frame,
)
from reflector.link.messages import (
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    REQUEST_TYPES,
    UNATTRIBUTED_REQUEST_ID,
    Direction,
    ErrorResponse,
    Hello,
    Request,
    Response,
    ServerHello,
    message_to_dict,
    parse_message,
    peek_request_id,
    response_answers,
    truncate_error_message,
    validate_outgoing,
)

# Requests a client may have outstanding on one connection. An appliance runs one test at a time
# and polls status and results alongside it, so a few suffice; 16 bounds the work one peer can
# queue on the endpoint before it must wait for answers.
MAX_IN_FLIGHT: Final = 16

# The smallest frame limit a connection accepts: an `error` reply with the longest message,
# every character escaped as \uXXXX, needs about 3.3 KB and must always fit.
MIN_CONNECTION_FRAME_SIZE: Final = 4096


class _Phase(enum.Enum):
    AWAIT_HELLO = "await_hello"
    OPEN = "open"
    CLOSED = "closed"


# Which request types each phase admits: the one place where sequencing is decided.
_ADMITTED: Final[Mapping[_Phase, frozenset[type[Request]]]] = {
    _Phase.AWAIT_HELLO: frozenset({Hello}),
    _Phase.OPEN: frozenset(REQUEST_TYPES.values()) - {Hello},
    _Phase.CLOSED: frozenset(),
}


@dataclass(frozen=True, kw_only=True)
class ProtocolViolation:
    """The client broke the protocol: write `reply` to it, then close if `close` is set."""

    code: str
    message: str
    request_id: int
    reply: bytes
    close: bool


@dataclass(frozen=True, kw_only=True)
class Reply:
    """A response, paired with the request it answers (which carries the assigned request_id)."""

    request: Request
    response: Response


@dataclass(frozen=True, kw_only=True)
class UnattributedError:
    """The server reported an error it could not tie to one of our requests (request_id 0)."""

    code: str
    message: str


def _check_limits(max_frame_size: int, max_in_flight: int) -> None:
    if max_frame_size < MIN_CONNECTION_FRAME_SIZE:
        raise LocalProtocolError(f"max_frame_size must be at least {MIN_CONNECTION_FRAME_SIZE}")
    if max_in_flight < 1:
        raise LocalProtocolError("max_in_flight must be at least 1")


class ServerConnection:
    """The endpoint's side: yields validated requests, frames validated responses."""

    def __init__(
        self, *, max_frame_size: int = MAX_FRAME_SIZE, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        _check_limits(max_frame_size, max_in_flight)
        self._decoder = FrameDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._max_in_flight = max_in_flight
        self._phase = _Phase.AWAIT_HELLO
        self._in_flight: dict[int, Request] = {}

    @property
    def closed(self) -> bool:
        """True after a violation that ends the connection: write its reply, then close."""
        return self._phase is _Phase.CLOSED

    @property
    def in_flight(self) -> Mapping[int, Request]:
        """Requests handed out by `next_event()` and not yet answered, by request_id."""
        return dict(self._in_flight)

    def receive_data(self, data: bytes) -> None:
        if self.closed:
            raise LocalProtocolError("connection is closed after a protocol violation")
        self._decoder.receive_data(data)

    def next_event(self) -> Request | ProtocolViolation | NeedDataType:
        """The next request to handle, a violation to answer, or NEED_DATA."""
        if self.closed:
            raise LocalProtocolError("connection is closed after a protocol violation")
        try:
            frame = self._decoder.next_frame()
        except RemoteProtocolError as exc:
            self._phase = _Phase.CLOSED
            return self._violation(exc.code, exc.message, UNATTRIBUTED_REQUEST_ID, close=True)
        if frame is NEED_DATA:
            return NEED_DATA
        obj: object = None
        try:
            obj = decode_json(frame)
            msg = parse_message(obj, Direction.REQUEST)
        except RemoteProtocolError as exc:
            return self._violation(exc.code, exc.message, peek_request_id(obj), close=False)
        assert isinstance(msg, Request)
        refusal = self._refusal(msg)
        if refusal is not None:
            code, reason = refusal
            return self._violation(code, reason, msg.request_id, close=False)
        if isinstance(msg, Hello):
            self._phase = _Phase.OPEN
        self._in_flight[msg.request_id] = msg
        return msg

    def send(self, response: Response) -> bytes:
        """Frame `response`, which must answer an in-flight request with a fitting type."""
        if self.closed:
            raise LocalProtocolError("connection is closed after a protocol violation")
        request = self._in_flight.get(response.request_id)
        if request is None:
            raise LocalProtocolError(f"no request {response.request_id} is awaiting a response")
        if not response_answers(request, response):
            raise LocalProtocolError(f"{response.TYPE} does not answer {request.TYPE}")
        data = encode_frame(validate_outgoing(response), self._max_frame_size)
        del self._in_flight[response.request_id]
        return data

    def _refusal(self, msg: Request) -> tuple[str, str] | None:
        """Why a well-formed request may not be handled now, or None if it may."""
        if type(msg) not in _ADMITTED[self._phase]:
            if isinstance(msg, Hello):
                return ErrorCode.DUPLICATE_HELLO, "hello was already received on this connection"
            return ErrorCode.HELLO_REQUIRED, f"the first request must be hello, not {msg.TYPE}"
        if isinstance(msg, Hello) and msg.version != PROTOCOL_VERSION:
            return (
                ErrorCode.UNSUPPORTED_VERSION,
                f"this endpoint speaks version {PROTOCOL_VERSION}, not {msg.version}",
            )
        if msg.request_id in self._in_flight:
            return (
                ErrorCode.DUPLICATE_REQUEST_ID,
                f"request {msg.request_id} is still awaiting its response",
            )
        if len(self._in_flight) >= self._max_in_flight:
            return (
                ErrorCode.TOO_MANY_REQUESTS,
                f"at most {self._max_in_flight} requests may await a response",
            )
        return None

    def _violation(
        self, code: str, message: str, request_id: int, *, close: bool
    ) -> ProtocolViolation:
        message = truncate_error_message(message)
        error = ErrorResponse(request_id=request_id, code=code, message=message)
        reply = encode_frame(message_to_dict(error), self._max_frame_size)
        return ProtocolViolation(
            code=code, message=message, request_id=request_id, reply=reply, close=close
        )


class ClientConnection:
    """The appliance's side: assigns request_ids, matches responses to pending requests."""

    def __init__(
        self, *, max_frame_size: int = MAX_FRAME_SIZE, max_in_flight: int = MAX_IN_FLIGHT
    ) -> None:
        _check_limits(max_frame_size, max_in_flight)
        self._decoder = FrameDecoder(max_frame_size)
        self._max_frame_size = max_frame_size
        self._max_in_flight = max_in_flight
        self._phase = _Phase.AWAIT_HELLO
        self._pending: dict[int, Request] = {}
        self._last_request_id = 0
        self._error: RemoteProtocolError | None = None

    @property
    def last_request_id(self) -> int:
        """The request_id that the latest `send_request()` assigned (0 before any)."""
        return self._last_request_id

    @property
    def pending(self) -> Mapping[int, Request]:
        """Requests sent and not yet answered, by request_id."""
        return dict(self._pending)

    def send_request(self, msg: Request) -> bytes:
        """Assign `msg` a fresh request_id (see `last_request_id`), record it, and frame it."""
        if self._error is not None:
            raise LocalProtocolError("connection has failed; open a new one")
        if type(msg) not in _ADMITTED[self._phase]:
            raise LocalProtocolError(f"{msg.TYPE} is not allowed now: hello comes first, once")
        if len(self._pending) >= self._max_in_flight:
            raise LocalProtocolError(f"{self._max_in_flight} requests are already in flight")
        msg = dataclasses.replace(msg, request_id=self._allocate_request_id())
        data = encode_frame(validate_outgoing(msg), self._max_frame_size)
        if isinstance(msg, Hello):
            self._phase = _Phase.OPEN
        self._pending[msg.request_id] = msg
        self._last_request_id = msg.request_id
        return data

    def receive_data(self, data: bytes) -> None:
        if self._error is not None:
            raise LocalProtocolError("connection has failed; open a new one")
        self._decoder.receive_data(data)

    def next_event(self) -> Reply | UnattributedError | NeedDataType:
        """The next response matched to its request, or NEED_DATA; RemoteProtocolError if the
        server breaks the protocol (the connection then stays failed and re-raises)."""
        if self._error is not None:
            raise self._error
        try:
            return self._next_event()
        except RemoteProtocolError as exc:
            self._error = exc
            raise

    def _next_event(self) -> Reply | UnattributedError | NeedDataType:
        frame = self._decoder.next_frame()
        if frame is NEED_DATA:
            return NEED_DATA
        msg = parse_message(decode_json(frame), Direction.RESPONSE)
        assert isinstance(msg, Response)
        if isinstance(msg, ErrorResponse) and msg.request_id == UNATTRIBUTED_REQUEST_ID:
            return UnattributedError(code=msg.code, message=msg.message)
        request = self._pending.get(msg.request_id)
        if request is None:
            raise RemoteProtocolError(
                ErrorCode.UNSOLICITED_RESPONSE, f"no request {msg.request_id} is pending"
            )
        if not response_answers(request, msg):
            raise RemoteProtocolError(
                ErrorCode.UNEXPECTED_RESPONSE, f"{msg.TYPE} does not answer {request.TYPE}"
            )
        if isinstance(msg, ServerHello) and msg.version != PROTOCOL_VERSION:
            raise RemoteProtocolError(
                ErrorCode.UNSUPPORTED_VERSION,
                f"server speaks version {msg.version}, this client {PROTOCOL_VERSION}",
            )
        del self._pending[msg.request_id]
        return Reply(request=request, response=msg)

    def _allocate_request_id(self) -> int:
        # Count upwards, wrapping within 1..MAX_REQUEST_ID and skipping ids still pending;
        # terminates because fewer than max_in_flight ids are pending.
        candidate = self._last_request_id
        while True:
            candidate = candidate % MAX_REQUEST_ID + 1
            if candidate not in self._pending:
                return candidate
