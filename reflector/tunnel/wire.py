"""The tunnel's opening exchange (spec §3.2, tunneled mode): one frame each way, then raw bytes.

A tunnel connection is an mTLS connection with ALPN `pp-tunnel/1`. Before it carries any
iperf3 byte, the appliance sends exactly one Paramedic Link frame (spec §6.2 framing):

    {"type": "tunnel_open", "session_id": "...", "token": "..."}

and the endpoint answers with exactly one frame, either `{"type": "tunnel_ok", "request_id": 0}`
or an `error` reply (`request_id` 0, as for any error not tied to a request), then closes on
error. Everything after those two frames is the relayed byte stream, so the frame boundary has
to be found by hand: `split_first_frame` returns the payload *and* the bytes behind it, which
belong to the stream and must be forwarded, not parsed.

Pure code: bytes in, values or bytes out, no I/O and no clock.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Final

from reflector.link.frames import (
    HEADER_SIZE,
    ErrorCode,
    RemoteProtocolError,
    check_frame_length,
    decode_json,
    encode_frame,
)
from reflector.link.messages import (
    MAX_SESSION_ID_LEN,
    MAX_SESSION_TOKEN_LEN,
    UNATTRIBUTED_REQUEST_ID,
    Direction,
    ErrorResponse,
    parse_message,
    truncate_error_message,
)

__all__ = [
    "MAX_OPEN_FRAME_SIZE",
    "MAX_REPLY_FRAME_SIZE",
    "TUNNEL_OK",
    "TUNNEL_OPEN",
    "TunnelOpen",
    "TunnelReply",
    "encode_tunnel_error",
    "encode_tunnel_ok",
    "encode_tunnel_open",
    "parse_tunnel_open",
    "parse_tunnel_reply",
    "split_first_frame",
]

TUNNEL_OPEN: Final = "tunnel_open"
TUNNEL_OK: Final = "tunnel_ok"

# The largest valid tunnel_open is about 390 bytes (64-character session id, 256-character
# token, field names and quotes; the token could need \u escapes, but ours are ASCII). 1 KiB is
# ample and keeps an unauthenticated-for-this-session peer from making us buffer more.
MAX_OPEN_FRAME_SIZE: Final = 1024
# The reply is tunnel_ok (~35 bytes) or an error whose message is at most 512 characters;
# \u escapes can make that up to six bytes a character, hence 4 KiB.
MAX_REPLY_FRAME_SIZE: Final = 4096

_OPEN_FIELDS: Final = frozenset({"type", "session_id", "token"})
_OK_FIELDS: Final = frozenset({"type", "request_id"})
# Same alphabet as session ids everywhere else in the protocol (link/messages.py).
_SESSION_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]+")
# Tokens are random secrets the endpoint minted; printable ASCII covers any text encoding of
# them and keeps control characters and odd Unicode out of comparisons and logs.
_TOKEN_RE: Final = re.compile(r"[\x21-\x7e]+")
# How much of a bad value a refusal quotes back.
_SHOWN_LEN: Final = 40


@dataclass(frozen=True, kw_only=True)
class TunnelOpen:
    """The appliance's first frame: which granted session this connection belongs to."""

    session_id: str
    token: str = field(repr=False)  # a secret: never in a repr, a log or an error message


@dataclass(frozen=True, kw_only=True)
class TunnelReply:
    """The endpoint's answer: `ok`, or the refusal's `code` and `message`."""

    ok: bool
    code: str = ""
    message: str = ""


def split_first_frame(buffer: bytes, max_frame_size: int) -> tuple[bytes, bytes] | None:
    """(payload, rest) once the first frame is complete, else None; rest is stream data.

    The length is checked as soon as the header is in, with the framing layer's own rules, so
    a bad header fails before its payload is waited for.
    """
    if len(buffer) < HEADER_SIZE:
        return None
    length = int.from_bytes(buffer[:HEADER_SIZE], "big")
    check_frame_length(length, max_frame_size)
    end = HEADER_SIZE + length
    if len(buffer) < end:
        return None
    return bytes(buffer[HEADER_SIZE:end]), bytes(buffer[end:])


def encode_tunnel_open(request: TunnelOpen) -> bytes:
    frame = {"type": TUNNEL_OPEN, "session_id": request.session_id, "token": request.token}
    return encode_frame(frame, MAX_OPEN_FRAME_SIZE)


def encode_tunnel_ok() -> bytes:
    return encode_frame({"type": TUNNEL_OK, "request_id": UNATTRIBUTED_REQUEST_ID})


def encode_tunnel_error(code: str, message: str) -> bytes:
    """An `error` frame as the Link protocol defines it; the message is cut to the field limit."""
    frame = {
        "type": "error",
        "request_id": UNATTRIBUTED_REQUEST_ID,
        "code": code,
        "message": truncate_error_message(message),
    }
    return encode_frame(frame, MAX_REPLY_FRAME_SIZE)


def parse_tunnel_open(payload: bytes) -> TunnelOpen:
    """Validate the first frame strictly: exact fields, exact types, bounded strings.

    Raises RemoteProtocolError with the Link error codes (bad_json, bad_message, unknown_type,
    bad_field). Whether the session and token are *valid* is the authorizer's question.
    """
    obj = decode_json(payload)
    if not isinstance(obj, dict):
        raise RemoteProtocolError(ErrorCode.BAD_MESSAGE, "tunnel_open must be a JSON object")
    kind = obj.get("type")
    if not isinstance(kind, str):
        raise RemoteProtocolError(ErrorCode.BAD_MESSAGE, "message must have a string field 'type'")
    if kind != TUNNEL_OPEN:
        raise RemoteProtocolError(
            ErrorCode.UNKNOWN_TYPE,
            f"the first frame of a tunnel must be tunnel_open, got {_show(kind)}",
        )
    _check_fields(obj, _OPEN_FIELDS)
    session_id = _string(obj["session_id"], "session_id", MAX_SESSION_ID_LEN, _SESSION_ID_RE)
    token = _string(obj["token"], "token", MAX_SESSION_TOKEN_LEN, _TOKEN_RE, secret=True)
    return TunnelOpen(session_id=session_id, token=token)


def parse_tunnel_reply(payload: bytes) -> TunnelReply:
    """Validate the endpoint's answer: exactly tunnel_ok, or a well-formed Link `error`."""
    obj = decode_json(payload)
    if isinstance(obj, dict) and obj.get("type") == TUNNEL_OK:
        _check_fields(obj, _OK_FIELDS)
        request_id = obj["request_id"]
        if type(request_id) is not int or request_id != UNATTRIBUTED_REQUEST_ID:
            raise RemoteProtocolError(ErrorCode.BAD_FIELD, "request_id: must be 0 in tunnel_ok")
        return TunnelReply(ok=True)
    message = parse_message(obj, Direction.RESPONSE)
    if not isinstance(message, ErrorResponse):
        raise RemoteProtocolError(
            ErrorCode.UNEXPECTED_RESPONSE, f"expected tunnel_ok or error, got {message.TYPE}"
        )
    return TunnelReply(ok=False, code=message.code, message=message.message)


def _check_fields(obj: dict[str, object], expected: frozenset[str]) -> None:
    missing = sorted(expected - obj.keys())
    if missing:
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{missing[0]}: required field is missing")
    unknown = sorted(obj.keys() - expected)
    if unknown:
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{_show(unknown[0])}: unknown field")


def _string(
    value: object, name: str, max_len: int, pattern: re.Pattern[str], *, secret: bool = False
) -> str:
    if not isinstance(value, str):
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{name}: must be a string")
    if not 1 <= len(value) <= max_len:
        raise RemoteProtocolError(
            ErrorCode.BAD_FIELD, f"{name}: must be 1 to {max_len} characters long, got {len(value)}"
        )
    if pattern.fullmatch(value) is None:
        shown = "" if secret else f", got {_show(value)}"
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"{name}: has characters not allowed{shown}")
    return value


def _show(value: str) -> str:
    return repr(value if len(value) <= _SHOWN_LEN else value[:_SHOWN_LEN] + "...")
