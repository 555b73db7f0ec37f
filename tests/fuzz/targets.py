"""Fuzz targets: one function per parser that reads bytes from outside, each taking `bytes`.

The contract every target checks (issue 8, "Hostile input"): whatever the bytes, the only
exception that may come out of the code under test is that module's own error type. Anything
else (a `RecursionError`, a bare `ValueError`, an `AssertionError` from a property below) is a
crash: atheris saves the input as a reproducer, hypothesis prints it shrunk.

Beyond "no foreign exception", each target checks properties of what was accepted: it
round-trips through the module's own encoder, error replies are themselves valid frames, a
UDP echo reply is never larger than its request and never answers an unauthenticated one, a
refusal never quotes a secret. They read as the parser's specification for hostile input.

Targets are plain functions of `bytes`, so the same code serves atheris (`run_atheris.py`,
coverage-guided) and hypothesis (`test_fuzz_bounded.py`); nothing here imports atheris.
Where a target needs several inputs (a packet and the key to sign it with, a message and its
signature), it carves them out of the bytes with the small helpers at the top, so a mutation
anywhere still means something.

`KNOWN_BUGS` lists the crashes found so far that product code has not fixed yet, each with its
reproducer. A known bug is tolerated (the target returns) unless strict mode is on
(`run_atheris.py --strict`), so the bounded CI run keeps finding *new* bugs; a test asserts
that each known bug still reproduces, and fails as soon as one is fixed so its entry goes.
"""

# The targets check errors that may or may not be raised, so pytest.raises() does not fit.
# ruff: noqa: PT017

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reflector.config import Config, config_to_toml, parse_config_text
from reflector.endpoint_id import endpoint_id_from_public_key, is_valid_id, parse_id
from reflector.engines.stamp import (
    AUTH_PACKET_LEN,
    HMAC_COVERED_LEN,
    MAX_PACKET_LEN,
    ReflectorPacket,
    SenderPacket,
    StampError,
    compute_hmac,
    decode_error_estimate,
    decode_reflector,
    decode_sender,
    encode_reflector,
    encode_sender,
    ntp_to_unix_ns,
    verify_hmac,
)
from reflector.engines.udp_echo import RATE_BURST_PACKETS, EchoCore
from reflector.errors import ConfigError, EndpointIdError
from reflector.link.connection import ClientConnection, ProtocolViolation, Reply, ServerConnection
from reflector.link.frames import (
    HEADER_SIZE,
    MAX_FRAME_SIZE,
    NEED_DATA,
    ErrorCode,
    FrameDecoder,
    RemoteProtocolError,
    decode_json,
    encode_frame,
)
from reflector.link.messages import (
    MAX_ERROR_MESSAGE_LEN,
    MAX_REQUEST_ID,
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
    PairOk,
    PathMeta,
    Request,
    Response,
    Result,
    ServerHello,
    SessionClose,
    SessionGrant,
    SessionRequest,
    StatusSnapshot,
    ThroughputParams,
    UdpEchoParams,
    direction_of,
    message_to_dict,
    parse_message,
    peek_request_id,
    response_answers,
    validate_outgoing,
)
from reflector.privsep import protocol as privsep_protocol
from reflector.privsep.protocol import (
    CloseHole,
    EngineLimits,
    EngineStarted,
    EngineStopped,
    FrameReader,
    HoleClosed,
    HoleCounted,
    OpenHole,
    ProtocolError,
    ReadHole,
    Refused,
    StartEngine,
    StopEngine,
    decode_request,
    decode_response,
)
from reflector.server.health_http import (
    HEALTH_FIELDS,
    BadRequest,
    parse_request_head,
    response_for,
)
from reflector.tunnel.wire import (
    MAX_OPEN_FRAME_SIZE,
    TunnelOpen,
    encode_tunnel_error,
    encode_tunnel_ok,
    encode_tunnel_open,
    parse_tunnel_open,
    parse_tunnel_reply,
    split_first_frame,
)
from reflector.update.manifest import (
    Artifact,
    ManifestError,
    format_manifest,
    parse_manifest,
)
from reflector.update.minisign import (
    SignatureError,
    format_public_key,
    parse_public_key,
    parse_signature,
    sign,
    verify_text,
)

# libFuzzer's own default; inputs above it are rarely needed to reach a branch and slow
# every execution down.
DEFAULT_MAX_LEN: Final = 4096
# Python's int() refuses decimal strings above 4300 digits (sys.int_info.default_max_str_digits)
# with a bare ValueError: inputs must be able to exceed that for the parsers that use json.loads.
LONG_INPUT_MAX_LEN: Final = 8192
# The privileged helper's frame limit is 16 KiB: room to announce, send and exceed it.
PRIVSEP_MAX_LEN: Final = 20 * 1024
# A small frame limit makes "oversized frame" reachable with short inputs.
SMALL_FRAME_LIMIT: Final = 64
# How many datagrams one UDP echo input may carry: enough to drain a rate bucket
# (RATE_BURST_PACKETS) and cross a deadline, bounded so one input stays fast.
MAX_DATAGRAMS_PER_INPUT: Final = 64

_ERROR_CODES: Final = frozenset(code.value for code in ErrorCode)
_CONTENT_ERRORS: Final = frozenset(
    {ErrorCode.BAD_MESSAGE, ErrorCode.UNKNOWN_TYPE, ErrorCode.BAD_FIELD}
)
_FRAMING_ERRORS: Final = frozenset({ErrorCode.FRAME_TOO_LARGE, ErrorCode.BAD_FRAME})
_PRINTABLE: Final = re.compile(r"[\x21-\x7e]+")


# --------------------------------------------------------------------------------------------
# Carving helpers: turn one byte string into the several inputs a target needs.
# --------------------------------------------------------------------------------------------


def _flags(data: bytes) -> tuple[int, bytes]:
    """The first byte as option bits, and the rest as the input proper."""
    return (data[0], data[1:]) if data else (0, b"")


def _chunks(data: bytes, flags: int) -> Iterator[bytes]:
    """`data` in pieces of 2**(flags & 15) bytes: from byte-at-a-time to all at once."""
    step = 1 << (flags & 0x0F)
    for start in range(0, len(data), step):
        yield data[start : start + step]


def _parts(data: bytes, count: int) -> list[bytes]:
    """`data` split at NUL bytes into exactly `count` parts (the last keeps any further NULs)."""
    parts = data.split(b"\0", count - 1)
    return parts + [b""] * (count - len(parts))


def _one_line(text: str) -> bool:
    return "\n" not in text and "\r" not in text


# --------------------------------------------------------------------------------------------
# Paramedic Link: frames, messages, the server and the client state machines.
# --------------------------------------------------------------------------------------------


def _sample_requests() -> list[Request]:
    """One valid request of every type, with request_ids 1 to 9 (hello first)."""
    return [
        Hello(request_id=1, version=1, features=("udp_echo",)),
        SessionRequest(
            request_id=2,
            test_type="throughput",
            params=ThroughputParams(duration_sec=5, protocol="tcp", streams=2, reverse=False),
        ),
        SessionRequest(
            request_id=3,
            test_type="udp_echo",
            params=UdpEchoParams(duration_sec=5, interval_ms=20, packet_size=112),
        ),
        GetStatus(request_id=4),
        Pair(request_id=5, token="K7Q2-M9XD-4HRT"),
        SessionClose(request_id=6, session_id="s_0123-abc"),
        GetPathMeta(request_id=7),
        GetResult(request_id=8, session_id="s1"),
        Health(request_id=9),
    ]


def _sample_responses() -> list[Response]:
    """One valid answer to each of `_sample_requests()`, by request_id, plus an error."""
    return [
        ServerHello(
            request_id=1,
            version=1,
            features=("udp_echo",),
            endpoint_id="PP3X-K7Q2",
            policy_summary={"max_duration_sec": 60, "tests": ["udp_echo"]},
        ),
        SessionGrant(
            request_id=2,
            session_id="s1",
            test_id="s1",
            test_type="throughput",
            mode="tunneled",
            ports={"data": 5201},
            token="dG9rZW4",
            expires_at=1_700_000_060.25,
        ),
        ErrorResponse(request_id=3, code="quota_exceeded", message="later", retry_after=60),
        StatusSnapshot(request_id=4, sessions=({"id": "s1", "state": "running"},), quota={}),
        PairOk(request_id=5, peer_id="PPAB-CDEF"),
        Ok(request_id=6),
        PathMeta(request_id=7, meta={"mtu": 1500, "cpu": 0.5}),
        Result(request_id=8, session_id="s1", result={"rtt_us": [31, 40], "loss": 0.0}),
        HealthStatus(request_id=9, status="ok", version="0.1.0", load=0.25),
        ErrorResponse(request_id=0, code="bad_json", message="not valid JSON"),
    ]


def _sample_documents() -> list[dict[str, object]]:
    """Valid requests and responses as JSON objects: the seeds for message mutations."""
    return [message_to_dict(m) for m in [*_sample_requests(), *_sample_responses()]]


def _hello_frame() -> bytes:
    return encode_frame(message_to_dict(Hello(request_id=1, version=1)))


def _link_stream_seeds() -> list[bytes]:
    frames = b"".join(encode_frame(doc) for doc in _sample_documents())
    return [
        b"\x0f" + _hello_frame(),
        b"\x0f" + frames,
        b"\x00" + frames[:40],  # byte at a time, truncated
        b"\x8f" + encode_frame({"type": "launch_missiles", "request_id": 3}),
        b"\x0f" + (10 * 1024 * 1024).to_bytes(HEADER_SIZE, "big"),
        b"\x0f" + bytes(HEADER_SIZE),
        b"\x0f" + (5).to_bytes(HEADER_SIZE, "big") + b"{nope",
    ]


def _link_client_seeds() -> list[bytes]:
    """Answers to the client's pending requests, in and out of order, and cut short."""
    answers = [encode_frame(message_to_dict(r)) for r in _sample_responses()]
    in_order = b"".join(answers)
    return [b"\x0f" + in_order, b"\x00" + in_order[:300], b"\x0f" + b"".join(answers[::-1])]


def _json_as_stream(text: str) -> bytes:
    """JSON text as a Link stream: flags (all at once, after a hello), then one frame."""
    payload = text.encode()
    return b"\x8f" + len(payload).to_bytes(HEADER_SIZE, "big") + payload


def _json_as_bytes(text: str) -> bytes:
    return text.encode()


def link_frames(data: bytes) -> None:
    """FrameDecoder: only RemoteProtocolError; what comes out is exactly what was framed."""
    flags, body = _flags(data)
    for limit in (SMALL_FRAME_LIMIT, MAX_FRAME_SIZE):
        decoder = FrameDecoder(limit)
        payloads: list[bytes] = []
        error: RemoteProtocolError | None = None
        for chunk in _chunks(body, flags):
            decoder.receive_data(chunk)
            # Spec §6.1: at most one incomplete frame is ever held back.
            assert decoder.buffered_bytes <= limit + HEADER_SIZE - 1
            error = _drain(decoder, payloads)
            if error is not None:
                break
        reframed = b"".join(len(p).to_bytes(HEADER_SIZE, "big") + p for p in payloads)
        assert body.startswith(reframed)
        if error is not None:
            assert error.code in _FRAMING_ERRORS
            decoder.receive_data(b"\0" * HEADER_SIZE)
            assert _drain(decoder, payloads) is not None, "a framing error must stick"
        for payload in payloads:
            try:
                decode_json(payload)
            except RemoteProtocolError as exc:
                assert exc.code == ErrorCode.BAD_JSON


def _drain(decoder: FrameDecoder, into: list[bytes]) -> RemoteProtocolError | None:
    while True:
        try:
            frame = decoder.next_frame()
        except RemoteProtocolError as exc:
            return exc
        if frame is NEED_DATA:
            return None
        into.append(frame)


def link_messages(data: bytes) -> None:
    """decode_json + parse_message: only RemoteProtocolError; accepted messages round-trip."""
    try:
        obj = decode_json(data)
    except RemoteProtocolError as exc:
        assert exc.code == ErrorCode.BAD_JSON
        assert _one_line(exc.message)
        return
    assert 0 <= peek_request_id(obj) <= MAX_REQUEST_ID
    for direction in Direction:
        try:
            msg = parse_message(obj, direction)
        except RemoteProtocolError as exc:
            assert exc.code in _CONTENT_ERRORS
            # The reason travels back to the peer in an error reply: one bounded line.
            assert _one_line(exc.message)
            assert len(exc.message) <= MAX_ERROR_MESSAGE_LEN
            continue
        assert direction_of(msg) is direction
        assert parse_message(validate_outgoing(msg), direction) == msg


def _check_violation(violation: ProtocolViolation) -> None:
    """A violation's reply is one valid `error` frame carrying the violation's code and id."""
    assert violation.code in _ERROR_CODES
    decoder = FrameDecoder()
    decoder.receive_data(violation.reply)
    payload = decoder.next_frame()
    assert payload is not NEED_DATA
    assert decoder.next_frame() is NEED_DATA and decoder.buffered_bytes == 0
    reply = parse_message(decode_json(payload), Direction.RESPONSE)
    assert isinstance(reply, ErrorResponse)
    assert (reply.code, reply.request_id) == (violation.code, violation.request_id)
    assert _one_line(reply.message)


def link_server(data: bytes) -> None:
    """ServerConnection fed any stream: validated requests or ProtocolViolation events, only.

    Flag bits: 0-3 chunk size, 6 answer every request (frees in-flight slots), 7 a valid
    hello first (so the open phase, where every request type is admitted, is reachable).
    """
    flags, body = _flags(data)
    if flags & 0x80:
        body = _hello_frame() + body
    server = ServerConnection()
    for chunk in _chunks(body, flags):
        server.receive_data(chunk)
        while (event := server.next_event()) is not NEED_DATA:
            if isinstance(event, ProtocolViolation):
                _check_violation(event)
                if event.close:
                    assert server.closed
                    return
                continue
            assert isinstance(event, Request)
            assert event.request_id in server.in_flight
            assert parse_message(message_to_dict(event), Direction.REQUEST) == event
            if flags & 0x40:
                server.send(ErrorResponse(request_id=event.request_id, code="fuzz", message=""))
                assert event.request_id not in server.in_flight


def link_client(data: bytes) -> None:
    """ClientConnection fed any stream: matched replies, or RemoteProtocolError, which sticks.

    Nine requests are pending, one of each type; flag bit 7 puts a valid server_hello first.
    """
    flags, body = _flags(data)
    client = ClientConnection()
    for request in _sample_requests():
        client.send_request(request)
    if flags & 0x80:
        body = encode_frame(message_to_dict(_sample_responses()[0])) + body
    try:
        for chunk in _chunks(body, flags):
            client.receive_data(chunk)
            while (event := client.next_event()) is not NEED_DATA:
                if isinstance(event, Reply):
                    assert response_answers(event.request, event.response)
                    assert event.request.request_id == event.response.request_id
                else:
                    assert _one_line(event.code)
    except RemoteProtocolError as failure:
        try:
            client.next_event()
        except RemoteProtocolError as again:
            assert again is failure
        else:
            raise AssertionError("a failed client connection must keep failing") from None


# --------------------------------------------------------------------------------------------
# Endpoint IDs
# --------------------------------------------------------------------------------------------


def endpoint_id(data: bytes) -> None:
    """parse_id: only EndpointIdError; what it accepts is canonical and spelled in ASCII."""
    text = data.decode("utf-8", errors="replace")
    try:
        canonical = parse_id(text)
    except EndpointIdError as exc:
        assert not is_valid_id(text)
        assert _one_line(str(exc))
        return
    assert is_valid_id(text)
    assert parse_id(canonical) == canonical
    # The module's own rule: non-ASCII letters that upper-case to ASCII ones must stay errors,
    # so one ID has one spelling a person can compare by eye.
    assert all(ch.isascii() for ch in text if ch.isalnum()), "accepted a non-ASCII letter"


def _endpoint_id_seeds() -> list[bytes]:
    canonical = endpoint_id_from_public_key(bytes(range(32)))
    return [
        canonical.encode(),
        canonical.lower().replace("-", " ").encode(),
        canonical.replace("0", "o").replace("1", "l").encode(),
        canonical[:-1].encode(),
        "PP\u2013".encode() + canonical[2:].encode(),
    ]


# --------------------------------------------------------------------------------------------
# The config loader
# --------------------------------------------------------------------------------------------

_CONFIG_LABEL: Final = "fuzz.toml"


def config(data: bytes) -> None:
    """parse_config_text: only ConfigError; an accepted config survives `config show`."""
    text = data.decode("utf-8", errors="replace")
    try:
        parsed = parse_config_text(text, label=_CONFIG_LABEL)
    except ConfigError as exc:
        assert str(exc).startswith(f"{_CONFIG_LABEL}: ")
        assert _one_line(str(exc)), "a config error spans several lines"
        return
    shown = config_to_toml(parsed)
    try:
        again = parse_config_text(shown)
    except ConfigError as exc:
        raise AssertionError(f"config_to_toml output does not parse: {exc}") from None
    assert again == parsed


def _config_seeds() -> list[bytes]:
    peer = endpoint_id_from_public_key(bytes(range(32)))
    example = f"""
[service]
state_dir = "/var/lib/reflector"
log_level = "info"

[network]
listen_address = ["0.0.0.0:4000", "[::]:4000"]
mode = "tunneled"
data_port_range_start = 5201
data_port_range_end = 5299
health_http_address = "127.0.0.1:8080"

[access]
pairing_enabled = true
authorized_peers = ["{peer}"]

[quotas]
max_test_duration_sec = 60
heavy_tests_window = "01:00-06:00"
timezone = "Europe/Berlin"

[quotas.peers."{peer}"]
max_tests_per_hour = 3

[limits]
memory_max = "256M"
cpu_quota = "50%"
"""
    return [example.encode(), config_to_toml(Config()).encode(), b"[quotas]\ncooldown_sec = 5\n"]


# --------------------------------------------------------------------------------------------
# STAMP packets and the UDP echo reflector
# --------------------------------------------------------------------------------------------

STAMP_KEY: Final = bytes(range(32))
ECHO_KEYS: Final = (bytes([0xA1]) * 32, bytes([0xB1]) * 32, bytes([0xB2]) * 32)
# Peer A holds one session; peer B two (the reflector must find the one whose key signed).
PEER_A: Final = "198.51.100.2"
PEER_B: Final = "198.51.100.3"
# Index 0-1: granted peers; 2-3: spoofed or unknown sources.
ECHO_SOURCES: Final = (PEER_A, PEER_B, "203.0.113.9", "2001:db8::9")
ECHO_T0: Final = 1000.0
# Session B1 expires early so that the deadline is crossed within one input; the others last.
ECHO_SHORT_S: Final = 2.0
ECHO_LONG_S: Final = 60.0
# A low rate, so a few dozen datagrams per input can exhaust the bucket.
ECHO_PPS: Final = 4
ECHO_ERROR_ESTIMATE: Final = 0x8001
RX_NTP: Final = 0x83AA7E80_80000000
TX_NTP: Final = 0x83AA7E80_90000000
TTL: Final = 64


def _signed(packet: bytes, key: bytes) -> bytes:
    """`packet` with its HMAC field made valid under `key` (if it is long enough to have one)."""
    if len(packet) < AUTH_PACKET_LEN:
        return packet
    mac = compute_hmac(key, packet[:HMAC_COVERED_LEN])
    return packet[:HMAC_COVERED_LEN] + mac + packet[AUTH_PACKET_LEN:]


def stamp(data: bytes) -> None:
    """decode_sender/decode_reflector: only StampError; they accept exactly the authentic.

    Flag bit 0 signs the packet with the key first, so the field decoding behind the HMAC check
    is reached too.
    """
    flags, packet = _flags(data)
    if flags & 1:
        packet = _signed(packet, STAMP_KEY)
    authentic = AUTH_PACKET_LEN <= len(packet) <= MAX_PACKET_LEN and verify_hmac(STAMP_KEY, packet)
    for decode in (decode_sender, decode_reflector):
        try:
            decode(packet, STAMP_KEY)
        except StampError as exc:
            assert exc.reason in {"length", "hmac"}
            assert not authentic
        else:
            assert authentic
    if not authentic:
        return
    sender = decode_sender(packet, STAMP_KEY)
    assert decode_sender(encode_sender(sender, STAMP_KEY, length=len(packet)), STAMP_KEY) == sender
    decode_error_estimate(sender.error_estimate)
    ntp_to_unix_ns(sender.timestamp)
    reflected = decode_reflector(packet, STAMP_KEY)
    again = encode_reflector(reflected, STAMP_KEY, trailer=packet[AUTH_PACKET_LEN:])
    assert len(again) == len(packet)
    assert decode_reflector(again, STAMP_KEY) == reflected


def _stamp_seeds() -> list[bytes]:
    sender = SenderPacket(seq=7, timestamp=RX_NTP, error_estimate=ECHO_ERROR_ESTIMATE, ssid=3)
    reflector = ReflectorPacket(
        seq=1,
        timestamp=TX_NTP,
        error_estimate=ECHO_ERROR_ESTIMATE,
        ssid=3,
        receive_timestamp=RX_NTP,
        sender_seq=7,
        sender_timestamp=RX_NTP,
        sender_error_estimate=ECHO_ERROR_ESTIMATE,
        sender_ttl=TTL,
    )
    return [
        b"\0" + encode_sender(sender, STAMP_KEY),
        b"\1" + encode_sender(sender, STAMP_KEY, length=300),
        b"\0" + encode_reflector(reflector, STAMP_KEY, trailer=b"tlv"),
        b"\1" + bytes(44),  # an unauthenticated-mode STAMP packet
    ]


def _datagrams(data: bytes) -> Iterator[tuple[int, bytes]]:
    """Records of [header byte][u16 length, low 11 bits][datagram]: up to 2047 bytes each."""
    position = 0
    for _ in range(MAX_DATAGRAMS_PER_INPUT):
        if position >= len(data):
            return
        header = data[position]
        length = int.from_bytes(data[position + 1 : position + 3], "big") & 0x7FF
        start = position + 3
        yield header, data[start : start + length]
        position = start + length


def _echo_record(header: int, datagram: bytes) -> bytes:
    return bytes([header]) + len(datagram).to_bytes(2, "big") + datagram


@dataclass(frozen=True, kw_only=True)
class _EchoSession:
    peer: str
    key: bytes
    deadline: float


def _echo_core() -> tuple[EchoCore, dict[str, _EchoSession]]:
    sessions = {
        "a": _EchoSession(peer=PEER_A, key=ECHO_KEYS[0], deadline=ECHO_T0 + ECHO_LONG_S),
        "b1": _EchoSession(peer=PEER_B, key=ECHO_KEYS[1], deadline=ECHO_T0 + ECHO_SHORT_S),
        "b2": _EchoSession(peer=PEER_B, key=ECHO_KEYS[2], deadline=ECHO_T0 + ECHO_LONG_S),
    }
    core = EchoCore()
    for session_id, s in sessions.items():
        core.add_session(
            session_id,
            s.peer,
            s.key,
            deadline=s.deadline,
            max_pps=ECHO_PPS,
            error_estimate=ECHO_ERROR_ESTIMATE,
            now=ECHO_T0,
        )
    return core, sessions


def udp_echo(data: bytes) -> None:
    """EchoCore.receive on any datagrams from any source: never raises, never amplifies, and
    answers only an authentic probe from its session's own peer, in time and within the rate.

    Each record's header: bits 0-1 the source (granted or spoofed), bits 2-3 sign with no key
    or with one of the three session keys, bits 4-6 advance the clock by that many 0.25 s.
    """
    core, sessions = _echo_core()
    now = ECHO_T0
    replies: Counter[str] = Counter()
    received = 0
    for header, raw in _datagrams(data):
        now += ((header >> 4) & 7) * 0.25
        source = ECHO_SOURCES[header & 3]
        signer = (header >> 2) & 3
        datagram = _signed(raw, ECHO_KEYS[signer - 1]) if signer else raw
        pending = core.receive(datagram, source, now=now, rx_ntp=RX_NTP, ttl=TTL)
        received += 1
        if pending is None:
            continue
        session = sessions[pending.session_id]
        assert source == session.peer, "answered a source that holds no session"
        assert AUTH_PACKET_LEN <= len(datagram) <= MAX_PACKET_LEN
        assert verify_hmac(session.key, datagram), "answered a probe without a valid HMAC"
        assert now < session.deadline, "answered after the session's deadline"
        reply = pending.finish(TX_NTP)
        assert pending.size == len(reply) == len(datagram), "a reply must not be larger"
        probe = decode_sender(datagram, session.key)
        answer = decode_reflector(reply, session.key)
        assert (answer.sender_seq, answer.sender_timestamp) == (probe.seq, probe.timestamp)
        assert (answer.receive_timestamp, answer.timestamp) == (RX_NTP, TX_NTP)
        assert (answer.seq, answer.ssid, answer.sender_ttl) == (
            replies[pending.session_id],
            probe.ssid,
            TTL,
        )
        replies[pending.session_id] += 1
        allowed = RATE_BURST_PACKETS + ECHO_PPS * (now - ECHO_T0)
        assert replies[pending.session_id] <= allowed, "the rate clamp let too many through"
    total = core.stats()
    assert total.rx_packets == received
    # Every datagram is either answered or dropped with a reason, exactly once.
    assert total.tx_packets + total.dropped_total == received
    assert total.tx_bytes <= total.rx_bytes


def _udp_echo_seeds() -> list[bytes]:
    probe = SenderPacket(seq=1, timestamp=RX_NTP, error_estimate=ECHO_ERROR_ESTIMATE, ssid=9)
    good_a = encode_sender(probe, ECHO_KEYS[0])
    good_b2 = encode_sender(probe, ECHO_KEYS[2], length=200)
    return [
        _echo_record(0x00, good_a) + _echo_record(0x11, good_b2),
        _echo_record(0x04, bytes(AUTH_PACKET_LEN)) * 12,  # signed, a burst past the bucket
        _echo_record(0x02, good_a) + _echo_record(0x73, good_a),  # spoofed, then unknown
        _echo_record(0x09, bytes(MAX_PACKET_LEN + 1)) + _echo_record(0x71, bytes(44)),
    ]


# --------------------------------------------------------------------------------------------
# The tunnel's first frame
# --------------------------------------------------------------------------------------------


def _claimed_token(payload: bytes) -> str | None:
    """The token a tunnel_open claims, read leniently by the harness (never by the product)."""
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError):
        return None
    token = obj.get("token") if isinstance(obj, dict) else None
    if not isinstance(token, str) or len(token) < 8:
        return None
    # A token that also spells a field name or another value may legitimately be quoted.
    others = [*map(str, obj), *(str(v) for k, v in obj.items() if k != "token")]
    return None if any(token in other for other in others) else token


# Printable, so a token made of it passes the token alphabet, and in no message template.
_TOKEN_MARKER_CHAR: Final = "~"


def _refusal(payload: bytes) -> RemoteProtocolError | None:
    try:
        parse_tunnel_open(payload)
    except RemoteProtocolError as exc:
        return exc
    return None


def _check_token_not_quoted(payload: bytes, exc: RemoteProtocolError) -> None:
    """A refusal never quotes the claimed token; a template word that equals it is no leak.

    The token may spell a word the refusal's own text uses ("tunnel_open" in "must be
    tunnel_open"). So when it shows up, the same bytes are refused again with the token swapped
    for a marker of equal length: a message that quotes the token would now quote the marker,
    while a template word stays where it was.
    """
    token = _claimed_token(payload)
    if token is None or token not in exc.message:
        return
    quoted = json.dumps(token).encode()
    if payload.count(quoted) != 1:
        return  # escaped or repeated in the raw bytes: the swap cannot be made faithfully
    marker = _TOKEN_MARKER_CHAR * len(token)
    again = _refusal(payload.replace(quoted, json.dumps(marker).encode()))
    assert again is not None and again.code == exc.code, "a refusal quoted the token"
    assert marker not in again.message, "a refusal quoted the token"
    assert again.message.count(token) == exc.message.count(token), "a refusal quoted the token"


def _check_tunnel_open(payload: bytes) -> None:
    try:
        opened = parse_tunnel_open(payload)
    except RemoteProtocolError as exc:
        assert exc.code in _CONTENT_ERRORS | {ErrorCode.BAD_JSON}
        assert _one_line(exc.message)
        _check_token_not_quoted(payload, exc)
        return
    assert _PRINTABLE.fullmatch(opened.token)
    frame = encode_tunnel_open(opened)
    split = split_first_frame(frame, MAX_OPEN_FRAME_SIZE)
    assert split is not None and split[1] == b""
    assert parse_tunnel_open(split[0]) == opened
    if opened.token not in f"TunnelOpen(session_id={opened.session_id!r})":
        assert opened.token not in repr(opened)


def tunnel(data: bytes) -> None:
    """split_first_frame + parse_tunnel_open/parse_tunnel_reply: only RemoteProtocolError."""
    try:
        split = split_first_frame(data, MAX_OPEN_FRAME_SIZE)
    except RemoteProtocolError as exc:
        assert exc.code in _FRAMING_ERRORS
        split = None
    if split is not None:
        payload, rest = split
        # Bytes behind the first frame belong to the relayed stream: all kept, none parsed.
        assert data == data[:HEADER_SIZE] + payload + rest
        _check_tunnel_open(payload)
    _check_tunnel_open(data)
    try:
        parse_tunnel_reply(data)
    except RemoteProtocolError as exc:
        assert _one_line(exc.message)


def _tunnel_seeds() -> list[bytes]:
    opened = TunnelOpen(session_id="s_0123-abc", token="dG9rZW4tc2VjcmV0LXZhbHVl")
    frame = encode_tunnel_open(opened)
    return [
        frame,
        frame + b"iperf3 cookie and stream bytes",
        frame[HEADER_SIZE:],
        encode_tunnel_ok()[HEADER_SIZE:],
        encode_tunnel_error("bad_token", "no such session")[HEADER_SIZE:],
        (MAX_OPEN_FRAME_SIZE + 1).to_bytes(HEADER_SIZE, "big"),
    ]


def _tunnel_documents() -> list[dict[str, object]]:
    return [
        {"type": "tunnel_open", "session_id": "s1", "token": "dG9rZW4tc2VjcmV0LXZhbHVl"},
        {"type": "tunnel_ok", "request_id": 0},
    ]


# --------------------------------------------------------------------------------------------
# The privileged helper's protocol
# --------------------------------------------------------------------------------------------


def _check_privsep_document(doc: object) -> None:
    for decode in (decode_request, decode_response):
        try:
            msg = decode(doc)
        except ProtocolError as exc:
            assert exc.code == "bad_request"
            assert _one_line(exc.message)
            continue
        reader = FrameReader()
        reader.feed(privsep_protocol.encode_frame(msg))
        assert decode(reader.next_frame()) == msg
        assert reader.pending == 0


def privsep(data: bytes) -> None:
    """FrameReader + decode_request/decode_response: only ProtocolError; accepted messages
    round-trip. The body is also parsed as one JSON document, so mutations reach the table
    without having to keep a frame length right."""
    flags, body = _flags(data)
    reader = FrameReader()
    try:
        for chunk in _chunks(body, flags):
            reader.feed(chunk)
            while (doc := reader.next_frame()) is not None:
                _check_privsep_document(doc)
    except ProtocolError as exc:
        assert exc.code == "bad_request"
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):  # the harness's own parse, not the product's
        return
    _check_privsep_document(doc)


def _privsep_messages() -> list[privsep_protocol.Request | privsep_protocol.Response]:
    limits = EngineLimits(memory_max_bytes=256 << 20, cpu_quota_percent=100, tasks_max=32)
    return [
        StartEngine(
            test_id="t1",
            kind="udp_echo",
            port=4000,
            duration_s=60,
            bind="0.0.0.0",
            peer="198.51.100.2",
            limits=limits,
            echo_key=bytes(32),
        ),
        StopEngine(test_id="t1"),
        OpenHole(test_id="t1", peer_addr="2001:db8::2", proto="tcp", port=5201, ttl_s=65),
        CloseHole(test_id="t1"),
        ReadHole(test_id="t1"),
        EngineStarted(
            test_id="t1", pid=42, unit="reflector-test-t1.scope", ready=True, protections=("x",)
        ),
        EngineStopped(
            test_id="t1",
            exit_code=0,
            runtime_ms=5,
            stopped_by="exit",
            ip_ingress_bytes=None,
            ip_egress_bytes=7,
        ),
        HoleClosed(test_id="t1", packets=1, bytes=2, expired=None),
        HoleCounted(test_id="t1", packets=1, bytes=2, expired=0),
        Refused(code="busy", message="one at a time"),
    ]


def _privsep_seeds() -> list[bytes]:
    frames = [privsep_protocol.encode_frame(m) for m in _privsep_messages()]
    return [b"\x0f" + frame for frame in frames] + [
        b"\x00" + frames[0],
        b"\x0f" + b"".join(frames),
        b"\x0f" + frames[1][HEADER_SIZE:],
        b"\x0f" + (privsep_protocol.MAX_FRAME_BYTES + 1).to_bytes(HEADER_SIZE, "big"),
    ]


def _json_as_privsep_frame(text: str) -> bytes:
    """JSON text as one helper frame, all at once (oversized ones still reach json.loads)."""
    body = text.encode()
    return b"\x0f" + len(body).to_bytes(HEADER_SIZE, "big") + body


def _privsep_documents() -> list[dict[str, object]]:
    return [privsep_protocol.to_wire(m) for m in _privsep_messages()]


# --------------------------------------------------------------------------------------------
# Self-update: minisign files and the release manifest
# --------------------------------------------------------------------------------------------

# A fixed signing key: seeds must be the same bytes on every run.
_RELEASE_KEY: Final = Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))


def minisign(data: bytes) -> None:
    """parse_signature/parse_public_key/verify_text: only SignatureError.

    The input is three NUL-separated parts: the signed message, the signature file and the
    public key file; each parser also reads the whole input.
    """
    for parse in (parse_signature, parse_public_key):
        try:
            parse(data)
        except SignatureError as exc:
            assert _one_line(str(exc))
    message, signature_text, key_text = _parts(data, 3)
    try:
        verified = verify_text(message, signature_text, key_text)
    except SignatureError as exc:
        assert _one_line(str(exc))
        return
    assert verified.key_id_hex == parse_public_key(key_text).key_id_hex
    assert verified.trusted_comment == parse_signature(signature_text).trusted_comment


def _minisign_seeds() -> list[bytes]:
    message = b"reflector-0.2.0-linux-amd64 manifest"
    public = format_public_key(_RELEASE_KEY.public_key()).encode()
    seeds = []
    for algorithm in ("ED", "Ed"):
        signature = sign(
            message, _RELEASE_KEY, trusted_comment="timestamp:1 file:m", algorithm=algorithm
        ).encode()
        seeds.append(message + b"\0" + signature + b"\0" + public)
    seeds.append(public.splitlines()[1])
    return seeds


def manifest(data: bytes) -> None:
    """parse_manifest: only ManifestError; an accepted manifest round-trips format_manifest."""
    try:
        parsed = parse_manifest(data)
    except ManifestError as exc:
        assert _one_line(str(exc))
        return
    again = parse_manifest(format_manifest(parsed.version.text, list(parsed.artifacts)))
    assert again == parsed


def _manifest_seeds() -> list[bytes]:
    artifacts = [
        Artifact(
            name=f"reflector-0.2.0rc1-linux-{arch}",
            os="linux",
            arch=arch,
            sha256="ab" * 32,
            size=31_457_280,
        )
        for arch in ("amd64", "arm64")
    ]
    return [format_manifest("0.2.0rc1", artifacts), format_manifest("0.2.0rc1", artifacts[1:])]


def _manifest_documents() -> list[dict[str, object]]:
    doc = json.loads(_manifest_seeds()[0])
    assert isinstance(doc, dict)
    return [doc]


# --------------------------------------------------------------------------------------------
# The plain-HTTP health port
# --------------------------------------------------------------------------------------------


def _health_facts() -> Mapping[str, object]:
    """A health callable that knows more than it may say: none of the extra may leak."""
    return {"status": "ok", "version": "0.1.0", "load": 0.5, "peers": ["SECRET-PEER"]}


def health_http(data: bytes) -> None:
    """parse_request_head: only BadRequest; response_for: a well-formed reply, never raises,
    200 only to GET /health and with exactly the public health fields."""
    try:
        head = parse_request_head(data)
    except BadRequest:
        head = None
    reply = response_for(data, _health_facts)
    status_line, _, rest = reply.partition(b"\r\n")
    assert status_line.startswith(b"HTTP/1.1 ")
    status = int(status_line.split(b" ")[1])
    fields, _, body = rest.partition(b"\r\n\r\n")
    assert f"Content-Length: {len(body)}".encode() in fields.split(b"\r\n")
    assert b"SECRET" not in reply
    if head is None:
        assert status == 400
    elif head.target.split("?", 1)[0] != "/health":
        assert status == 404
    elif head.method != "GET":
        assert status == 405
    else:
        assert status == 200
        assert set(json.loads(body)) == set(HEALTH_FIELDS)


def _health_seeds() -> list[bytes]:
    return [
        b"GET /health HTTP/1.1\r\nHost: endpoint\r\nUser-Agent: probe\r\n\r\n",
        b"GET /health?x=1 HTTP/1.0\r\n\r\n",
        b"POST /health HTTP/1.1\r\nHost: a\r\nContent-Length: 0\r\n\r\n",
        b"GET /status HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    ]


# --------------------------------------------------------------------------------------------
# The registry, the known bugs, and the strict switch
# --------------------------------------------------------------------------------------------


def selftest_crash(data: bytes) -> None:
    """Not a product target: crashes on its own seed, to prove a crash fails the run."""
    if data.startswith(b"CRASH"):
        raise RuntimeError("the fuzz harness self-test crashed on purpose")


@dataclass(frozen=True, kw_only=True)
class KnownBug:
    """A crash fuzzing found that product code has not fixed yet (see README.md)."""

    target: str
    where: str
    summary: str
    reproducer: bytes
    exception: type[BaseException]
    message_part: str

    def matches(self, exc: BaseException) -> bool:
        return isinstance(exc, self.exception) and self.message_part in str(exc)


def _privsep_frame(body: bytes) -> bytes:
    return b"\x0f" + len(body).to_bytes(HEADER_SIZE, "big") + body


_DEEP: Final = 2000
_LONG_DIGITS: Final = 4301

# Crashes the fuzzers found and product code has since fixed: kept as regression inputs, which
# every target must now handle with its own error type, in strict mode.
FIXED_BUGS: Final[tuple[KnownBug, ...]] = (
    KnownBug(
        target="config",
        where="reflector/config.py: parse_config_text (and load_config via _read_toml)",
        summary="deeply nested TOML arrays raise RecursionError instead of ConfigError",
        reproducer=b"a = " + b"[" * _DEEP + b"]" * _DEEP,
        exception=RecursionError,
        message_part="recursion",
    ),
    KnownBug(
        target="config",
        where="reflector/config.py: parse_config_text (and load_config via _read_toml)",
        summary="an integer literal of over 4300 digits raises ValueError, not ConfigError",
        reproducer=b"[quotas]\ncooldown_sec = " + b"9" * _LONG_DIGITS + b"\n",
        exception=ValueError,
        message_part="integer string conversion",
    ),
    KnownBug(
        target="config",
        where="reflector/config.py: _build and _convert_peer_table (the key in the message)",
        summary="a quoted key holding a newline makes the ConfigError message multi-line",
        reproducer=b'"a\\nb" = 1\n',
        exception=AssertionError,
        message_part="a config error spans several lines",
    ),
    KnownBug(
        target="config",
        where="reflector/config.py: config_to_toml / _toml_value",
        summary="`config show` writes control characters raw, so its output does not parse",
        reproducer=b'[iperf3]\npath = "/usr/bin/\\u0007iperf3"\n',
        exception=AssertionError,
        message_part="config_to_toml output does not parse",
    ),
    KnownBug(
        target="endpoint_id",
        where="reflector/endpoint_id.py: _normalise_slowly",
        summary="str.upper() turns U+017F and U+0131 into S and I, so non-ASCII IDs parse",
        reproducer=endpoint_id_from_public_key(bytes(32)).replace("S", "\u017f").encode(),
        exception=AssertionError,
        message_part="accepted a non-ASCII letter",
    ),
    KnownBug(
        target="privsep",
        where="reflector/privsep/protocol.py: FrameReader.next_frame",
        summary="a deeply nested JSON frame raises RecursionError instead of ProtocolError",
        reproducer=_privsep_frame(b"[" * _DEEP + b"]" * _DEEP),
        exception=RecursionError,
        message_part="recursion",
    ),
    KnownBug(
        target="privsep",
        where="reflector/privsep/protocol.py: FrameReader.next_frame",
        summary="a number of over 4300 digits raises ValueError instead of ProtocolError",
        reproducer=_privsep_frame(b"1" * _LONG_DIGITS),
        exception=ValueError,
        message_part="integer string conversion",
    ),
    KnownBug(
        target="manifest",
        where="reflector/update/manifest.py: parse_manifest",
        summary="deeply nested JSON raises RecursionError instead of ManifestError",
        reproducer=b"[" * _DEEP + b"]" * _DEEP,
        exception=RecursionError,
        message_part="recursion",
    ),
    KnownBug(
        target="manifest",
        where="reflector/update/manifest.py: parse_manifest",
        summary="a number of over 4300 digits raises ValueError instead of ManifestError",
        reproducer=b"1" * _LONG_DIGITS,
        exception=ValueError,
        message_part="integer string conversion",
    ),
    KnownBug(
        target="manifest",
        where="reflector/update/manifest.py: _exact_keys (the unknown key in the message)",
        summary="an unknown key holding a carriage return makes the ManifestError multi-line",
        reproducer=b'{ "format":"",\n"\\rai": "aa",\n "version": "2",\n"artifacts": [ ""]\n}\n',
        exception=AssertionError,
        message_part="",
    ),
)

# Crashes found and not fixed yet, tolerated by name outside strict mode (none at present).
KNOWN_BUGS: Final[tuple[KnownBug, ...]] = ()

_strict = False


def set_strict(strict: bool) -> None:
    """Strict: known bugs crash like new ones (for `run_atheris.py --strict` and their test)."""
    global _strict
    _strict = strict


def known_bug_for(target: str, exc: BaseException) -> KnownBug | None:
    return next((b for b in KNOWN_BUGS if b.target == target and b.matches(exc)), None)


@dataclass(frozen=True, kw_only=True)
class Target:
    """A fuzz target, its seeds, and (if it reads JSON) valid documents and how to turn JSON
    text into this target's input."""

    name: str
    check: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    max_len: int = DEFAULT_MAX_LEN
    documents: Callable[[], list[dict[str, object]]] | None = None
    from_json: Callable[[str], bytes] | None = None

    def __call__(self, data: bytes) -> None:
        """Run the check; a known bug ends the input quietly unless strict mode is on."""
        try:
            self.check(data)
        except Exception as exc:
            if _strict or known_bug_for(self.name, exc) is None:
                raise


def _all_targets() -> dict[str, Target]:
    targets = [
        Target(name="link_frames", check=link_frames, seeds=_link_stream_seeds),
        Target(
            name="link_messages",
            check=link_messages,
            seeds=lambda: [json.dumps(d).encode() for d in _sample_documents()],
            documents=_sample_documents,
            from_json=_json_as_bytes,
        ),
        Target(
            name="link_server",
            check=link_server,
            seeds=_link_stream_seeds,
            documents=_sample_documents,
            from_json=_json_as_stream,
        ),
        Target(name="link_client", check=link_client, seeds=_link_client_seeds),
        Target(name="endpoint_id", check=endpoint_id, seeds=_endpoint_id_seeds),
        Target(name="config", check=config, seeds=_config_seeds),
        Target(name="stamp", check=stamp, seeds=_stamp_seeds),
        Target(name="udp_echo", check=udp_echo, seeds=_udp_echo_seeds, max_len=LONG_INPUT_MAX_LEN),
        Target(
            name="tunnel",
            check=tunnel,
            seeds=_tunnel_seeds,
            documents=_tunnel_documents,
            from_json=_json_as_bytes,
        ),
        Target(
            name="privsep",
            check=privsep,
            seeds=_privsep_seeds,
            max_len=PRIVSEP_MAX_LEN,
            documents=_privsep_documents,
            from_json=_json_as_privsep_frame,
        ),
        Target(name="minisign", check=minisign, seeds=_minisign_seeds),
        Target(
            name="manifest",
            check=manifest,
            seeds=_manifest_seeds,
            max_len=LONG_INPUT_MAX_LEN,
            documents=_manifest_documents,
            from_json=_json_as_bytes,
        ),
        Target(name="health_http", check=health_http, seeds=_health_seeds),
    ]
    return {t.name: t for t in targets}


# Every product target, by name: what `run_atheris.py --all` and the bounded tests run.
TARGETS: Final = _all_targets()
# Targets that test the harness itself; never part of --all.
SELFTEST_TARGETS: Final = {
    "selftest_crash": Target(name="selftest_crash", check=selftest_crash, seeds=lambda: [b"CRASH"])
}
