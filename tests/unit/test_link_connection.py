"""Paramedic Link connections: a client and a server wired together in memory."""

import json
from typing import Any

import pytest

from reflector.link.connection import (
    MAX_IN_FLIGHT,
    ClientConnection,
    ProtocolViolation,
    Reply,
    ServerConnection,
    UnattributedError,
)
from reflector.link.frames import (
    MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    LocalProtocolError,
    RemoteProtocolError,
    encode_frame,
)
from reflector.link.messages import (
    MAX_REQUEST_ID,
    PROTOCOL_VERSION,
    Direction,
    ErrorResponse,
    GetPathMeta,
    GetResult,
    GetStatus,
    Health,
    HealthStatus,
    Hello,
    Ok,
    Pair,
    PathMeta,
    Request,
    Result,
    ServerHello,
    SessionClose,
    StatusSnapshot,
    message_to_dict,
    parse_message,
)

HELLO = Hello(version=PROTOCOL_VERSION, features=("udp_echo",))


def server_hello(request_id: int, version: int = PROTOCOL_VERSION) -> ServerHello:
    return ServerHello(
        request_id=request_id, version=version, features=(), endpoint_id="PPX", policy_summary={}
    )


def raw(obj: Any) -> bytes:
    """A frame holding any JSON, bypassing validation, as a misbehaving peer would send it."""
    payload = json.dumps(obj).encode()
    return len(payload).to_bytes(4, "big") + payload


def events(conn: ServerConnection) -> list[Request | ProtocolViolation]:
    out: list[Request | ProtocolViolation] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
        if isinstance(event, ProtocolViolation) and event.close:
            break
    return out


def replies(conn: ClientConnection) -> list[Reply | UnattributedError]:
    out: list[Reply | UnattributedError] = []
    while (event := conn.next_event()) is not NEED_DATA:
        out.append(event)
    return out


def error_in(violation: ProtocolViolation) -> ErrorResponse:
    """Decode a violation's reply bytes as the client would."""
    decoder = FrameDecoder()
    decoder.receive_data(violation.reply)
    frame = decoder.next_frame()
    assert frame is not NEED_DATA
    assert decoder.next_frame() is NEED_DATA
    msg = parse_message(json.loads(frame), Direction.RESPONSE)
    assert isinstance(msg, ErrorResponse)
    return msg


def connected() -> tuple[ClientConnection, ServerConnection]:
    """A client and server that have exchanged hello / server_hello."""
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send_request(HELLO))
    [hello] = events(server)
    client.receive_data(server.send(server_hello(hello.request_id)))
    [reply] = replies(client)
    assert isinstance(reply, Reply)
    return client, server


def opened_server() -> ServerConnection:
    server = ServerConnection()
    server.receive_data(raw({"type": "hello", "request_id": 1, "version": 1, "features": []}))
    [hello] = events(server)
    server.send(server_hello(hello.request_id))
    return server


def violation(server: ServerConnection, data: bytes) -> ProtocolViolation:
    server.receive_data(data)
    [event] = events(server)
    assert isinstance(event, ProtocolViolation)
    return event


# --- the happy path


def test_hello_exchange_returns_the_reply_with_its_request() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send_request(HELLO))
    [request] = events(server)
    assert request == Hello(request_id=1, version=1, features=("udp_echo",))
    client.receive_data(server.send(server_hello(1)))
    assert replies(client) == [Reply(request=request, response=server_hello(1))]
    assert client.pending == {}
    assert server.in_flight == {}


def test_requests_are_multiplexed_and_answered_in_any_order() -> None:
    client, server = connected()
    data = client.send_request(GetStatus())
    data += client.send_request(GetPathMeta())
    data += client.send_request(GetResult(session_id="s1"))
    assert set(client.pending) == {2, 3, 4}
    server.receive_data(data)
    status, meta, result = events(server)
    assert set(server.in_flight) == {2, 3, 4}
    answers = server.send(Result(request_id=result.request_id, session_id="s1", result={"x": 1}))
    answers += server.send(StatusSnapshot(request_id=status.request_id, sessions=(), quota={}))
    answers += server.send(PathMeta(request_id=meta.request_id, meta={"mtu": 1500}))
    client.receive_data(answers)
    got = replies(client)
    assert [(r.request.TYPE, r.response.TYPE) for r in got if isinstance(r, Reply)] == [
        ("get_result", "result"),
        ("get_status", "status_snapshot"),
        ("get_path_meta", "path_meta"),
    ]
    assert client.pending == {}


def test_client_may_pipeline_requests_behind_hello() -> None:
    client, server = ClientConnection(), ServerConnection()
    server.receive_data(client.send_request(HELLO) + client.send_request(Health()))
    assert [e.TYPE for e in events(server) if isinstance(e, Request)] == ["hello", "health"]


def test_byte_at_a_time_in_both_directions() -> None:
    client, server = ClientConnection(), ServerConnection()
    data = client.send_request(HELLO) + client.send_request(Pair(token="T0K3N"))
    received: list[Request | ProtocolViolation] = []
    for i in range(len(data)):
        server.receive_data(data[i : i + 1])
        received.extend(events(server))
    assert [e.TYPE for e in received if isinstance(e, Request)] == ["hello", "pair"]
    answer = server.send(server_hello(1)) + server.send(
        ErrorResponse(request_id=2, code="pairing_closed", message="pairing is not enabled")
    )
    got: list[Reply | UnattributedError] = []
    for i in range(len(answer)):
        client.receive_data(answer[i : i + 1])
        got.extend(replies(client))
    assert [r.response.TYPE for r in got if isinstance(r, Reply)] == ["server_hello", "error"]


def test_client_assigns_increasing_request_ids() -> None:
    client, _ = connected()
    assert client.last_request_id == 1
    client.send_request(Health(request_id=999))  # a caller's id is replaced
    assert client.last_request_id == 2
    assert set(client.pending) == {2}


def test_request_ids_wrap_around_and_skip_pending_ones() -> None:
    client, _ = connected()
    client.send_request(Health())  # id 2 stays pending
    client._last_request_id = MAX_REQUEST_ID - 1  # as if 2**31 requests had been made
    client.send_request(Health())
    assert client.last_request_id == MAX_REQUEST_ID
    client.send_request(Health())
    assert client.last_request_id == 1
    client.send_request(Health())
    assert client.last_request_id == 3


# --- server: sequencing


def test_first_request_must_be_hello_but_the_connection_continues() -> None:
    server = ServerConnection()
    event = violation(server, raw({"type": "get_status", "request_id": 5}))
    assert (event.code, event.request_id, event.close) == (ErrorCode.HELLO_REQUIRED, 5, False)
    assert error_in(event) == ErrorResponse(
        request_id=5,
        code="hello_required",
        message="the first request must be hello, not get_status",
    )
    server.receive_data(raw({"type": "hello", "request_id": 6, "version": 1, "features": []}))
    assert [e.TYPE for e in events(server) if isinstance(e, Request)] == ["hello"]


def test_pair_also_needs_hello_first() -> None:
    event = violation(ServerConnection(), raw({"type": "pair", "request_id": 1, "token": "t"}))
    assert event.code == ErrorCode.HELLO_REQUIRED


def test_hello_is_accepted_only_once() -> None:
    server = opened_server()
    event = violation(server, raw({"type": "hello", "request_id": 2, "version": 1, "features": []}))
    assert (event.code, event.close) == (ErrorCode.DUPLICATE_HELLO, False)


def test_unsupported_version_is_refused_and_hello_may_be_retried() -> None:
    server = ServerConnection()
    event = violation(server, raw({"type": "hello", "request_id": 1, "version": 2, "features": []}))
    assert (event.code, event.request_id, event.close) == (ErrorCode.UNSUPPORTED_VERSION, 1, False)
    assert "version 1, not 2" in event.message
    server.receive_data(raw({"type": "hello", "request_id": 2, "version": 1, "features": []}))
    assert isinstance(events(server)[0], Hello)


def test_too_many_requests_in_flight_are_refused_until_one_is_answered() -> None:
    server = opened_server()
    server.receive_data(b"".join(raw({"type": "health", "request_id": i}) for i in range(10, 26)))
    assert len(events(server)) == MAX_IN_FLIGHT
    event = violation(server, raw({"type": "health", "request_id": 99}))
    assert (event.code, event.request_id, event.close) == (ErrorCode.TOO_MANY_REQUESTS, 99, False)
    server.send(HealthStatus(request_id=10, status="ok", version="0.1.0", load=0.0))
    server.receive_data(raw({"type": "health", "request_id": 99}))
    assert events(server) == [Health(request_id=99)]


def test_max_in_flight_is_configurable() -> None:
    server = ServerConnection(max_in_flight=1)
    server.receive_data(raw({"type": "hello", "request_id": 1, "version": 1, "features": []}))
    events(server)
    event = violation(server, raw({"type": "health", "request_id": 2}))
    assert event.code == ErrorCode.TOO_MANY_REQUESTS


def test_a_request_id_still_in_flight_cannot_be_reused() -> None:
    server = opened_server()
    server.receive_data(raw({"type": "health", "request_id": 7}))
    events(server)
    event = violation(server, raw({"type": "get_status", "request_id": 7}))
    assert (event.code, event.close) == (ErrorCode.DUPLICATE_REQUEST_ID, False)


# --- server: errors inside a well-formed frame are answered and the connection continues


@pytest.mark.parametrize(
    ("data", "code", "request_id"),
    [
        (b"\x00\x00\x00\x03{x}", ErrorCode.BAD_JSON, 0),
        (raw([1, 2]), ErrorCode.BAD_MESSAGE, 0),
        (raw({"request_id": 4}), ErrorCode.BAD_MESSAGE, 4),
        (raw({"type": "reboot", "request_id": 4}), ErrorCode.UNKNOWN_TYPE, 4),
        (raw({"type": "ok", "request_id": 4}), ErrorCode.UNKNOWN_TYPE, 4),
        (
            raw({"type": "session_close", "request_id": 4, "session_id": "a b"}),
            ErrorCode.BAD_FIELD,
            4,
        ),
        (raw({"type": "health", "request_id": True}), ErrorCode.BAD_FIELD, 0),
    ],
)
def test_content_errors_get_a_typed_reply_and_the_connection_continues(
    data: bytes, code: str, request_id: int
) -> None:
    server = opened_server()
    event = violation(server, data)
    assert (event.code, event.request_id, event.close) == (code, request_id, False)
    reply = error_in(event)
    assert (reply.code, reply.request_id, reply.message) == (code, request_id, event.message)
    assert not server.closed
    server.receive_data(raw({"type": "health", "request_id": 5}))
    assert events(server) == [Health(request_id=5)]


def test_bad_field_reply_names_the_field() -> None:
    server = opened_server()
    bad = {
        "type": "session_request",
        "request_id": 9,
        "test_type": "throughput",
        "params": {"duration_sec": 10, "protocol": "tcp", "streams": 500, "reverse": False},
    }
    event = violation(server, raw(bad))
    assert (
        error_in(event).message == "params.streams: must be an integer between 1 and 128, got 500"
    )


# --- server: framing errors end the connection


def test_oversized_frame_is_refused_from_its_header_alone_then_the_connection_closes() -> None:
    server = opened_server()
    event = violation(server, (MAX_FRAME_SIZE + 1).to_bytes(4, "big"))
    assert (event.code, event.request_id, event.close) == (ErrorCode.FRAME_TOO_LARGE, 0, True)
    assert error_in(event).code == "frame_too_large"
    assert server.closed
    with pytest.raises(LocalProtocolError):
        server.receive_data(b"more")
    with pytest.raises(LocalProtocolError):
        server.next_event()


def test_zero_length_frame_closes_the_connection() -> None:
    event = violation(opened_server(), b"\x00\x00\x00\x00")
    assert (event.code, event.close) == (ErrorCode.BAD_FRAME, True)


def test_requests_before_a_framing_error_are_still_delivered() -> None:
    server = opened_server()
    server.receive_data(raw({"type": "health", "request_id": 2}) + b"\x00\x00\x00\x00")
    first, second = events(server)
    assert first == Health(request_id=2)
    assert isinstance(second, ProtocolViolation)
    assert second.close


def test_server_frame_limit_is_configurable_but_fits_an_error_reply() -> None:
    server = ServerConnection(max_frame_size=5000)
    event = violation(server, (5001).to_bytes(4, "big"))
    assert event.code == ErrorCode.FRAME_TOO_LARGE
    with pytest.raises(LocalProtocolError, match="at least 4096"):
        ServerConnection(max_frame_size=100)


# --- server: what it may send


def test_server_may_only_answer_requests_in_flight() -> None:
    _, server = connected()
    with pytest.raises(LocalProtocolError, match="no request 42"):
        server.send(Ok(request_id=42))


def test_server_must_answer_with_the_matching_type_or_an_error() -> None:
    client, server = connected()
    server.receive_data(client.send_request(SessionClose(session_id="s1")))
    [close] = events(server)
    with pytest.raises(LocalProtocolError, match="status_snapshot does not answer session_close"):
        server.send(StatusSnapshot(request_id=close.request_id, sessions=(), quota={}))
    assert server.send(ErrorResponse(request_id=close.request_id, code="no_session", message=""))
    assert server.in_flight == {}


def test_server_refuses_to_send_an_invalid_response() -> None:
    client, server = connected()
    server.receive_data(client.send_request(GetResult(session_id="s1")))
    [req] = events(server)
    with pytest.raises(LocalProtocolError, match="session_id"):
        server.send(Result(request_id=req.request_id, session_id="", result={}))
    assert set(server.in_flight) == {req.request_id}  # still awaiting a valid answer


# --- client


def test_client_must_send_hello_first_and_only_once() -> None:
    client = ClientConnection()
    with pytest.raises(LocalProtocolError, match="hello comes first"):
        client.send_request(GetStatus())
    client.send_request(HELLO)
    with pytest.raises(LocalProtocolError, match="hello comes first, once"):
        client.send_request(HELLO)


def test_client_refuses_to_exceed_the_in_flight_limit() -> None:
    client, _ = connected()
    for _ in range(MAX_IN_FLIGHT):
        client.send_request(Health())
    with pytest.raises(LocalProtocolError, match="already in flight"):
        client.send_request(Health())


def test_client_refuses_to_send_an_invalid_request() -> None:
    client, _ = connected()
    with pytest.raises(LocalProtocolError, match="session_id"):
        client.send_request(GetResult(session_id="../etc"))
    assert client.pending == {}


def test_an_unsolicited_response_is_a_protocol_error_and_the_client_stays_failed() -> None:
    client, _ = connected()
    client.receive_data(encode_frame({"type": "ok", "request_id": 77}))
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code == ErrorCode.UNSOLICITED_RESPONSE
    with pytest.raises(RemoteProtocolError, match="unsolicited_response"):
        client.next_event()
    with pytest.raises(LocalProtocolError):
        client.send_request(Health())
    with pytest.raises(LocalProtocolError):
        client.receive_data(b"")


def test_a_response_of_the_wrong_type_is_a_protocol_error() -> None:
    client, _ = connected()
    client.send_request(Health())
    client.receive_data(encode_frame({"type": "ok", "request_id": 2}))
    with pytest.raises(RemoteProtocolError, match="unexpected_response: ok does not answer health"):
        client.next_event()


def test_a_server_speaking_another_version_is_a_protocol_error() -> None:
    client = ClientConnection()
    client.send_request(HELLO)
    client.receive_data(encode_frame({**message_to_dict(server_hello(1)), "version": 2}))
    with pytest.raises(RemoteProtocolError, match="unsupported_version"):
        client.next_event()


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"\x00\x00\x00\x02{]", ErrorCode.BAD_JSON),
        (
            raw({"type": "hello", "request_id": 1, "version": 1, "features": []}),
            ErrorCode.UNKNOWN_TYPE,
        ),
        (raw({"type": "ok", "request_id": 1, "x": 1}), ErrorCode.BAD_FIELD),
        ((MAX_FRAME_SIZE + 1).to_bytes(4, "big"), ErrorCode.FRAME_TOO_LARGE),
    ],
)
def test_client_raises_on_any_server_misbehaviour(data: bytes, code: str) -> None:
    client, _ = connected()
    client.receive_data(data)
    with pytest.raises(RemoteProtocolError) as info:
        client.next_event()
    assert info.value.code == code


def test_a_violation_reply_reaches_the_client_as_an_error_for_its_request() -> None:
    client, server = connected()
    server.receive_data(client.send_request(SessionClose(session_id="s1")))
    [close] = events(server)
    # The client now breaks the protocol by reusing the id (only a buggy client can).
    event = violation(server, raw({"type": "get_status", "request_id": close.request_id}))
    client.receive_data(event.reply)
    [reply] = replies(client)
    assert isinstance(reply, Reply)
    assert reply.request == close
    assert isinstance(reply.response, ErrorResponse)
    assert reply.response.code == "duplicate_request_id"


def test_an_unattributed_server_error_is_its_own_event() -> None:
    client, server = connected()
    event = violation(server, b"\x00\x00\x00\x01x")
    client.receive_data(event.reply)
    [reply] = replies(client)
    assert isinstance(reply, UnattributedError)
    assert reply.code == "bad_json"
    assert reply.message.startswith("payload is not valid JSON")
