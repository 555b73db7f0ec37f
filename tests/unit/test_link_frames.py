"""Paramedic Link framing: u32 big-endian length + UTF-8 JSON object, bounded before buffering."""

import json

import pytest

from reflector.link.frames import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    decode_json,
    encode_frame,
)


def header(length: int) -> bytes:
    return length.to_bytes(HEADER_SIZE, "big")


def drain(decoder: FrameDecoder) -> list[bytes]:
    frames = []
    while (frame := decoder.next_frame()) is not NEED_DATA:
        frames.append(frame)
    return frames


def test_a_frame_is_a_big_endian_u32_length_then_compact_json() -> None:
    data = encode_frame({"type": "ok", "request_id": 1})
    payload = b'{"type":"ok","request_id":1}'
    assert data == header(len(payload)) + payload


def test_decoder_returns_what_the_encoder_framed() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"a": 1}) + encode_frame({"b": [True, None]}))
    assert [json.loads(f) for f in drain(decoder)] == [{"a": 1}, {"b": [True, None]}]


def test_byte_at_a_time_feeding_yields_the_same_frames() -> None:
    first, second = encode_frame({"a": "x" * 300}), encode_frame({"b": 2})
    stream = first + second
    decoder = FrameDecoder()
    frames = []
    for i in range(len(stream)):
        decoder.receive_data(stream[i : i + 1])
        frames.extend(drain(decoder))
    assert frames == [first[HEADER_SIZE:], second[HEADER_SIZE:]]
    assert decoder.buffered_bytes == 0


def test_incomplete_frame_needs_data_and_is_counted_as_buffered() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"a": 1})[:-1])
    assert decoder.next_frame() is NEED_DATA
    assert decoder.buffered_bytes == len(encode_frame({"a": 1})) - 1


def test_oversized_header_is_rejected_before_any_payload_arrives() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(MAX_FRAME_SIZE + 1))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.FRAME_TOO_LARGE
    assert "65537" in info.value.message
    assert decoder.buffered_bytes == 0


def test_huge_header_does_not_allocate_its_announced_size() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(2**32 - 1) + b"x" * 1000)
    assert decoder.buffered_bytes == 0
    with pytest.raises(RemoteProtocolError, match="frame_too_large"):
        decoder.next_frame()


def test_a_frame_of_exactly_the_maximum_size_is_accepted() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(header(100) + b"x" * 100)
    assert decoder.next_frame() == b"x" * 100


def test_the_decoder_holds_back_at_most_one_incomplete_maximum_frame() -> None:
    decoder = FrameDecoder(max_frame_size=100)
    decoder.receive_data(header(100) + b"x" * 99)
    assert decoder.buffered_bytes == 100 + HEADER_SIZE - 1
    assert decoder.next_frame() is NEED_DATA


def test_max_frame_size_is_configurable() -> None:
    decoder = FrameDecoder(max_frame_size=10)
    decoder.receive_data(header(11))
    with pytest.raises(RemoteProtocolError, match="maximum is 10"):
        decoder.next_frame()


def test_zero_length_frame_is_a_framing_error() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(header(0))
    with pytest.raises(RemoteProtocolError) as info:
        decoder.next_frame()
    assert info.value.code == ErrorCode.BAD_FRAME


def test_frames_before_a_bad_header_are_delivered_then_the_error_sticks() -> None:
    decoder = FrameDecoder()
    decoder.receive_data(encode_frame({"a": 1}) + header(0) + encode_frame({"b": 2}))
    assert decoder.next_frame() == b'{"a":1}'
    for _ in range(2):
        with pytest.raises(RemoteProtocolError, match="bad_frame"):
            decoder.next_frame()
    decoder.receive_data(encode_frame({"c": 3}))  # discarded: the stream is out of sync
    with pytest.raises(RemoteProtocolError, match="bad_frame"):
        decoder.next_frame()


def test_decoder_rejects_an_impossible_limit() -> None:
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_size=0)
    with pytest.raises(LocalProtocolError):
        FrameDecoder(max_frame_size=2**32)


def test_encoder_refuses_oversized_payloads() -> None:
    with pytest.raises(LocalProtocolError, match="exceeds the maximum frame size 20"):
        encode_frame({"a": "x" * 20}, max_frame_size=20)
    assert len(encode_frame({"a": "x" * 12}, max_frame_size=20)) == HEADER_SIZE + 20


@pytest.mark.parametrize("obj", [{"a": {1, 2}}, {"a": float("nan")}, {"a": float("inf")}])
def test_encoder_refuses_what_is_not_strict_json(obj: dict[str, object]) -> None:
    with pytest.raises(LocalProtocolError, match="not serialisable"):
        encode_frame(obj)


def test_encoder_refuses_a_non_object_payload() -> None:
    with pytest.raises(LocalProtocolError, match="must be a JSON object"):
        encode_frame([1, 2])  # type: ignore[arg-type]


def test_encoder_emits_ascii_so_lone_surrogates_from_a_peer_can_be_echoed() -> None:
    data = encode_frame({"m": "caf\u00e9 \ud800"})
    assert data[HEADER_SIZE:].isascii()
    assert decode_json(data[HEADER_SIZE:]) == {"m": "caf\u00e9 \ud800"}


def test_decode_json_accepts_utf8_text() -> None:
    assert decode_json('{"m":"caf\u00e9"}'.encode()) == {"m": "caf\u00e9"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b'{"a":"\xff"}', "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b'{"a":NaN}', "NaN is not allowed"),
        (b'{"a":-Infinity}', "-Infinity is not allowed"),
        (b'{"a":1e999}', "out of range"),
        (b'{"a":1,"a":2}', "duplicate key 'a'"),
        (b'{"a":' + b"9" * 5000 + b"}", "not valid JSON"),
        (b"[" * 60000 + b"]" * 60000, "nested too deeply"),
        ('\ufeff{"a":1}'.encode(), "not valid JSON"),
        ('{"a":1}'.encode("utf-16"), "not valid UTF-8"),
    ],
)
def test_decode_json_refuses_anything_but_strict_utf8_json(payload: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        decode_json(payload)
    assert info.value.code == ErrorCode.BAD_JSON
    assert reason in info.value.message


def test_remote_protocol_error_carries_code_and_one_line_message() -> None:
    exc = RemoteProtocolError("bad_field", "version: required field is missing")
    assert (exc.code, exc.message) == ("bad_field", "version: required field is missing")
    assert str(exc) == "bad_field: version: required field is missing"
