"""Decode a captured Paramedic Link byte stream for humans (spec §6.1, "trace decode").

`decode_trace()` walks the frames of a capture (one direction of a connection, or any
concatenation of frames) and reports each one: where it starts, how long it says it is, the
JSON it holds, and what is wrong with it. It never raises on bad input: a capture is most
interesting exactly when it is broken, so every problem becomes an entry, including a trailing
frame cut short by the end of the capture. Messages are checked against both directions'
schemas, so requests and responses can be mixed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from reflector.link.frames import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    ErrorCode,
    RemoteProtocolError,
    check_frame_length,
    decode_json,
)
from reflector.link.messages import REQUEST_TYPES, Direction, parse_message

# Error code of a frame (or header) cut short by the end of the capture; not a wire code.
TRUNCATED: Final = "truncated"


@dataclass(frozen=True, kw_only=True)
class TraceEntry:
    """One frame of a capture.

    `length` is the payload length the header announces (None if the header itself is cut
    short); `payload` is the decoded JSON if it decoded; `error` is "code: reason" or None when
    the frame holds a valid message.
    """

    offset: int
    length: int | None
    payload: object = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def decode_trace(data: bytes, max_frame_size: int = MAX_FRAME_SIZE) -> list[TraceEntry]:
    """Split `data` into frames and check each, applying the decoder's rules.

    A zero-length frame is reported and skipped (its boundary is still known); an oversized
    header ends the walk, since nothing after it can be trusted to be a frame boundary.
    """
    entries: list[TraceEntry] = []
    offset = 0
    while offset < len(data):
        header = data[offset : offset + HEADER_SIZE]
        if len(header) < HEADER_SIZE:
            reason = f"{len(header)} of {HEADER_SIZE} header bytes before end of capture"
            entries.append(TraceEntry(offset=offset, length=None, error=f"{TRUNCATED}: {reason}"))
            break
        length = int.from_bytes(header, "big")
        try:
            check_frame_length(length, max_frame_size)
        except RemoteProtocolError as exc:
            entries.append(TraceEntry(offset=offset, length=length, error=str(exc)))
            if exc.code == ErrorCode.FRAME_TOO_LARGE:
                break
            offset += HEADER_SIZE
            continue
        payload = data[offset + HEADER_SIZE : offset + HEADER_SIZE + length]
        if len(payload) < length:
            reason = f"{len(payload)} of {length} payload bytes before end of capture"
            entries.append(TraceEntry(offset=offset, length=length, error=f"{TRUNCATED}: {reason}"))
            break
        entries.append(_decode_frame(offset, payload))
        offset += HEADER_SIZE + length
    return entries


def _decode_frame(offset: int, payload: bytes) -> TraceEntry:
    try:
        obj = decode_json(payload)
    except RemoteProtocolError as exc:
        return TraceEntry(offset=offset, length=len(payload), error=str(exc))
    type_name = obj.get("type") if isinstance(obj, dict) else None
    direction = Direction.REQUEST if type_name in REQUEST_TYPES else Direction.RESPONSE
    try:
        parse_message(obj, direction)
    except RemoteProtocolError as exc:
        if exc.code == ErrorCode.UNKNOWN_TYPE:
            exc = RemoteProtocolError(exc.code, f"no message of type {_word(type_name)}")
        return TraceEntry(offset=offset, length=len(payload), payload=obj, error=str(exc))
    return TraceEntry(offset=offset, length=len(payload), payload=obj)


def format_trace(entries: Sequence[TraceEntry], as_json: bool = False) -> str:
    """Render entries one per line: readable text, or JSON Lines for tools such as jq."""
    if as_json:
        lines = [
            json.dumps(
                {"offset": e.offset, "length": e.length, "message": e.payload, "error": e.error},
                ensure_ascii=True,
            )
            for e in entries
        ]
    else:
        lines = [_format_entry(e) for e in entries]
    return "".join(line + "\n" for line in lines)


def _word(value: object) -> str:
    """A type name or id as is when it is plain text, else as ASCII JSON (keeps lines clean)."""
    if isinstance(value, str) and value.isascii() and value.isprintable() and " " not in value:
        return value
    return "?" if value is None else json.dumps(value, ensure_ascii=True)


def _format_entry(entry: TraceEntry) -> str:
    length = "?" if entry.length is None else str(entry.length)
    where = f"@{entry.offset} len={length}"
    if isinstance(entry.payload, dict):
        body = {k: v for k, v in entry.payload.items() if k not in ("type", "request_id")}
        head = f"{_word(entry.payload.get('type'))} #{_word(entry.payload.get('request_id'))}"
        text = f"{where} {head} {json.dumps(body, ensure_ascii=True, separators=(', ', ': '))}"
    elif entry.payload is not None:
        text = f"{where} {json.dumps(entry.payload, ensure_ascii=True)}"
    else:
        text = where
    return text if entry.error is None else f"{text} !! {entry.error}"
