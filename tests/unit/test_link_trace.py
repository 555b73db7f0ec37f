"""`reflector trace decode`: a capture of frames becomes readable entries; nothing crashes it."""

import json

from reflector.link.frames import MAX_FRAME_SIZE, encode_frame
from reflector.link.messages import GetStatus, Hello, Ok, message_to_dict
from reflector.link.trace import TraceEntry, decode_trace, format_trace

HELLO = encode_frame(message_to_dict(Hello(request_id=1, version=1, features=("udp_echo",))))
OK = encode_frame(message_to_dict(Ok(request_id=2)))
STATUS = encode_frame(message_to_dict(GetStatus(request_id=2)))


def raw(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def test_a_capture_of_requests_and_responses_decodes_frame_by_frame() -> None:
    entries = decode_trace(HELLO + STATUS + OK)
    assert [e.offset for e in entries] == [0, len(HELLO), len(HELLO) + len(STATUS)]
    assert [e.length for e in entries] == [len(HELLO) - 4, len(STATUS) - 4, len(OK) - 4]
    assert all(e.ok for e in entries)
    assert entries[0].payload == {
        "type": "hello",
        "request_id": 1,
        "version": 1,
        "features": ["udp_echo"],
    }
    assert entries[2].payload == {"type": "ok", "request_id": 2}


def test_an_empty_capture_has_no_entries() -> None:
    assert decode_trace(b"") == []


def test_an_invalid_message_is_shown_with_its_reason_and_decoding_continues() -> None:
    bad = raw(b'{"type":"health","request_id":true}')
    entries = decode_trace(bad + OK)
    assert entries[0].payload == {"type": "health", "request_id": True}
    assert entries[0].error is not None
    assert entries[0].error.startswith("bad_field: request_id: must be an integer")
    assert entries[1].ok


def test_unknown_types_are_named_without_a_direction() -> None:
    [entry] = decode_trace(raw(b'{"type":"reboot","request_id":1}'))
    assert entry.error == "unknown_type: no message of type reboot"


def test_peer_chosen_text_cannot_break_the_one_line_format() -> None:
    payload = json.dumps({"type": "a\nb\ud800", "request_id": "x y"}).encode()
    [line] = format_trace(decode_trace(raw(payload))).splitlines()
    assert line.isascii()
    assert line.startswith("@0 len=")
    assert '"a\\nb\\ud800" #"x y"' in line


def test_bad_json_is_reported_without_a_payload() -> None:
    [entry, after] = decode_trace(raw(b"{nope") + OK)
    assert entry.payload is None
    assert entry.error is not None
    assert entry.error.startswith("bad_json: ")
    assert after.ok


def test_a_zero_length_frame_is_reported_and_skipped() -> None:
    [entry, after] = decode_trace(b"\x00\x00\x00\x00" + OK)
    assert entry == TraceEntry(offset=0, length=0, error="bad_frame: zero-length frame")
    assert after.offset == 4
    assert after.ok


def test_an_oversized_frame_ends_the_trace() -> None:
    header = (MAX_FRAME_SIZE + 1).to_bytes(4, "big")
    [first, entry] = decode_trace(OK + header + OK)
    assert first.ok
    assert entry.offset == len(OK)
    assert entry.error is not None
    assert entry.error.startswith("frame_too_large: frame header announces 65537 bytes")


def test_the_frame_limit_can_be_set_to_match_the_capturing_side() -> None:
    [entry] = decode_trace(HELLO, max_frame_size=10)
    assert entry.error is not None
    assert entry.error.startswith("frame_too_large")


def test_a_truncated_trailing_frame_is_reported_not_crashed_on() -> None:
    entries = decode_trace(OK + HELLO[:-5])
    assert entries[-1] == TraceEntry(
        offset=len(OK),
        length=len(HELLO) - 4,
        error=f"truncated: {len(HELLO) - 9} of {len(HELLO) - 4} payload bytes before end of"
        " capture",
    )


def test_a_truncated_trailing_header_is_reported() -> None:
    entries = decode_trace(OK + b"\x00\x00")
    assert entries[-1] == TraceEntry(
        offset=len(OK), length=None, error="truncated: 2 of 4 header bytes before end of capture"
    )


def test_human_format_shows_offset_length_type_id_and_fields() -> None:
    text = format_trace(decode_trace(HELLO + OK))
    assert text.splitlines() == [
        f'@0 len={len(HELLO) - 4} hello #1 {{"version": 1, "features": ["udp_echo"]}}',
        f"@{len(HELLO)} len={len(OK) - 4} ok #2 {{}}",
    ]


def test_human_format_marks_errors() -> None:
    text = format_trace(decode_trace(raw(b"[1]") + b"\x00"))
    assert text.splitlines() == [
        "@0 len=3 [1] !! bad_message: message must be a JSON object, got an array",
        "@7 len=? !! truncated: 1 of 4 header bytes before end of capture",
    ]


def test_json_format_is_one_object_per_line() -> None:
    text = format_trace(decode_trace(OK + b"\x00\x00\x00\x00"), as_json=True)
    lines = [json.loads(line) for line in text.splitlines()]
    assert lines == [
        {
            "offset": 0,
            "length": len(OK) - 4,
            "message": {"type": "ok", "request_id": 2},
            "error": None,
        },
        {"offset": len(OK), "length": 0, "message": None, "error": "bad_frame: zero-length frame"},
    ]


def test_no_entries_format_to_nothing() -> None:
    assert format_trace([]) == ""
    assert format_trace([], as_json=True) == ""
