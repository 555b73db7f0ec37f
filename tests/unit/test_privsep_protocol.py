"""The helper's interface as a specification: four requests, every field checked for form and
meaning, bounded frames both ways (reflector.privsep.protocol; pure, no I/O)."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from reflector.config import parse_config_text
from reflector.privsep.protocol import (
    HEADER,
    MAX_FRAME_BYTES,
    REQUESTS,
    CloseHole,
    EngineLimits,
    EngineStarted,
    EngineStopped,
    FirewallReady,
    FrameReader,
    HelperPolicy,
    HoleClosed,
    HoleCounted,
    HoleOpened,
    OpenHole,
    PrepareFirewall,
    PrivsepError,
    ProtocolError,
    ReadHole,
    Refused,
    StartEngine,
    StopEngine,
    decode_request,
    decode_response,
    encode_frame,
    parse_cpu_percent,
    parse_size,
    to_wire,
)

KEY = bytes(range(32))
CONFIG = parse_config_text(
    """
[network]
listen_address = ["0.0.0.0:4000", "[::]:4443"]
data_port_range_start = 5201
data_port_range_end = 5210

[quotas]
max_test_duration_sec = 60
session_grace_sec = 5
max_concurrent_tests = 1

[limits]
memory_max = "256M"
cpu_quota = "100%"
tasks_max = 32
runtime_grace_sec = 10
"""
)
DIRECT = parse_config_text(
    """
[network]
mode = "direct_ephemeral"
data_port_range_start = 5201
data_port_range_end = 5210
"""
)
POLICY = HelperPolicy.from_config(CONFIG)
LIMITS = EngineLimits.from_config(CONFIG)
IDLE: dict[str, int] = {"iperf3": 0, "udp_echo": 0}


def start(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "start_engine",
        "test_id": "Ab3_x-9QwErTyUiO",
        "kind": "iperf3",
        "port": 5201,
        "duration_s": 10,
        "bind": "127.0.0.1",
        "peer": "192.0.2.10",
        "limits": {"memory_max_bytes": 1 << 20, "cpu_quota_percent": 50, "tasks_max": 8},
        "echo_key": None,
    }
    doc.update(changes)
    return doc


def echo(**changes: Any) -> dict[str, Any]:
    return start(**{"kind": "udp_echo", "echo_key": KEY.hex(), **changes})


def hole(**changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "type": "open_hole",
        "test_id": "t1",
        "peer_addr": "198.51.100.7",
        "proto": "tcp",
        "port": 5202,
        "ttl_s": 60,
    }
    doc.update(changes)
    return doc


def check(doc: dict[str, Any], policy: HelperPolicy = POLICY, **running: int) -> Refused | None:
    return policy.check(decode_request(doc), running={**IDLE, **running})


def roundtrip(message: Any) -> Any:
    reader = FrameReader()
    reader.feed(encode_frame(message))
    return reader.next_frame()


# --- The table


def test_the_interface_is_exactly_six_requests() -> None:
    """The four the issue names, the argument-free prepare_firewall, and read_hole, which only
    reads a test's counters (for accounting while it runs)."""
    assert set(REQUESTS) == {
        "start_engine",
        "stop_engine",
        "open_hole",
        "close_hole",
        "read_hole",
        "prepare_firewall",
    }


def test_prepare_firewall_takes_no_arguments_and_only_in_direct_mode() -> None:
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_request({"type": "prepare_firewall", "table": "filter"})
    request = decode_request({"type": "prepare_firewall"})
    assert request == PrepareFirewall()
    tunneled = HelperPolicy.from_config(parse_config_text(""))
    refusal = tunneled.check(request, running={})
    assert refusal is not None and refusal.code == "not_permitted"
    direct = HelperPolicy.from_config(parse_config_text('[network]\nmode = "direct_ephemeral"\n'))
    assert direct.check(request, running={}) is None


@pytest.mark.parametrize(
    "message",
    [
        StartEngine(
            test_id="t1",
            kind="udp_echo",
            port=4000,
            duration_s=5,
            bind="::1",
            peer="2001:db8::1",
            limits=LIMITS,
            echo_key=KEY,
        ),
        StopEngine(test_id="t1"),
        OpenHole(test_id="t1", peer_addr="203.0.113.5", proto="udp", port=5205, ttl_s=30),
        CloseHole(test_id="t1"),
        ReadHole(test_id="t1"),
        PrepareFirewall(),
    ],
)
def test_every_request_survives_the_wire(message: Any) -> None:
    assert decode_request(roundtrip(message)) == message


@pytest.mark.parametrize(
    "message",
    [
        EngineStarted(
            test_id="t1",
            pid=42,
            unit="reflector-test-t1.scope",
            ready=True,
            protections=("scope", "memory_max"),
        ),
        EngineStopped(
            test_id="t1",
            exit_code=-15,
            runtime_ms=1200,
            stopped_by="runtime_limit",
            ip_ingress_bytes=None,
            ip_egress_bytes=1000,
        ),
        HoleOpened(test_id="t1"),
        HoleClosed(test_id="t1", packets=3, bytes=300, expired=0),
        HoleCounted(test_id="t1", packets=2, bytes=200, expired=None),
        FirewallReady(),
        Refused(code="busy", message="1 iperf3 engine(s) already running"),
    ],
)
def test_every_response_survives_the_wire(message: Any) -> None:
    assert decode_response(roundtrip(message)) == message


def test_an_unknown_request_type_is_refused() -> None:
    for kind in ("run_command", "engine_started", "START_ENGINE", None, 7):
        with pytest.raises(ProtocolError, match="unknown message type"):
            decode_request({"type": kind, "test_id": "t1"})


def test_a_response_type_is_not_a_request() -> None:
    with pytest.raises(ProtocolError):
        decode_request({"type": "refused", "code": "busy", "message": "x"})


def test_a_missing_field_is_refused() -> None:
    for name in start():
        if name == "type":
            continue
        doc = start()
        del doc[name]
        with pytest.raises(ProtocolError, match=f"missing field {name}"):
            decode_request(doc)


def test_an_extra_field_is_refused() -> None:
    with pytest.raises(ProtocolError, match="unknown field 'argv'"):
        decode_request(start(argv=["/bin/sh"]))
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_request(start(limits={**start()["limits"], "MemoryMax": "infinity"}))


# Every field of every request, with values of the wrong form.
BAD_FIELDS: list[tuple[str, Any]] = [
    ("test_id", ""),
    ("test_id", "a" * 65),
    ("test_id", "../../etc"),
    ("test_id", "a b"),
    ("test_id", "x.scope"),
    ("test_id", "ü"),
    ("test_id", 17),
    ("kind", "sh"),
    ("kind", "IPERF3"),
    ("port", 0),
    ("port", 65536),
    ("port", "5201"),
    ("port", True),
    ("port", 5201.0),
    ("duration_s", 0),
    ("duration_s", -1),
    ("duration_s", 10**6),
    ("bind", "localhost"),
    ("bind", "127.0.0.1 -p 1"),
    ("bind", "127.0.0.1/8"),
    ("bind", ""),
    ("peer", "192.0.2.10; rm -rf /"),
    ("peer", ["192.0.2.10"]),
    ("limits", None),
    ("limits", {"memory_max_bytes": 0, "cpu_quota_percent": 50, "tasks_max": 8}),
    ("limits", {"memory_max_bytes": "1M", "cpu_quota_percent": 50, "tasks_max": 8}),
    ("limits", {"memory_max_bytes": 1, "cpu_quota_percent": 0, "tasks_max": 8}),
    ("limits", {"memory_max_bytes": 1, "cpu_quota_percent": 50, "tasks_max": False}),
    ("echo_key", "00" * 31),
    ("echo_key", "ZZ" * 32),
    ("echo_key", "AB" * 32),
    ("echo_key", 5),
]


@pytest.mark.parametrize(("name", "value"), BAD_FIELDS)
def test_a_start_field_of_the_wrong_form_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=name):
        decode_request(start(**{name: value}))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("peer_addr", "example.com"),
        ("proto", "icmp"),
        ("proto", "TCP"),
        ("port", 70000),
        ("ttl_s", 0),
        ("ttl_s", "60"),
        ("test_id", "a/b"),
    ],
)
def test_a_hole_field_of_the_wrong_form_is_refused(name: str, value: Any) -> None:
    with pytest.raises(ProtocolError, match=name):
        decode_request(hole(**{name: value}))


def test_addresses_are_rewritten_canonically() -> None:
    req = decode_request(start(peer="::ffff:192.0.2.10", bind="0:0:0:0:0:0:0:1"))
    assert isinstance(req, StartEngine)
    assert (req.peer, req.bind) == ("192.0.2.10", "::1")


def test_the_echo_key_is_bytes_after_decoding_and_never_in_repr() -> None:
    req = decode_request(echo())
    assert isinstance(req, StartEngine)
    assert req.echo_key == KEY
    assert KEY.hex() not in repr(req)


# --- Framing


def test_a_frame_is_a_length_then_json_with_its_type() -> None:
    frame = encode_frame(StopEngine(test_id="t1"))
    (length,) = HEADER.unpack_from(frame)
    assert length == len(frame) - HEADER.size
    assert json.loads(frame[HEADER.size :]) == {"type": "stop_engine", "test_id": "t1"}


def test_frames_arrive_in_pieces_and_back_to_back() -> None:
    frames = encode_frame(StopEngine(test_id="a")) + encode_frame(CloseHole(test_id="b"))
    reader = FrameReader()
    got = []
    for byte in frames:
        reader.feed(bytes([byte]))
        if (doc := reader.next_frame()) is not None:
            got.append(decode_request(doc))
    assert got == [StopEngine(test_id="a"), CloseHole(test_id="b")]


def test_an_oversized_frame_is_refused_by_the_receiver_before_its_body_arrives() -> None:
    reader = FrameReader()
    with pytest.raises(ProtocolError, match="exceeds"):
        reader.feed(HEADER.pack(MAX_FRAME_BYTES + 1))


def test_an_oversized_frame_is_refused_by_the_sender() -> None:
    with pytest.raises(ProtocolError, match="exceeds"):
        encode_frame(Refused(code="internal", message="x" * (MAX_FRAME_BYTES + 1)))


def test_empty_and_non_json_frames_are_refused() -> None:
    with pytest.raises(ProtocolError, match="empty"):
        FrameReader().feed(HEADER.pack(0))
    reader = FrameReader()
    reader.feed(HEADER.pack(3) + b"\xff{}")
    with pytest.raises(ProtocolError, match="JSON"):
        reader.next_frame()


def test_random_bytes_raise_only_the_protocol_error() -> None:
    rng = random.Random(6)
    for _ in range(2000):
        reader = FrameReader()
        size = rng.randrange(1, 64)
        data = HEADER.pack(size) + rng.randbytes(size)
        try:
            reader.feed(data)
            doc = reader.next_frame()
            if doc is not None:
                decode_request(doc)
        except ProtocolError:
            pass


def test_a_refusal_becomes_a_privsep_error_with_its_code() -> None:
    error = Refused(code="out_of_range", message="port 80 is outside 5201-5210").error()
    assert isinstance(error, PrivsepError)
    assert (error.code, error.message) == ("out_of_range", "port 80 is outside 5201-5210")


# --- Meaning: the helper's own reading of the config


def test_the_policy_comes_from_the_config() -> None:
    assert POLICY.data_ports == range(5201, 5211)
    assert POLICY.control_ports == {4000, 4443}
    assert POLICY.max_duration_s == 65  # max_test_duration_sec + session_grace_sec
    assert (LIMITS.memory_max_bytes, LIMITS.cpu_quota_percent, LIMITS.tasks_max) == (
        256 * 1024 * 1024,
        100,
        32,
    )


def test_a_permitted_request_passes() -> None:
    assert check(start()) is None
    assert check(echo(port=5210, bind="192.0.2.1")) is None


@pytest.mark.parametrize("port", [5200, 5211, 4000, 22, 65535])
def test_an_iperf3_port_outside_the_data_range_is_refused(port: int) -> None:
    refusal = check(start(port=port))
    assert refusal is not None
    assert refusal.code == "out_of_range"


def test_the_echo_may_use_exactly_the_control_ports() -> None:
    assert check(echo(port=4000)) is None
    assert check(echo(port=4443)) is None
    refusal = check(echo(port=4001))
    assert refusal is not None
    assert refusal.code == "out_of_range"


def test_in_tunneled_mode_iperf3_binds_only_loopback() -> None:
    refusal = check(start(bind="192.0.2.1"))
    assert refusal is not None
    assert refusal.code == "out_of_range"
    assert check(start(bind="::1")) is None
    assert check(start(bind="192.0.2.1"), HelperPolicy.from_config(DIRECT)) is None


def test_a_duration_beyond_the_quota_and_grace_is_refused() -> None:
    assert check(start(duration_s=65)) is None
    refusal = check(start(duration_s=66))
    assert refusal is not None
    assert refusal.code == "out_of_range"


@pytest.mark.parametrize(
    "limits",
    [
        {"memory_max_bytes": 256 * 1024 * 1024 + 1, "cpu_quota_percent": 100, "tasks_max": 32},
        {"memory_max_bytes": 1, "cpu_quota_percent": 101, "tasks_max": 32},
        {"memory_max_bytes": 1, "cpu_quota_percent": 100, "tasks_max": 33},
    ],
)
def test_limits_above_the_config_are_refused(limits: dict[str, int]) -> None:
    refusal = check(start(limits=limits))
    assert refusal is not None
    assert refusal.code == "over_limit"


def test_limits_at_the_config_pass() -> None:
    caps = {"memory_max_bytes": 256 * 1024 * 1024, "cpu_quota_percent": 100, "tasks_max": 32}
    assert check(start(limits=caps)) is None


def test_at_most_max_concurrent_tests_engines_of_a_kind_run() -> None:
    refusal = check(start(), iperf3=1)
    assert refusal is not None
    assert refusal.code == "busy"
    # A throughput test's latency-under-load echo is the other kind: still allowed.
    assert check(echo(), iperf3=1) is None


def test_the_echo_key_belongs_to_the_echo_only() -> None:
    for doc in (start(echo_key=KEY.hex()), echo(echo_key=None)):
        refusal = check(doc)
        assert refusal is not None
        assert refusal.code == "bad_request"


def test_disabled_test_kinds_are_not_permitted() -> None:
    config = parse_config_text("[quotas]\nallow_throughput = false\nallow_udp_echo = false\n")
    policy = HelperPolicy.from_config(config)
    for doc in (start(), echo()):
        refusal = check(doc, policy)
        assert refusal is not None
        assert refusal.code == "not_permitted"


def test_holes_exist_only_in_direct_mode() -> None:
    refusal = check(hole())
    assert refusal is not None
    assert refusal.code == "not_permitted"
    assert check(hole(), HelperPolicy.from_config(DIRECT)) is None


def test_a_hole_outside_the_range_or_beyond_the_longest_test_is_refused() -> None:
    direct = HelperPolicy.from_config(DIRECT)
    longest = direct.max_duration_s + direct.runtime_grace_s
    assert check(hole(ttl_s=longest), direct) is None
    for doc in (hole(port=4000), hole(port=5211), hole(ttl_s=longest + 1)):
        refusal = check(doc, direct)
        assert refusal is not None
        assert refusal.code == "out_of_range"


def test_stop_close_and_read_only_name_a_test() -> None:
    assert check({"type": "stop_engine", "test_id": "t1"}) is None
    assert check({"type": "close_hole", "test_id": "t1"}) is None
    assert check({"type": "read_hole", "test_id": "t1"}) is None
    with pytest.raises(ProtocolError, match="unknown field"):
        decode_request({"type": "read_hole", "test_id": "t1", "reset": True})
    with pytest.raises(ProtocolError, match="test_id must be"):
        decode_request({"type": "read_hole", "test_id": "t1; flush ruleset"})


def test_sizes_and_percentages_use_systemd_units() -> None:
    assert parse_size("512") == 512
    assert parse_size("4K") == 4096
    assert parse_size("256M") == 256 * 1024**2
    assert parse_size("2G") == 2 * 1024**3
    assert parse_cpu_percent("150%") == 150
    with pytest.raises(ValueError):
        parse_size("1T")


def test_to_wire_renders_bytes_as_hex_and_tuples_as_lists() -> None:
    doc = to_wire(decode_request(echo()))
    assert doc["echo_key"] == KEY.hex()
    assert doc["limits"] == start()["limits"]
