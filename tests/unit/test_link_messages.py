"""Paramedic Link messages: every type round-trips; everything else is refused with a reason."""

import json
from typing import Any

import pytest

from reflector.link.frames import ErrorCode, LocalProtocolError, RemoteProtocolError
from reflector.link.messages import (
    EXPECTED_RESPONSES,
    MAX_OBJECT_DEPTH,
    MAX_OBJECT_NODES,
    REQUEST_TYPES,
    RESPONSE_TYPES,
    Direction,
    ErrorResponse,
    GetPathMeta,
    GetResult,
    GetStatus,
    Health,
    HealthStatus,
    Hello,
    Message,
    Ok,
    Pair,
    PairOk,
    PathMeta,
    Result,
    ServerHello,
    SessionClose,
    SessionGrant,
    SessionRequest,
    StatusSnapshot,
    ThroughputParams,
    UdpEchoParams,
    message_to_dict,
    parse_message,
    peek_request_id,
    response_answers,
    validate_outgoing,
)

REQUESTS: list[Message] = [
    Hello(request_id=1, version=1, features=("udp_echo", "throughput.v1")),
    Pair(request_id=2, token="K7Q2-M9XD-4HRT"),
    SessionRequest(
        request_id=3,
        test_type="throughput",
        params=ThroughputParams(
            duration_sec=10, protocol="udp", streams=4, reverse=True, bitrate_bps=50_000_000
        ),
    ),
    SessionRequest(
        request_id=4,
        test_type="throughput",
        params=ThroughputParams(duration_sec=10, protocol="tcp", streams=1, reverse=False),
    ),
    SessionRequest(
        request_id=5,
        test_type="udp_echo",
        params=UdpEchoParams(duration_sec=30, interval_ms=20, packet_size=112),
    ),
    SessionRequest(request_id=6, test_type="udp_echo", params=UdpEchoParams(duration_sec=1)),
    SessionClose(request_id=7, session_id="s_0123-abc"),
    GetStatus(request_id=8),
    GetPathMeta(request_id=9),
    GetResult(request_id=10, session_id="s1"),
    Health(request_id=2**31 - 1),
]

RESPONSES: list[Message] = [
    ServerHello(
        request_id=1,
        version=1,
        features=("udp_echo",),
        endpoint_id="PP3X-K7Q2-M9XD",
        policy_summary={"max_duration_sec": 60, "tests": ["udp_echo"], "bytes": None},
    ),
    PairOk(request_id=2, peer_id="PPAB-CDEF"),
    SessionGrant(
        request_id=3,
        session_id="s1",
        test_id="s1",
        test_type="throughput",
        mode="direct_ephemeral",
        ports={"data": 5201},
        token="dG9rZW4",
        expires_at=1_700_000_060.25,
        extra={"iperf3": {"version": "3.12"}},
    ),
    Ok(request_id=4),
    StatusSnapshot(request_id=5, sessions=({"id": "s1", "state": "running"},), quota={"left": 9}),
    StatusSnapshot(request_id=5, sessions=(), quota={}),
    PathMeta(request_id=6, meta={"cpu": 0.5, "mtu": 1500, "iface": "eth0"}),
    Result(request_id=7, session_id="s1", result={"rtt_us": [31, 40], "loss": 0.0}),
    HealthStatus(request_id=8, status="ok", version="0.1.0", load=0.25),
    ErrorResponse(request_id=9, code="quota_exceeded", message="10 tests per hour", retry_after=60),
    ErrorResponse(request_id=0, code="bad_json", message=""),
]


def wire(msg: Message) -> object:
    """The message as the peer would decode it from the wire."""
    return json.loads(json.dumps(message_to_dict(msg)))


def refusal(obj: object, direction: Direction = Direction.REQUEST) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        parse_message(obj, direction)
    return info.value


def field_error(obj: object, direction: Direction = Direction.REQUEST) -> str:
    exc = refusal(obj, direction)
    assert exc.code == ErrorCode.BAD_FIELD
    return exc.message


def throughput(**params: Any) -> dict[str, Any]:
    base = {"duration_sec": 10, "protocol": "tcp", "streams": 4, "reverse": False}
    return {
        "type": "session_request",
        "request_id": 1,
        "test_type": "throughput",
        "params": {**base, **params},
    }


def udp_echo(**params: Any) -> dict[str, Any]:
    return {
        "type": "session_request",
        "request_id": 1,
        "test_type": "udp_echo",
        "params": {"duration_sec": 10, **params},
    }


@pytest.mark.parametrize("msg", REQUESTS, ids=lambda m: m.TYPE)
def test_every_request_round_trips(msg: Message) -> None:
    assert parse_message(wire(msg), Direction.REQUEST) == msg


@pytest.mark.parametrize("msg", RESPONSES, ids=lambda m: m.TYPE)
def test_every_response_round_trips(msg: Message) -> None:
    assert parse_message(wire(msg), Direction.RESPONSE) == msg


def test_the_samples_cover_every_message_type() -> None:
    assert {m.TYPE for m in REQUESTS} == set(REQUEST_TYPES)
    assert {m.TYPE for m in RESPONSES} == set(RESPONSE_TYPES)


def test_wire_form_has_type_request_id_and_fields_and_omits_absent_optionals() -> None:
    msg = SessionRequest(
        request_id=4,
        test_type="throughput",
        params=ThroughputParams(duration_sec=10, protocol="tcp", streams=1, reverse=False),
    )
    assert message_to_dict(msg) == {
        "type": "session_request",
        "request_id": 4,
        "test_type": "throughput",
        "params": {"duration_sec": 10, "protocol": "tcp", "streams": 1, "reverse": False},
    }
    assert message_to_dict(Hello(request_id=1, version=1)) == {
        "type": "hello",
        "request_id": 1,
        "version": 1,
        "features": [],
    }


def test_optional_nullable_fields_accept_null_as_absent() -> None:
    msg = parse_message(throughput(bitrate_bps=None), Direction.REQUEST)
    assert isinstance(msg, SessionRequest)
    assert isinstance(msg.params, ThroughputParams)
    assert msg.params.bitrate_bps is None
    error = {"type": "error", "request_id": 1, "code": "busy", "message": "", "retry_after": None}
    assert parse_message(error, Direction.RESPONSE) == ErrorResponse(
        request_id=1, code="busy", message=""
    )


def test_optional_but_not_nullable_fields_refuse_null() -> None:
    assert field_error(udp_echo(interval_ms=None)).startswith(
        "params.interval_ms: must be an integer"
    )


def test_integer_timestamps_are_numbers() -> None:
    grant = message_to_dict(RESPONSES[2]) | {"expires_at": 1_700_000_000}
    msg = parse_message(grant, Direction.RESPONSE)
    assert isinstance(msg, SessionGrant)
    assert msg.expires_at == 1_700_000_000.0


# --- bad_message and unknown_type


@pytest.mark.parametrize("obj", [[1], "hello", 5, None, True])
def test_a_message_must_be_an_object(obj: object) -> None:
    assert refusal(obj).code == ErrorCode.BAD_MESSAGE


@pytest.mark.parametrize("obj", [{"request_id": 1}, {"type": 5, "request_id": 1}, {"type": None}])
def test_a_message_must_have_a_string_type(obj: object) -> None:
    exc = refusal(obj)
    assert exc.code == ErrorCode.BAD_MESSAGE
    assert "'type'" in exc.message


def test_unknown_types_are_refused() -> None:
    exc = refusal({"type": "reboot", "request_id": 1})
    assert exc.code == ErrorCode.UNKNOWN_TYPE
    assert exc.message == "no request of type 'reboot'"


def test_a_response_type_is_not_a_request_and_vice_versa() -> None:
    assert refusal(wire(Ok(request_id=1))).code == ErrorCode.UNKNOWN_TYPE
    assert refusal(wire(GetStatus(request_id=1)), Direction.RESPONSE).code == ErrorCode.UNKNOWN_TYPE


# --- bad_field: the message names the field and says why


def test_out_of_range_integer_names_the_nested_field_and_its_bounds() -> None:
    assert field_error(throughput(streams=500)) == (
        "params.streams: must be an integer between 1 and 128, got 500"
    )


def test_booleans_are_not_integers() -> None:
    assert field_error(throughput(streams=True)) == (
        "params.streams: must be an integer between 1 and 128, got true"
    )
    assert "got true" in field_error({"type": "health", "request_id": True})


def test_integers_are_not_booleans() -> None:
    assert field_error(throughput(reverse=1)) == "params.reverse: must be true or false, got 1"


def test_floats_are_not_integers() -> None:
    assert "got 10.0" in field_error(throughput(duration_sec=10.0))


def test_booleans_are_not_numbers() -> None:
    grant = message_to_dict(RESPONSES[2]) | {"expires_at": True}
    assert field_error(grant, Direction.RESPONSE).startswith("expires_at: must be a number")


def test_extra_fields_are_refused() -> None:
    assert field_error({"type": "get_status", "request_id": 1, "verbose": True}) == (
        "verbose: unexpected field"
    )
    assert field_error(throughput(window="4M")) == "params.window: unexpected field"


def test_odd_extra_field_names_are_quoted_so_the_reason_stays_one_line() -> None:
    obj = {"type": "get_status", "request_id": 1, "bad\nname": 1}
    assert field_error(obj) == "'bad\\nname': unexpected field"


def test_required_fields_must_be_present() -> None:
    assert field_error({"type": "health"}) == "request_id: required field is missing"
    assert field_error({"type": "pair", "request_id": 1}) == "token: required field is missing"
    params = throughput()
    del params["params"]["reverse"]
    assert field_error(params) == "params.reverse: required field is missing"


def test_request_ids_are_positive_31_bit_integers() -> None:
    assert "between 1 and 2147483647" in field_error({"type": "health", "request_id": 0})
    assert "got 2147483648" in field_error({"type": "health", "request_id": 2**31})
    assert "got -1" in field_error({"type": "health", "request_id": -1})


def test_params_are_checked_against_the_schema_of_their_test_type() -> None:
    mixed = udp_echo(streams=4)
    assert field_error(mixed) == "params.streams: unexpected field"
    wrong_type = throughput() | {"test_type": "traceroute"}
    assert field_error(wrong_type).startswith("test_type: must be one of 'udp_echo', 'throughput'")
    assert field_error(throughput() | {"params": [1]}) == "params: must be an object, got an array"


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (
            throughput(duration_sec=3601),
            "params.duration_sec: must be an integer between 1 and 3600",
        ),
        (throughput(duration_sec=0), "params.duration_sec: must be an integer between 1 and 3600"),
        (throughput(protocol="sctp"), "params.protocol: must be one of 'tcp', 'udp', got 'sctp'"),
        (throughput(bitrate_bps=0), "params.bitrate_bps: must be an integer between 1 and"),
        (
            udp_echo(interval_ms=10_001),
            "params.interval_ms: must be an integer between 1 and 10000",
        ),
        (udp_echo(packet_size=111), "params.packet_size: must be an integer between 112 and 1472"),
        (udp_echo(packet_size=1473), "params.packet_size: must be an integer between 112 and 1472"),
        (
            {"type": "session_close", "request_id": 1, "session_id": "a/b"},
            "session_id: may contain only letters, digits, _ and -, got 'a/b'",
        ),
        (
            {"type": "session_close", "request_id": 1, "session_id": "s" * 65},
            "session_id: must be 1 to 64 characters long, got 65",
        ),
        (
            {"type": "get_result", "request_id": 1, "session_id": ""},
            "session_id: must be 1 to 64 characters long, got 0",
        ),
        (
            {"type": "pair", "request_id": 1, "token": "t" * 129},
            "token: must be 1 to 128 characters long, got 129",
        ),
        (
            {"type": "hello", "request_id": 1, "version": 1, "features": ["f"] * 33},
            "features: must have at most 32 items, got 33",
        ),
        (
            {"type": "hello", "request_id": 1, "version": 1, "features": ["ok", "x" * 33]},
            "features[1]: must be 1 to 32 characters long, got 33",
        ),
        (
            {"type": "hello", "request_id": 1, "version": 1, "features": "udp_echo"},
            "features: must be an array, got 'udp_echo'",
        ),
        (
            {"type": "hello", "request_id": 1, "version": 0, "features": []},
            "version: must be an integer between 1 and 65535, got 0",
        ),
    ],
)
def test_request_bounds(obj: dict[str, Any], expected: str) -> None:
    assert field_error(obj).startswith(expected)


def grant(**fields: Any) -> dict[str, Any]:
    return message_to_dict(RESPONSES[2]) | fields


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        (grant(mode="bridged"), "mode: must be one of 'tunneled', 'direct_ephemeral'"),
        (grant(ports={"data": 0}), "ports.data: must be an integer between 1 and 65535, got 0"),
        (grant(ports={"data": 65536}), "ports.data: must be an integer between 1 and 65535"),
        (grant(ports={"": 5201}), "ports key: must be 1 to 32 characters long, got 0"),
        (grant(ports={str(i): 5000 + i for i in range(17)}), "ports: must have at most 16 entries"),
        (grant(expires_at=-1.0), "expires_at: must be a number between 0 and"),
        (grant(token=""), "token: must be 1 to 256 characters long, got 0"),
        (grant(extra=None), "extra: must be an object, got null"),
        (
            {"type": "error", "request_id": 1, "code": "Bad Code", "message": ""},
            "code: may contain only a-z, 0-9 and _",
        ),
        (
            {"type": "error", "request_id": 1, "code": "x", "message": "m" * 513},
            "message: must be 0 to 512 characters long, got 513",
        ),
        (
            {"type": "health_status", "request_id": 1, "status": "fine", "version": "1", "load": 0},
            "status: must be one of 'ok', 'degraded', 'unavailable'",
        ),
        (
            {"type": "ok", "request_id": 0},
            "request_id: must be an integer between 1 and 2147483647, got 0",
        ),
    ],
)
def test_response_bounds(obj: dict[str, Any], expected: str) -> None:
    assert field_error(obj, Direction.RESPONSE).startswith(expected)


def nested(depth: int) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for _ in range(depth - 1):
        obj = {"k": obj}
    return obj


def test_free_form_objects_are_bounded_in_depth() -> None:
    ok = {"type": "path_meta", "request_id": 1, "meta": nested(MAX_OBJECT_DEPTH)}
    assert isinstance(parse_message(ok, Direction.RESPONSE), PathMeta)
    too_deep = {"type": "path_meta", "request_id": 1, "meta": nested(MAX_OBJECT_DEPTH + 1)}
    assert "nested at most 8 levels deep" in field_error(too_deep, Direction.RESPONSE)


def test_free_form_objects_are_bounded_in_size() -> None:
    ok = {"type": "path_meta", "request_id": 1, "meta": {"a": [0] * (MAX_OBJECT_NODES - 2)}}
    assert isinstance(parse_message(ok, Direction.RESPONSE), PathMeta)
    big = {"type": "path_meta", "request_id": 1, "meta": {"a": [0] * (MAX_OBJECT_NODES - 1)}}
    assert field_error(big, Direction.RESPONSE) == "meta: must have at most 4096 values"


def test_status_snapshot_sessions_must_be_objects() -> None:
    obj = {"type": "status_snapshot", "request_id": 1, "sessions": [{}, 3], "quota": {}}
    assert field_error(obj, Direction.RESPONSE) == "sessions[1]: must be an object, got 3"


def test_quoted_bad_values_are_shortened() -> None:
    message = field_error(throughput(protocol="x" * 1000))
    assert message.endswith("...")
    assert len(message) < 120


def test_peek_request_id_reads_the_id_of_an_invalid_message_when_it_can() -> None:
    assert peek_request_id({"type": "nonsense", "request_id": 42}) == 42
    assert peek_request_id({"request_id": True}) == 0
    assert peek_request_id({"request_id": 2**31}) == 0
    assert peek_request_id([42]) == 0


def test_every_request_has_one_expected_response_and_error_answers_anything() -> None:
    assert set(EXPECTED_RESPONSES) == set(REQUEST_TYPES.values())
    hello = Hello(request_id=1, version=1)
    assert response_answers(
        hello, ServerHello(version=1, features=(), endpoint_id="e", policy_summary={})
    )
    assert response_answers(hello, ErrorResponse(code="x", message=""))
    assert not response_answers(hello, Ok())


def test_validate_outgoing_refuses_to_send_what_the_peer_would_refuse() -> None:
    with pytest.raises(LocalProtocolError, match="session_id: may contain only"):
        validate_outgoing(Result(request_id=1, session_id="no spaces", result={}))
    with pytest.raises(LocalProtocolError, match="must contain only JSON values, got set"):
        validate_outgoing(PathMeta(request_id=1, meta={"a": {1}}))
    with pytest.raises(LocalProtocolError, match="NaN or infinity"):
        validate_outgoing(PathMeta(request_id=1, meta={"a": float("nan")}))
    assert validate_outgoing(Ok(request_id=3)) == {"type": "ok", "request_id": 3}
