"""Paramedic Link framing (spec §6.2): a u32 big-endian length, then a UTF-8 JSON object.

This is the bottom layer of the protocol and does no I/O: bytes go in with
`FrameDecoder.receive_data()`, whole payloads come out of `next_frame()`, and `encode_frame()`
turns an object into bytes to write. The two error types live here because every layer above
raises them: `RemoteProtocolError` when the peer broke the protocol, `LocalProtocolError` when
our own code misused the API (a bug, so it is not a `ReflectorError`).

Safety (spec §6.1, "bounded allocations"): a frame's length is checked against the maximum as
soon as its 4-byte header has arrived, before a single byte of its payload is kept, so a peer
cannot make us buffer more than one maximum-sized frame.
"""

from __future__ import annotations

import enum
import json
import math
from collections import deque
from collections.abc import Mapping
from typing import Final, Literal, TypeAlias

from reflector.errors import ReflectorError

# The length prefix: an unsigned 32-bit big-endian integer (spec §6.2).
HEADER_SIZE: Final = 4

# Control messages are small (the largest is a status snapshot listing a handful of sessions);
# 64 KiB leaves two orders of magnitude of headroom while capping what one peer can make us hold.
MAX_FRAME_SIZE: Final = 64 * 1024

# The u32 length prefix cannot announce more than this, so no decoder limit may exceed it.
_LARGEST_ENCODABLE_LENGTH: Final = 2**32 - 1


class ErrorCode(enum.StrEnum):
    """The `code` of every error this layer produces; they travel in `error` replies."""

    # Framing: the byte stream cannot be resynchronised, so the connection must close.
    FRAME_TOO_LARGE = "frame_too_large"
    BAD_FRAME = "bad_frame"
    # Content of a well-formed frame: the connection can continue.
    BAD_JSON = "bad_json"
    BAD_MESSAGE = "bad_message"
    UNKNOWN_TYPE = "unknown_type"
    BAD_FIELD = "bad_field"
    # Sequencing, checked by the connection state machines.
    HELLO_REQUIRED = "hello_required"
    DUPLICATE_HELLO = "duplicate_hello"
    UNSUPPORTED_VERSION = "unsupported_version"
    DUPLICATE_REQUEST_ID = "duplicate_request_id"
    TOO_MANY_REQUESTS = "too_many_requests"
    UNSOLICITED_RESPONSE = "unsolicited_response"
    UNEXPECTED_RESPONSE = "unexpected_response"


class RemoteProtocolError(ReflectorError):
    """The peer sent something the protocol forbids; `code` says what kind, `message` says why.

    A `ReflectorError` because it is an expected failure with a one-line reason for the operator.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class LocalProtocolError(Exception):
    """Our own code tried something the protocol forbids (a bug: it keeps its traceback)."""


class NeedData(enum.Enum):
    """Type of the `NEED_DATA` sentinel (an enum so that mypy narrows `is NEED_DATA` checks)."""

    NEED_DATA = "NEED_DATA"


NEED_DATA: Final = NeedData.NEED_DATA
NeedDataType: TypeAlias = Literal[NeedData.NEED_DATA]


def encode_frame(obj: Mapping[str, object], max_frame_size: int = MAX_FRAME_SIZE) -> bytes:
    """Serialise `obj` as one frame; refuse (LocalProtocolError) what the peer would refuse.

    ASCII-only JSON: a string holding a lone surrogate (which a peer can legally send us as a
    `\\ud800` escape and we may echo in an error) still encodes, and the payload is valid UTF-8.
    """
    if not isinstance(obj, Mapping):
        raise LocalProtocolError(f"a frame payload must be a JSON object, not {type(obj).__name__}")
    try:
        text = json.dumps(dict(obj), ensure_ascii=True, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise LocalProtocolError(f"payload is not serialisable as JSON: {exc}") from exc
    payload = text.encode("ascii")
    if len(payload) > max_frame_size:
        raise LocalProtocolError(
            f"payload of {len(payload)} bytes exceeds the maximum frame size {max_frame_size}"
        )
    return len(payload).to_bytes(HEADER_SIZE, "big") + payload


def check_frame_length(length: int, max_frame_size: int) -> None:
    """Raise the peer error for a frame header announcing `length` bytes, if it is not allowed.

    Separate so that `trace` applies exactly the rules of the decoder.
    """
    if length == 0:
        raise RemoteProtocolError(ErrorCode.BAD_FRAME, "zero-length frame")
    if length > max_frame_size:
        raise RemoteProtocolError(
            ErrorCode.FRAME_TOO_LARGE,
            f"frame header announces {length} bytes, the maximum is {max_frame_size}",
        )


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # Duplicate keys make a message mean different things to different parsers: refuse them.
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"duplicate key {key[:32]!r}")
            seen.add(key)
    return obj


def decode_json(payload: bytes) -> object:
    """Parse one frame payload as strict JSON: UTF-8, no NaN/Infinity, no duplicate keys.

    Raises RemoteProtocolError(bad_json) for anything else; the frame itself was well delimited,
    so the caller can answer and carry on.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(
            ErrorCode.BAD_JSON, f"payload is not valid UTF-8 (byte {exc.start})"
        ) from exc
    try:
        return json.loads(
            text,
            object_pairs_hook=_unique_keys,
            parse_constant=_reject_constant,
            parse_float=_finite_float,
        )
    except RecursionError as exc:
        raise RemoteProtocolError(ErrorCode.BAD_JSON, "payload is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError, our hooks, and int()'s digit limit
        raise RemoteProtocolError(ErrorCode.BAD_JSON, f"payload is not valid JSON: {exc}") from exc


class FrameDecoder:
    """Split a byte stream into frame payloads, checking each length before buffering it.

    Complete payloads are split off as soon as they arrive, so the only bytes held back are one
    incomplete frame: at most `max_frame_size + HEADER_SIZE - 1` of them. After a framing error the
    stream cannot be resynchronised: frames that arrived before the bad header are still
    delivered, then `next_frame()` raises the error, and everything later is discarded.
    """

    def __init__(self, max_frame_size: int = MAX_FRAME_SIZE) -> None:
        if not 1 <= max_frame_size <= _LARGEST_ENCODABLE_LENGTH:
            raise LocalProtocolError(f"max_frame_size must be 1..{_LARGEST_ENCODABLE_LENGTH}")
        self.max_frame_size = max_frame_size
        self._partial = bytearray()
        self._frames: deque[bytes] = deque()
        self._error: RemoteProtocolError | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes of an incomplete frame held back (non-zero at end of stream means truncation)."""
        return len(self._partial)

    def receive_data(self, data: bytes) -> None:
        """Feed bytes read from the peer (any amount, including one byte at a time)."""
        if self._error is not None:
            return
        self._partial += data
        self._split_frames()

    def next_frame(self) -> bytes | NeedDataType:
        """Return the next complete payload, or NEED_DATA; raise RemoteProtocolError on framing."""
        if self._frames:
            return self._frames.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    def _split_frames(self) -> None:
        buf = self._partial
        start = 0
        while len(buf) - start >= HEADER_SIZE:
            length = int.from_bytes(buf[start : start + HEADER_SIZE], "big")
            try:
                check_frame_length(length, self.max_frame_size)
            except RemoteProtocolError as exc:
                self._error = exc
                self._partial = bytearray()
                return
            end = start + HEADER_SIZE + length
            if end > len(buf):
                break
            self._frames.append(bytes(buf[start + HEADER_SIZE : end]))
            start = end
        if start:
            del buf[:start]
