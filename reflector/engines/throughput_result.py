"""Normalize iperf3's `-J` output into one small, JSON-able throughput result (spec §7.1).

Pure: parsed JSON documents in, frozen dataclasses out; no I/O and no clock.

Who measured what (iperf3 3.12; see the captured runs in tests/unit/data/iperf3/):
- The endpoint runs the iperf3 server, the appliance runs the client. Normally the client sends
  and the server receives: that is the *upload* (appliance -> endpoint). With `-R` the server
  sends: the *download* (endpoint -> appliance).
- The server's JSON knows only its own side: as receiver its `end.sum_received` is real and its
  `end.sum_sent` is all zeros; as sender the other way round. So TCP retransmits are in the
  server's JSON only when the server sent, and UDP jitter/loss only when it received.
- The client's JSON holds both sides (the server hands over its totals at the end), but it is
  the peer's program: the endpoint's own view comes from the server JSON alone, and
  `bytes_transferred` (what quota accounting charges) is the endpoint's own count.
- iperf3's server cannot refuse what the client asks for (streams, `-R`, `-u`, `--bidir`,
  duration): `grant_mismatches` compares what actually ran with what was granted.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Final, Literal

from reflector.errors import ReflectorError

# A result travels back over the control link (64 KiB frames by default). The spec's default
# 60 s test at iperf3's 1 s reporting interval is 60 samples; 120 leaves room for `-O` omitted
# seconds, and at ~150 bytes a sample the list stays well under a frame.
MAX_INTERVALS: Final = 120
# iperf3 itself refuses more than 128 parallel streams; anything longer is not iperf3 output.
MAX_STREAMS: Final = 128
# iperf3's version string is "iperf 3.12"; a longer one is not worth carrying to the audit log.
MAX_VERSION_LEN: Final = 64
# iperf3's error texts are one short sentence plus strerror(); bound what reaches logs/peers.
MAX_ERROR_TEXT_LEN: Final = 200

EngineErrorCode = Literal[
    "iperf3_missing",  # the configured binary is absent or not executable
    "iperf3_failed",  # iperf3 exited (or never listened) without a usable result
    "iperf3_timeout",  # killed at its deadline, or nobody connected in time
    "iperf3_bad_output",  # stdout was not JSON, or too large
    "port_unavailable",  # the data port was already in use
    "iperf3_error",  # iperf3 reported an error, or its JSON was not the expected shape
    "engine_unavailable",  # no engine host to run it (the helper is not running)
]
Protocol = Literal["tcp", "udp"]
Direction = Literal["upload", "download"]
Role = Literal["sender", "receiver"]


class EngineError(ReflectorError):
    """A throughput run failed; `code` is stable and machine-readable, `message` is one line.

    It lives here, below the process runner, so the pure normalizer can raise it too.
    """

    def __init__(self, code: EngineErrorCode, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code: EngineErrorCode = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


@dataclass(frozen=True, kw_only=True)
class RunParameters:
    """What iperf3 actually ran (its `start.test_start`), whatever the grant said."""

    protocol: Protocol
    streams: int
    duration_s: int  # 0 when the client ran by byte or block count instead (-n/-k)
    reverse: bool
    bitrate_limit_bps: int  # per-stream target (-b); 0 means unlimited
    bytes_limit: int  # -n, 0 unless set
    blocks_limit: int  # -k, 0 unless set
    omit_s: int  # -O: leading seconds excluded from the totals
    block_size: int


@dataclass(frozen=True, kw_only=True)
class UdpStats:
    """Loss and jitter, which only the UDP receiver can measure."""

    jitter_ms: float
    lost_packets: int
    lost_percent: float
    packets: int


@dataclass(frozen=True, kw_only=True)
class HostView:
    """One host's own totals of the test's single flow: what it sent, or what it received."""

    role: Role
    bytes: int
    bits_per_second: float
    seconds: float
    retransmits: int | None  # TCP sender only
    udp: UdpStats | None  # UDP receiver only


@dataclass(frozen=True, kw_only=True)
class StreamTotals:
    """One parallel stream as the endpoint saw it.

    For UDP, iperf3 3.12 fills a stream's bytes only on the sending side; a receiving endpoint
    reports 0 bytes per stream (its packets, jitter and loss are real).
    """

    stream_id: int  # iperf3's id for the stream (its socket number)
    bytes: int
    bits_per_second: float
    retransmits: int | None
    udp: UdpStats | None


@dataclass(frozen=True, kw_only=True)
class IntervalSample:
    """One reporting interval, summed over streams, as the endpoint saw it."""

    start_s: float
    end_s: float
    bytes: int
    bits_per_second: float
    retransmits: int | None
    udp: UdpStats | None
    omitted: bool


@dataclass(frozen=True, kw_only=True)
class CpuUtilization:
    """Total CPU use in percent; a saturated host explains a low number (spec §7.5)."""

    endpoint_percent: float
    appliance_percent: float | None  # only from the client's JSON


@dataclass(frozen=True, kw_only=True)
class ThroughputResult:
    """The normalized outcome of one iperf3 run.

    `upload_bps`/`download_bps`: the receiver's rate when known (iperf3's own headline number),
    else the sender's; the direction not tested is None.
    """

    iperf3_version: str
    params: RunParameters
    direction: Direction
    endpoint: HostView
    appliance: HostView | None
    upload_bps: float | None
    download_bps: float | None
    bytes_transferred: int  # the endpoint's own count: what accounting charges
    retransmits: int | None  # TCP, from the sender's view if we have it
    udp: UdpStats | None  # UDP, from the receiver's view if we have it
    streams: tuple[StreamTotals, ...]
    intervals: tuple[IntervalSample, ...]  # the first MAX_INTERVALS
    intervals_total: int
    cpu: CpuUtilization

    def to_dict(self) -> dict[str, Any]:
        plain = _plain(dataclasses.asdict(self))
        assert isinstance(plain, dict)
        return plain


def normalize_iperf3(
    server_json: dict[str, Any], client_json: dict[str, Any] | None = None
) -> ThroughputResult:
    """Build the result from the endpoint's server JSON, plus the appliance's client JSON if any.

    Raises EngineError("iperf3_error") for an iperf3 error document or an unexpected shape.
    """
    _raise_reported_error(server_json, "server")
    if client_json is not None:
        _raise_reported_error(client_json, "client")
    try:
        return _normalize(server_json, client_json)
    except _Malformed as exc:
        raise EngineError("iperf3_error", f"unexpected iperf3 JSON: {exc}") from None


def grant_mismatches(
    params: RunParameters, *, protocol: Protocol, streams: int, reverse: bool, duration_s: int
) -> tuple[str, ...]:
    """What the peer's client ran that its grant did not allow, one reason per item.

    The iperf3 3.12 server takes the test's shape from the client and cannot cap it, so the
    session manager checks afterwards (and the deadline kill bounds the time in any case).
    """
    reasons: list[str] = []
    if params.protocol != protocol:
        reasons.append(f"protocol {params.protocol} was run, {protocol} was granted")
    if params.streams > streams:
        reasons.append(f"{params.streams} streams were run, {streams} were granted")
    if params.reverse != reverse:
        reasons.append(f"reverse={params.reverse} was run, reverse={reverse} was granted")
    if params.duration_s == 0:
        reasons.append("the test ran by byte or block count instead of a duration")
    elif params.duration_s > duration_s:
        reasons.append(f"{params.duration_s} s was run, {duration_s} s was granted")
    return tuple(reasons)


# --- Internals.


class _Malformed(Exception):
    """A field is missing or of the wrong type; becomes EngineError at the public boundary."""


def _raise_reported_error(doc: object, side: str) -> None:
    if not isinstance(doc, dict):
        raise EngineError("iperf3_error", f"iperf3 {side} JSON is not an object")
    error = doc.get("error")
    if error is not None:
        text = _clean_text(error if isinstance(error, str) else repr(error))
        raise EngineError("iperf3_error", f"iperf3 {side} reported: {text}")


def _clean_text(text: str) -> str:
    """Printable, one line, bounded: the text may end up in a log line or a peer's screen."""
    cleaned = "".join(ch if ch.isprintable() else " " for ch in text).strip()
    if len(cleaned) > MAX_ERROR_TEXT_LEN:
        cleaned = cleaned[: MAX_ERROR_TEXT_LEN - 3] + "..."
    return cleaned


def _normalize(server: dict[str, Any], client: dict[str, Any] | None) -> ThroughputResult:
    start = _obj(server, "start", "start")
    params = _params(_obj(start, "test_start", "start.test_start"))
    end = _obj(server, "end", "end")
    if "sum_sent_bidir_reverse" in end:
        raise EngineError("iperf3_error", "a bidirectional test (--bidir) ran; none is granted")
    if client is not None:
        _check_same_test(server, client, params)
    direction: Direction = "download" if params.reverse else "upload"
    endpoint_role: Role = "sender" if params.reverse else "receiver"
    endpoint = _host_view(end, endpoint_role, params.protocol, "end")
    appliance = None
    if client is not None:
        appliance_role: Role = "receiver" if params.reverse else "sender"
        appliance = _host_view(
            _obj(client, "end", "client end"), appliance_role, params.protocol, "client end"
        )
    sender, receiver = (endpoint, appliance) if params.reverse else (appliance, endpoint)
    headline = (receiver or sender or endpoint).bits_per_second
    intervals = _list(server, "intervals", "intervals")
    return ThroughputResult(
        iperf3_version=_version(start),
        params=params,
        direction=direction,
        endpoint=endpoint,
        appliance=appliance,
        upload_bps=headline if direction == "upload" else None,
        download_bps=headline if direction == "download" else None,
        bytes_transferred=endpoint.bytes,
        retransmits=sender.retransmits if sender is not None else None,
        udp=receiver.udp if receiver is not None else None,
        streams=_streams(end, endpoint_role, params.protocol),
        intervals=tuple(
            _interval(item, f"intervals[{i}]") for i, item in enumerate(intervals[:MAX_INTERVALS])
        ),
        intervals_total=len(intervals),
        cpu=CpuUtilization(
            endpoint_percent=_cpu(end, "end"),
            appliance_percent=None if client is None else _cpu(client["end"], "client end"),
        ),
    )


def _params(ts: dict[str, Any]) -> RunParameters:
    where = "start.test_start"
    protocol = ts.get("protocol")
    if protocol not in ("TCP", "UDP"):
        got = _clean_text(repr(protocol))
        raise _Malformed(f"{where}.protocol: expected TCP or UDP, got {got}")
    streams = _int(ts, "num_streams", where)
    if not 1 <= streams <= MAX_STREAMS:
        raise _Malformed(f"{where}.num_streams: {streams} is not between 1 and {MAX_STREAMS}")
    return RunParameters(
        protocol="tcp" if protocol == "TCP" else "udp",
        streams=streams,
        duration_s=_int(ts, "duration", where),
        reverse=bool(_int(ts, "reverse", where)),
        bitrate_limit_bps=_int(ts, "target_bitrate", where),
        bytes_limit=_int(ts, "bytes", where),
        blocks_limit=_int(ts, "blocks", where),
        omit_s=_int(ts, "omit", where),
        block_size=_int(ts, "blksize", where),
    )


def _check_same_test(server: dict[str, Any], client: dict[str, Any], params: RunParameters) -> None:
    """Refuse to mix the endpoint's run with a client JSON from another run."""
    client_start = _obj(client, "start", "client start")
    if client_start.get("cookie") != server["start"].get("cookie"):
        raise EngineError("iperf3_error", "client and server JSON are from different tests")
    client_params = _params(_obj(client_start, "test_start", "client start.test_start"))
    if client_params != params:
        raise EngineError("iperf3_error", "client and server JSON disagree on the test parameters")


def _host_view(end: dict[str, Any], role: Role, protocol: Protocol, where: str) -> HostView:
    key = "sum_sent" if role == "sender" else "sum_received"
    summary = _obj(end, key, f"{where}.{key}")
    path = f"{where}.{key}"
    return HostView(
        role=role,
        bytes=_int(summary, "bytes", path),
        bits_per_second=_float(summary, "bits_per_second", path),
        seconds=_float(summary, "seconds", path),
        retransmits=_retransmits(summary, role, protocol, path),
        udp=_udp(summary, path) if protocol == "udp" and role == "receiver" else None,
    )


def _streams(end: dict[str, Any], role: Role, protocol: Protocol) -> tuple[StreamTotals, ...]:
    items = _list(end, "streams", "end")
    if len(items) > MAX_STREAMS:
        raise _Malformed(f"end.streams: {len(items)} entries, at most {MAX_STREAMS} expected")
    out = []
    for index, item in enumerate(items):
        where = f"end.streams[{index}]"
        if not isinstance(item, dict):
            raise _Malformed(f"{where}: expected an object")
        key = "udp" if protocol == "udp" else role
        own = _obj(item, key, where)
        path = f"{where}.{key}"
        out.append(
            StreamTotals(
                stream_id=_int(own, "socket", path),
                bytes=_int(own, "bytes", path),
                bits_per_second=_float(own, "bits_per_second", path),
                retransmits=_retransmits(own, role, protocol, path),
                udp=_udp(own, path) if protocol == "udp" and role == "receiver" else None,
            )
        )
    return tuple(out)


def _interval(item: object, where: str) -> IntervalSample:
    if not isinstance(item, dict):
        raise _Malformed(f"{where}: expected an object")
    summary = _obj(item, "sum", where)
    path = f"{where}.sum"
    omitted = summary.get("omitted", False)
    return IntervalSample(
        start_s=_float(summary, "start", path),
        end_s=_float(summary, "end", path),
        bytes=_int(summary, "bytes", path),
        bits_per_second=_float(summary, "bits_per_second", path),
        # Present exactly when this host sent TCP, so the key itself tells us.
        retransmits=_int(summary, "retransmits", path) if "retransmits" in summary else None,
        udp=_udp(summary, path) if "jitter_ms" in summary else None,
        omitted=omitted is True,
    )


def _retransmits(summary: dict[str, Any], role: Role, protocol: Protocol, where: str) -> int | None:
    if protocol != "tcp" or role != "sender":
        return None
    return _int(summary, "retransmits", where)


def _udp(summary: dict[str, Any], where: str) -> UdpStats:
    return UdpStats(
        jitter_ms=_float(summary, "jitter_ms", where),
        lost_packets=_int(summary, "lost_packets", where),
        lost_percent=_float(summary, "lost_percent", where),
        packets=_int(summary, "packets", where),
    )


def _cpu(end: object, where: str) -> float:
    if not isinstance(end, dict):
        raise _Malformed(f"{where}: expected an object")
    return _float(
        _obj(end, "cpu_utilization_percent", where),
        "host_total",
        f"{where}.cpu_utilization_percent",
    )


def _version(start: dict[str, Any]) -> str:
    version = start.get("version")
    if not isinstance(version, str):
        raise _Malformed("start.version: expected a string")
    return _clean_text(version)[:MAX_VERSION_LEN]


def _obj(doc: dict[str, Any], key: str, where: str) -> dict[str, Any]:
    value = doc.get(key)
    if not isinstance(value, dict):
        raise _Malformed(f"{where}: expected an object")
    return value


def _list(doc: dict[str, Any], key: str, where: str) -> list[Any]:
    value = doc.get(key)
    if not isinstance(value, list):
        raise _Malformed(f"{where}.{key}: expected a list")
    return value


def _float(doc: dict[str, Any], key: str, where: str) -> float:
    value = doc.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise _Malformed(f"{where}.{key}: expected a number")
    if not math.isfinite(value) or value < 0:
        raise _Malformed(f"{where}.{key}: expected a finite number >= 0")
    return float(value)


def _int(doc: dict[str, Any], key: str, where: str) -> int:
    raw = doc.get(key)
    if isinstance(raw, int) and not isinstance(raw, bool) and raw >= 0:
        return raw  # exact: byte counts can exceed a float's 53-bit mantissa
    value = _float(doc, key, where)
    if not value.is_integer():
        raise _Malformed(f"{where}.{key}: expected a whole number")
    return int(value)


def _plain(value: object) -> object:
    """Tuples to lists, recursively, so `to_dict()` round-trips through JSON unchanged."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value
