"""Fuzzing the Paramedic Link core: whatever a peer sends, only protocol errors come out.

A server must turn any byte stream into requests or `ProtocolViolation` events (whose reply is
itself a valid error frame); a client must raise nothing but `RemoteProtocolError`; trace
decoding must never raise at all.
"""

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from reflector.link.connection import ClientConnection, ProtocolViolation, ServerConnection
from reflector.link.frames import NEED_DATA, FrameDecoder, RemoteProtocolError
from reflector.link.messages import (
    Direction,
    ErrorResponse,
    GetResult,
    Hello,
    Request,
    SessionRequest,
    ThroughputParams,
    message_to_dict,
    parse_message,
)
from reflector.link.trace import decode_trace, format_trace

# Enough examples to cover every branch of the decoders while keeping the file near 5 s.
# No example database: the suite leaves no .hypothesis/ folder in the checkout.
FUZZ = settings(max_examples=200, deadline=None, database=None)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**40), max_value=2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=8,
)

VALID = [
    message_to_dict(Hello(request_id=1, version=1, features=("a",))),
    message_to_dict(GetResult(request_id=2, session_id="s1")),
    message_to_dict(
        SessionRequest(
            request_id=3,
            test_type="throughput",
            params=ThroughputParams(duration_sec=5, protocol="tcp", streams=2, reverse=False),
        )
    ),
]


def frame(payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + payload


def chunked(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)]


def assert_valid_error_reply(violation: ProtocolViolation) -> None:
    decoder = FrameDecoder()
    decoder.receive_data(violation.reply)
    payload = decoder.next_frame()
    assert payload is not NEED_DATA
    reply = parse_message(json.loads(payload), Direction.RESPONSE)
    assert isinstance(reply, ErrorResponse)
    assert reply.code == violation.code
    assert reply.request_id == violation.request_id


def run_server(chunks: list[bytes]) -> list[Request | ProtocolViolation]:
    """Feed a server and collect its events; only these two kinds may come out."""
    server = ServerConnection()
    out: list[Request | ProtocolViolation] = []
    for chunk in chunks:
        server.receive_data(chunk)
        while (event := server.next_event()) is not NEED_DATA:
            assert isinstance(event, Request | ProtocolViolation)
            out.append(event)
            if isinstance(event, ProtocolViolation):
                assert_valid_error_reply(event)
                if event.close:
                    assert server.closed
                    return out
    return out


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_server_turns_arbitrary_bytes_into_requests_or_violations(
    data: bytes, cuts: list[int]
) -> None:
    run_server(chunked(data, cuts))


@FUZZ
@given(st.lists(st.binary(min_size=1, max_size=60), max_size=6))
def test_server_turns_well_framed_garbage_into_non_fatal_violations(payloads: list[bytes]) -> None:
    events = run_server([b"".join(frame(p) for p in payloads)])
    assert len(events) == len(payloads)
    assert all(isinstance(e, ProtocolViolation) and not e.close for e in events)


@settings(FUZZ, max_examples=100)  # recursive JSON is slow to generate
@given(st.lists(json_values, max_size=4))
def test_server_handles_arbitrary_json_inside_frames(values: list[Any]) -> None:
    data = b"".join(frame(json.dumps(v).encode()) for v in values)
    events = run_server([data])
    assert len(events) == len(values)


@FUZZ
@given(st.sampled_from(VALID), st.text(max_size=15), json_values)
def test_mutated_valid_messages_are_accepted_or_refused_with_a_protocol_error(
    valid: dict[str, Any], key: str, value: Any
) -> None:
    mutated = json.loads(json.dumps({**valid, key: value}))
    code = None
    try:
        parse_message(mutated, Direction.REQUEST)
    except RemoteProtocolError as exc:
        code = exc.code
    assert code in {None, "bad_message", "unknown_type", "bad_field"}


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(min_value=0), max_size=8))
def test_client_raises_only_remote_protocol_errors(data: bytes, cuts: list[int]) -> None:
    client = ClientConnection()
    client.send_request(Hello(version=1))
    try:
        for chunk in chunked(data, cuts):
            client.receive_data(chunk)
            while client.next_event() is not NEED_DATA:
                pass
    except RemoteProtocolError:
        pass


@FUZZ
@given(st.binary(max_size=400))
def test_trace_decoding_never_raises(data: bytes) -> None:
    entries = decode_trace(data, max_frame_size=64)
    assert sum(1 for e in entries if e.error and e.error.startswith("truncated")) <= 1
    format_trace(entries)
    format_trace(entries, as_json=True)
