"""The privileged helper's interface: framing, typed messages and the permission table (pure).

The network-facing parent holds the identity key and terminates mTLS as an unprivileged user
with no capabilities; the few things that need privilege (starting an engine in a transient
systemd scope under another uid, changing Reflector's nftables table) cross this interface to a
small root helper, as OpenSSH's monitor does it:

- The whole interface is one table, `REQUESTS` below: six request types, nothing else.
  Unknown types, missing or extra fields are refused before any handler runs.
- Every field is checked for format here (`decode_request`) and for *meaning* against the
  helper's own reading of the config (`HelperPolicy.check`): ports inside the configured range,
  durations and resource limits at or below the configured caps, at most as many engines as
  tests may run concurrently. The parent cannot widen any of it: the helper loads the config
  file itself.
- A frame is a 4-byte big-endian length and a JSON object whose "type" names the message; the
  maximum length is checked when sending and when receiving. File descriptors (an engine's
  stdout and stderr) travel beside a response frame with SCM_RIGHTS, never inside it.

No sockets, no clock, no processes in this module: it can be tested exhaustively.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import re
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal

from reflector.config import Config, parse_address
from reflector.errors import ReflectorError

__all__ = [
    "ENGINE_KINDS",
    "HEADER",
    "MAX_FDS",
    "MAX_FRAME_BYTES",
    "REFUSAL_CODES",
    "REQUESTS",
    "RESPONSES",
    "CloseHole",
    "EngineExit",
    "EngineHandle",
    "EngineLimits",
    "EngineStarted",
    "EngineStopped",
    "FirewallReady",
    "FirewallUnavailable",
    "FrameReader",
    "HelperPolicy",
    "HoleClosed",
    "HoleCounted",
    "HoleOpened",
    "HoleTotals",
    "OpenHole",
    "PrepareFirewall",
    "PrivsepError",
    "ProtocolError",
    "ReadHole",
    "Refused",
    "Request",
    "Response",
    "StartEngine",
    "StopEngine",
    "decode_request",
    "decode_response",
    "encode_frame",
    "parse_cpu_percent",
    "parse_size",
]

# The largest message is a Refused with its message or an EngineStarted with its protections
# list, well under 1 KiB; 16 KiB leaves room and bounds what any caller can make root buffer.
MAX_FRAME_BYTES: Final = 16 * 1024
HEADER: Final = struct.Struct(">I")
# An engine's stdout and stderr: the only descriptors that ever cross the boundary.
MAX_FDS: Final = 2
# Session IDs are `secrets.token_urlsafe(12)` (16 characters); the link protocol accepts up to
# 64 of the same alphabet. The ID becomes part of a unit name, so nothing else may appear.
MAX_TEST_ID_LEN: Final = 64
_TEST_ID_RE: Final = re.compile(r"[A-Za-z0-9_-]{1,64}")
# The STAMP echo's HMAC key (reflector.engines.stamp.KEY_LEN), hex on the wire and on stdin.
ECHO_KEY_BYTES: Final = 32
# A refusal's message is one line for a log; longer text is cut.
MAX_MESSAGE_LEN: Final = 300
# The helper reports at most this many protections, each a short name.
MAX_PROTECTIONS: Final = 16
_PROTECTION_RE: Final = re.compile(r"[a-z0-9_:.=-]{1,64}")
# systemd unit names are at most 255 bytes; ours are "reflector-test-" + ID + ".scope".
MAX_UNIT_LEN: Final = 255
_UNIT_RE: Final = re.compile(r"(reflector-test-[A-Za-z0-9_-]{1,64}\.scope)?")  # empty: no systemd
# Upper bounds that hold whatever the config says (the config's own bounds, see config.py).
_MAX_PORT: Final = 65535
_MAX_DURATION_S: Final = 3600 + 300 + 600
_MAX_MEMORY_BYTES: Final = 1 << 60
_MAX_CPU_PERCENT: Final = 9999
_MAX_TASKS: Final = 4096
_MAX_PID: Final = 1 << 22  # PID_MAX_LIMIT on 64-bit Linux
_MAX_BYTES: Final = 1 << 62
_MAX_RUNTIME_MS: Final = 10**9

EngineKind = Literal["iperf3", "udp_echo"]
ENGINE_KINDS: Final[tuple[EngineKind, ...]] = ("iperf3", "udp_echo")
HoleProto = Literal["tcp", "udp"]
StoppedBy = Literal["exit", "stop", "runtime_limit"]

# Why a request was refused; the parent maps these to a session denial.
REFUSAL_CODES: Final = (
    "bad_request",  # malformed frame, unknown type, missing/extra/ill-typed field
    "not_permitted",  # the caller's uid, or a kind the config disables
    "out_of_range",  # port, bind address, duration or ttl outside what the config allows
    "over_limit",  # resource limits above the config's [limits]
    "busy",  # as many engines of this kind as tests may run at once
    "exists",  # this test already has an engine or a hole
    "unknown_test",  # stop/close for a test the helper does not know
    "engine_failed",  # systemd-run or the engine failed to start
    "firewall_unavailable",  # nftables missing or a change failed: nothing was opened
    "internal",  # a bug in the helper; the parent treats it as a refusal
)
RefusalCode = Literal[
    "bad_request",
    "not_permitted",
    "out_of_range",
    "over_limit",
    "busy",
    "exists",
    "unknown_test",
    "engine_failed",
    "firewall_unavailable",
    "internal",
]


class PrivsepError(ReflectorError):
    """The helper refused a request or could not be reached (one line for the operator)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ProtocolError(PrivsepError):
    """The other side broke the framing or sent a message that does not decode."""

    def __init__(self, message: str) -> None:
        super().__init__("bad_request", message)


class FirewallUnavailable(PrivsepError):
    """No firewall to open holes with (no nftables, not root, or no reflector.firewall)."""

    def __init__(self, message: str) -> None:
        super().__init__("firewall_unavailable", message)


# --------------------------------------------------------------------------------------------
# Messages
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EngineLimits:
    """The caps on one engine's scope; each must be at or below the config's [limits]."""

    memory_max_bytes: int
    cpu_quota_percent: int
    tasks_max: int

    @classmethod
    def from_config(cls, config: Config) -> EngineLimits:
        """The config's own caps: what the parent normally asks for."""
        return cls(
            memory_max_bytes=parse_size(config.limits.memory_max),
            cpu_quota_percent=parse_cpu_percent(config.limits.cpu_quota),
            tasks_max=config.limits.tasks_max,
        )


@dataclass(frozen=True, kw_only=True)
class StartEngine:
    """Start one engine for one granted test.

    `bind` is the local address to listen on, `peer` the granted appliance's address (the
    echo's --peer and the scope's IPAddressAllow=). `echo_key` is the udp_echo session key; it
    reaches the engine on stdin, never on a command line.
    """

    TYPE: ClassVar[str] = "start_engine"
    test_id: str
    kind: EngineKind
    port: int
    duration_s: int
    bind: str
    peer: str
    limits: EngineLimits
    echo_key: bytes | None = field(default=None, repr=False)


@dataclass(frozen=True, kw_only=True)
class StopEngine:
    """Stop a test's engine (if still running) and collect its exit status and byte counts."""

    TYPE: ClassVar[str] = "stop_engine"
    test_id: str


@dataclass(frozen=True, kw_only=True)
class OpenHole:
    """Admit `peer_addr` to `proto`/`port` in Reflector's own nftables table for `ttl_s`."""

    TYPE: ClassVar[str] = "open_hole"
    test_id: str
    peer_addr: str
    proto: HoleProto
    port: int
    ttl_s: int


@dataclass(frozen=True, kw_only=True)
class CloseHole:
    """Remove a test's hole now (the kernel removes it at its timeout anyway)."""

    TYPE: ClassVar[str] = "close_hole"
    test_id: str


@dataclass(frozen=True, kw_only=True)
class ReadHole:
    """What a test's holes have carried so far (their nftables counters); they stay open.

    The parent asks while a direct-mode test runs and charges the bytes to the peer's quota, so
    a crash of the parent loses only the bytes since its last reading (the hole's counter dies
    with the hole at its kernel timeout).
    """

    TYPE: ClassVar[str] = "read_hole"
    test_id: str


@dataclass(frozen=True, kw_only=True)
class PrepareFirewall:
    """Direct mode: make sure Reflector's own table is in place (idempotent, no arguments).

    The parent asks once at start-up and tells systemd it is ready only after `firewall_ready`,
    so a direct-mode endpoint never runs without the drop rule over its data ports.
    """

    TYPE: ClassVar[str] = "prepare_firewall"


Request = StartEngine | StopEngine | OpenHole | CloseHole | ReadHole | PrepareFirewall


@dataclass(frozen=True, kw_only=True)
class EngineStarted:
    """The engine runs; its stdout and stderr come beside this frame (SCM_RIGHTS).

    `ready` is True once the engine has bound its port. False: it exited or never bound; its
    stdout/stderr explain why, and stop_engine still collects the exit status.
    `protections` names what the unit enforces, e.g. "MemoryMax", "IPAddressAllow".
    """

    TYPE: ClassVar[str] = "engine_started"
    test_id: str
    pid: int
    unit: str
    ready: bool
    protections: tuple[str, ...]

    def handle(self, *, stdout_fd: int, stderr_fd: int) -> EngineHandle:
        return EngineHandle(
            test_id=self.test_id,
            pid=self.pid,
            unit=self.unit,
            ready=self.ready,
            stdout_fd=stdout_fd,
            stderr_fd=stderr_fd,
            protections=self.protections,
        )


@dataclass(frozen=True, kw_only=True)
class EngineStopped:
    """How a test's engine ended, for the audit trail (spec §8.3).

    `exit_code` is the process's status (negative: killed by that signal). The byte counts are
    the kernel's (IPAccounting=), None where the host cannot count them.
    """

    TYPE: ClassVar[str] = "engine_stopped"
    test_id: str
    exit_code: int
    runtime_ms: int
    stopped_by: StoppedBy
    ip_ingress_bytes: int | None
    ip_egress_bytes: int | None

    def exit(self) -> EngineExit:
        return EngineExit(
            exit_code=self.exit_code,
            runtime_ms=self.runtime_ms,
            stopped_by=self.stopped_by,
            ip_ingress_bytes=self.ip_ingress_bytes,
            ip_egress_bytes=self.ip_egress_bytes,
        )


@dataclass(frozen=True, kw_only=True)
class HoleOpened:
    TYPE: ClassVar[str] = "hole_opened"
    test_id: str


@dataclass(frozen=True, kw_only=True)
class _HoleCount:
    """What a test's holes carried (nftables counters), None if unknown.

    `expired` holes had already timed out in the kernel, so their bytes are missing.
    """

    test_id: str
    packets: int | None
    bytes: int | None
    expired: int | None

    def totals(self) -> HoleTotals | None:
        if self.packets is None or self.bytes is None:
            return None
        return HoleTotals(packets=self.packets, bytes=self.bytes, expired=self.expired or 0)


@dataclass(frozen=True, kw_only=True)
class HoleClosed(_HoleCount):
    """The test's holes are gone; what they carried."""

    TYPE: ClassVar[str] = "hole_closed"


@dataclass(frozen=True, kw_only=True)
class HoleCounted(_HoleCount):
    """What the test's holes have carried so far; they are still open."""

    TYPE: ClassVar[str] = "hole_counted"


@dataclass(frozen=True, kw_only=True)
class Refused:
    """The helper said no; `code` is one of REFUSAL_CODES."""

    TYPE: ClassVar[str] = "refused"
    code: RefusalCode
    message: str

    def error(self) -> PrivsepError:
        """The exception the parent raises for this refusal."""
        if self.code == "firewall_unavailable":
            return FirewallUnavailable(self.message)
        return PrivsepError(self.code, self.message)


@dataclass(frozen=True, kw_only=True)
class FirewallReady:
    """Reflector's table is in place (its data ports closed but for holes)."""

    TYPE: ClassVar[str] = "firewall_ready"


Response = (
    EngineStarted | EngineStopped | HoleOpened | HoleClosed | HoleCounted | FirewallReady | Refused
)


# What the parent works with (the same shape whether the helper or the local fallback runs it).


@dataclass(frozen=True, kw_only=True)
class EngineHandle:
    """A started engine: its pid, unit and the read ends of its stdout and stderr.

    The fds belong to the caller, who must close them (or hand them to `loop.connect_read_pipe`).
    EOF on both means the engine exited; `stop_engine` then returns its status.
    """

    test_id: str
    pid: int
    unit: str
    ready: bool
    stdout_fd: int
    stderr_fd: int
    protections: tuple[str, ...]


@dataclass(frozen=True, kw_only=True)
class HoleTotals:
    """What a test's holes carried, both directions (a lower bound if `expired` > 0)."""

    packets: int
    bytes: int
    expired: int


@dataclass(frozen=True, kw_only=True)
class EngineExit:
    """An engine's end, for the audit trail."""

    exit_code: int
    runtime_ms: int
    stopped_by: StoppedBy
    ip_ingress_bytes: int | None
    ip_egress_bytes: int | None


# --------------------------------------------------------------------------------------------
# The permission table: the whole interface.
# --------------------------------------------------------------------------------------------

_Check = Callable[[Any, str], Any]


def _int(lo: int, hi: int) -> _Check:
    def check(value: Any, name: str) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi:
            return value
        raise ProtocolError(f"{name} must be an integer between {lo} and {hi}")

    return check


def _opt_int(lo: int, hi: int) -> _Check:
    inner = _int(lo, hi)

    def check(value: Any, name: str) -> int | None:
        return None if value is None else inner(value, name)

    return check


def _match(pattern: re.Pattern[str], max_len: int, what: str) -> _Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or len(value) > max_len or not pattern.fullmatch(value):
            raise ProtocolError(f"{name} must be {what}")
        return value

    return check


def _choice(*choices: str) -> _Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ProtocolError(f"{name} must be one of {', '.join(choices)}")
        return value

    return check


def _bool(value: Any, name: str) -> bool:
    if not isinstance(value, bool):
        raise ProtocolError(f"{name} must be true or false")
    return value


def _ip(value: Any, name: str) -> str:
    """An IP literal, returned in canonical form (so no other text can ride along)."""
    if not isinstance(value, str) or len(value) > 64:
        raise ProtocolError(f"{name} must be an IP address")
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ProtocolError(f"{name} must be an IP address") from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


def _echo_key(value: Any, name: str) -> bytes | None:
    if value is None:
        return None
    if (
        not isinstance(value, str)
        or len(value) != 2 * ECHO_KEY_BYTES
        or not re.fullmatch(r"[0-9a-f]+", value)
    ):
        raise ProtocolError(f"{name} must be {ECHO_KEY_BYTES} bytes as lowercase hex, or null")
    return bytes.fromhex(value)


def _limits(value: Any, name: str) -> EngineLimits:
    fields = _decode_fields(value, _LIMIT_FIELDS, name)
    return EngineLimits(**fields)


def _text(max_len: int) -> _Check:
    def check(value: Any, name: str) -> str:
        if not isinstance(value, str):
            raise ProtocolError(f"{name} must be a string")
        return value[:max_len]

    return check


def _protections(value: Any, name: str) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > MAX_PROTECTIONS:
        raise ProtocolError(f"{name} must be a list of at most {MAX_PROTECTIONS} names")
    check = _match(_PROTECTION_RE, 64, "a protection name")
    return tuple(check(item, name) for item in value)


_TEST_ID: Final = _match(_TEST_ID_RE, MAX_TEST_ID_LEN, "1-64 letters, digits, _ or -")
_PORT: Final = _int(1, _MAX_PORT)
_LIMIT_FIELDS: Final[Mapping[str, _Check]] = {
    "memory_max_bytes": _int(1, _MAX_MEMORY_BYTES),
    "cpu_quota_percent": _int(1, _MAX_CPU_PERCENT),
    "tasks_max": _int(1, _MAX_TASKS),
}

_HOLE_COUNT_FIELDS: Final[Mapping[str, _Check]] = {
    "test_id": _TEST_ID,
    "packets": _opt_int(0, _MAX_BYTES),
    "bytes": _opt_int(0, _MAX_BYTES),
    "expired": _opt_int(0, 64),
}

# The ONLY requests the helper knows: type -> (message class, field checks). Anything not in
# this table is refused before a handler runs (OpenSSH monitor.c's mon_dispatch table).
REQUESTS: Final[Mapping[str, tuple[type[Any], Mapping[str, _Check]]]] = {
    "start_engine": (
        StartEngine,
        {
            "test_id": _TEST_ID,
            "kind": _choice(*ENGINE_KINDS),
            "port": _PORT,
            "duration_s": _int(1, _MAX_DURATION_S),
            "bind": _ip,
            "peer": _ip,
            "limits": _limits,
            "echo_key": _echo_key,
        },
    ),
    "stop_engine": (StopEngine, {"test_id": _TEST_ID}),
    "open_hole": (
        OpenHole,
        {
            "test_id": _TEST_ID,
            "peer_addr": _ip,
            "proto": _choice("tcp", "udp"),
            "port": _PORT,
            "ttl_s": _int(1, _MAX_DURATION_S),
        },
    ),
    "close_hole": (CloseHole, {"test_id": _TEST_ID}),
    "read_hole": (ReadHole, {"test_id": _TEST_ID}),
    "prepare_firewall": (PrepareFirewall, {}),
}

RESPONSES: Final[Mapping[str, tuple[type[Any], Mapping[str, _Check]]]] = {
    "engine_started": (
        EngineStarted,
        {
            "test_id": _TEST_ID,
            "pid": _int(1, _MAX_PID),
            "unit": _match(_UNIT_RE, MAX_UNIT_LEN, "a reflector-test-*.scope unit name"),
            "ready": _bool,
            "protections": _protections,
        },
    ),
    "engine_stopped": (
        EngineStopped,
        {
            "test_id": _TEST_ID,
            "exit_code": _int(-64, 255),
            "runtime_ms": _int(0, _MAX_RUNTIME_MS),
            "stopped_by": _choice("exit", "stop", "runtime_limit"),
            "ip_ingress_bytes": _opt_int(0, _MAX_BYTES),
            "ip_egress_bytes": _opt_int(0, _MAX_BYTES),
        },
    ),
    "hole_opened": (HoleOpened, {"test_id": _TEST_ID}),
    "hole_closed": (HoleClosed, _HOLE_COUNT_FIELDS),
    "hole_counted": (HoleCounted, _HOLE_COUNT_FIELDS),
    "firewall_ready": (FirewallReady, {}),
    "refused": (Refused, {"code": _choice(*REFUSAL_CODES), "message": _text(MAX_MESSAGE_LEN)}),
}


def _decode_fields(doc: Any, checks: Mapping[str, _Check], where: str) -> dict[str, Any]:
    if not isinstance(doc, dict):
        raise ProtocolError(f"{where} must be a JSON object")
    missing = [name for name in checks if name not in doc]
    extra = [name for name in doc if name not in checks]
    if missing:
        raise ProtocolError(f"{where}: missing field {missing[0]}")
    if extra:
        raise ProtocolError(f"{where}: unknown field {str(extra[0])[:40]!r}")
    return {name: check(doc[name], f"{where}.{name}") for name, check in checks.items()}


def _decode(doc: Any, table: Mapping[str, tuple[type[Any], Mapping[str, _Check]]]) -> Any:
    if not isinstance(doc, dict):
        raise ProtocolError("a message must be a JSON object")
    kind = doc.get("type")
    if not isinstance(kind, str) or kind not in table:
        raise ProtocolError(f"unknown message type {str(kind)[:40]!r}")
    cls, checks = table[kind]
    body = {k: v for k, v in doc.items() if k != "type"}
    return cls(**_decode_fields(body, checks, kind))


def decode_request(doc: Any) -> Request:
    """A request from its JSON object; raise ProtocolError on anything not in the table."""
    request: Request = _decode(doc, REQUESTS)
    return request


def decode_response(doc: Any) -> Response:
    """A response from its JSON object; raise ProtocolError on anything else."""
    response: Response = _decode(doc, RESPONSES)
    return response


def to_wire(message: Request | Response) -> dict[str, Any]:
    """The JSON object for a message (bytes as lowercase hex, tuples as lists)."""
    doc: dict[str, Any] = {"type": message.TYPE}
    for fld in dataclasses.fields(message):
        name, value = fld.name, getattr(message, fld.name)
        if isinstance(value, EngineLimits):
            value = {
                "memory_max_bytes": value.memory_max_bytes,
                "cpu_quota_percent": value.cpu_quota_percent,
                "tasks_max": value.tasks_max,
            }
        elif isinstance(value, bytes):
            value = value.hex()
        elif isinstance(value, tuple):
            value = list(value)
        doc[name] = value
    return doc


# --------------------------------------------------------------------------------------------
# Framing: length-prefixed JSON, bounded on both sides.
# --------------------------------------------------------------------------------------------


def encode_frame(message: Request | Response) -> bytes:
    """Length + JSON; raise ProtocolError rather than send a frame the peer must refuse."""
    body = json.dumps(to_wire(message), separators=(",", ":"), sort_keys=True).encode()
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"frame of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    return HEADER.pack(len(body)) + body


class FrameReader:
    """Sans-IO frame decoder: `feed(bytes)`, then `next_frame()` gives a JSON object or None.

    The length is checked as soon as the header arrives, so an oversized frame is refused
    before its body is buffered.
    """

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data
        if len(self._buffer) >= HEADER.size:
            self._check_length(HEADER.unpack_from(self._buffer)[0])

    def next_frame(self) -> Any | None:
        if len(self._buffer) < HEADER.size:
            return None
        (length,) = HEADER.unpack_from(self._buffer)
        self._check_length(length)
        end = HEADER.size + length
        if len(self._buffer) < end:
            return None
        body = bytes(self._buffer[HEADER.size : end])
        del self._buffer[:end]
        try:
            return json.loads(body.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ProtocolError("frame is not UTF-8 JSON") from None
        except (RecursionError, ValueError):  # absurd nesting, over-long integer literals
            raise ProtocolError("frame is JSON beyond this protocol's limits") from None

    @property
    def pending(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buffer)

    @staticmethod
    def _check_length(length: int) -> None:
        if length > MAX_FRAME_BYTES:
            raise ProtocolError(f"frame of {length} bytes exceeds {MAX_FRAME_BYTES}")
        if length == 0:
            raise ProtocolError("empty frame")


# --------------------------------------------------------------------------------------------
# Meaning: what the config allows (the helper's own reading of the config file).
# --------------------------------------------------------------------------------------------

_SIZE_UNITS: Final = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}


def parse_size(text: str) -> int:
    """Bytes of a size like "256M", in systemd's binary units (K = 1024)."""
    unit = text[-1] if text[-1:] in ("K", "M", "G") else ""
    number = text[: len(text) - len(unit)]
    if not number.isdigit():
        raise ValueError(f"not a size: {text!r}")
    return int(number) * _SIZE_UNITS[unit]


def parse_cpu_percent(text: str) -> int:
    """The number in a percentage like "100%"."""
    if not text.endswith("%") or not text[:-1].isdigit():
        raise ValueError(f"not a percentage: {text!r}")
    return int(text[:-1])


@dataclass(frozen=True, kw_only=True)
class HelperPolicy:
    """What the config permits, read by the helper itself from the config file."""

    mode: Literal["tunneled", "direct_ephemeral"]
    data_ports: range
    control_ports: frozenset[int]
    max_duration_s: int
    runtime_grace_s: int
    caps: EngineLimits
    max_engines_per_kind: int
    allowed_kinds: frozenset[str]

    @classmethod
    def from_config(cls, config: Config) -> HelperPolicy:
        net, quotas = config.network, config.quotas
        allowed = set()
        if quotas.allow_throughput:
            allowed.add("iperf3")
        # A throughput test answers STAMP latency probes too, so the echo engine is needed
        # whenever either test type is enabled.
        if quotas.allow_udp_echo or quotas.allow_throughput:
            allowed.add("udp_echo")
        return cls(
            mode=net.mode,
            data_ports=range(net.data_port_range_start, net.data_port_range_end + 1),
            control_ports=frozenset(parse_address(a)[1] for a in net.listen_address),
            # A session may run its full duration plus the session grace.
            max_duration_s=quotas.max_test_duration_sec + quotas.session_grace_sec,
            runtime_grace_s=config.limits.runtime_grace_sec,
            caps=EngineLimits.from_config(config),
            # Each test has at most one engine of each kind (a throughput test: iperf3 plus
            # its latency-under-load echo; a latency test: one echo).
            max_engines_per_kind=quotas.max_concurrent_tests,
            allowed_kinds=frozenset(allowed),
        )

    def check(self, request: Request, *, running: Mapping[str, int]) -> Refused | None:
        """None if `request` is permitted; `running` counts live engines by kind."""
        if isinstance(request, StartEngine):
            return self._check_start(request, running)
        if isinstance(request, OpenHole):
            return self._check_hole(request)
        if isinstance(request, PrepareFirewall) and self.mode != "direct_ephemeral":
            return Refused(code="not_permitted", message="the table exists only in direct mode")
        return None  # stop/close/read only name a test; the helper looks it up

    def _check_start(self, req: StartEngine, running: Mapping[str, int]) -> Refused | None:
        if req.kind not in self.allowed_kinds:
            return Refused(code="not_permitted", message=f"{req.kind} tests are disabled")
        if (refusal := self._check_port(req)) is not None:
            return refusal
        if req.kind == "iperf3" and self.mode == "tunneled" and not _is_loopback(req.bind):
            return Refused(
                code="out_of_range", message="in tunneled mode iperf3 binds only loopback"
            )
        if req.duration_s > self.max_duration_s:
            return Refused(
                code="out_of_range",
                message=f"duration {req.duration_s} s exceeds {self.max_duration_s} s",
            )
        if (refusal := self._check_limits(req.limits)) is not None:
            return refusal
        if (req.echo_key is None) != (req.kind == "iperf3"):
            need = "needs" if req.kind == "udp_echo" else "must not carry"
            return Refused(code="bad_request", message=f"{req.kind} {need} an echo_key")
        if running.get(req.kind, 0) >= self.max_engines_per_kind:
            return Refused(
                code="busy",
                message=f"{self.max_engines_per_kind} {req.kind} engine(s) already running",
            )
        return None

    def _check_port(self, req: StartEngine) -> Refused | None:
        if req.port in self.data_ports:
            return None
        # The echo shares the control port's number over UDP (tunneled mode, and the
        # latency-under-load probes of a throughput test).
        if req.kind == "udp_echo" and req.port in self.control_ports:
            return None
        where = f"{self.data_ports.start}-{self.data_ports.stop - 1}"
        return Refused(code="out_of_range", message=f"port {req.port} is outside {where}")

    def _check_limits(self, limits: EngineLimits) -> Refused | None:
        caps = self.caps
        for name, asked, cap in (
            ("memory_max_bytes", limits.memory_max_bytes, caps.memory_max_bytes),
            ("cpu_quota_percent", limits.cpu_quota_percent, caps.cpu_quota_percent),
            ("tasks_max", limits.tasks_max, caps.tasks_max),
        ):
            if asked > cap:
                return Refused(code="over_limit", message=f"{name} {asked} exceeds {cap}")
        return None

    def _check_hole(self, req: OpenHole) -> Refused | None:
        if self.mode != "direct_ephemeral":
            return Refused(code="not_permitted", message="holes exist only in direct mode")
        if req.port not in self.data_ports:
            where = f"{self.data_ports.start}-{self.data_ports.stop - 1}"
            return Refused(code="out_of_range", message=f"port {req.port} is outside {where}")
        limit = self.max_duration_s + self.runtime_grace_s
        if req.ttl_s > limit:
            return Refused(code="out_of_range", message=f"ttl {req.ttl_s} s exceeds {limit} s")
        return None


def _is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback
