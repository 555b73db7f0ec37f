"""Whether a test may start: one pure function, `decide`, over config, usage and active tests.

The checks run in this order; the first that fails refuses the request with its own reason
code, so a peer learns the most fundamental problem first (a request that can never succeed is
refused for that, not with a `retry_after` that would only lead to a second refusal):

  1. test_type_disabled  the operator switched this test type off (allow_udp_echo/throughput)
  2. duration_exceeded   duration_sec > quotas.max_test_duration_sec
  3. streams_exceeded    throughput streams > iperf3.max_streams
  4. bitrate_exceeded    requested bitrate > iperf3.max_bitrate_bps (when that is non-zero)
  5. outside_window      throughput outside the heavy-tests window (the peer's own window if
                         set, else the global one), read in quotas.timezone
  6. busy                quotas.max_concurrent_tests sessions are already active
  7. heavy_test_running  a throughput test is already running (one heavy test at a time)
  8. hourly_quota        the peer started its hourly allowance of tests in the last hour
  9. daily_bytes_quota   the peer moved its byte allowance in the last 24 h (0 = unlimited)
 10. cooldown            less than quotas.cooldown_sec since the peer's last test ended

Checks 1-4 can only be fixed by asking differently, so they carry no `retry_after`; 5-10 carry
the whole seconds after which the same request could pass that check. The allowlist is checked
by the listener before any of this, and `no_port_available` is the manager's (it owns ports).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final
from zoneinfo import ZoneInfo

from reflector.config import Iperf3Config, QuotaConfig
from reflector.sessions.accounting import DAY_SEC, HOUR_SEC, PeerUsage
from reflector.sessions.clock import Instant
from reflector.sessions.windows import Window, in_window, parse_window, seconds_until_open

__all__ = [
    "MAX_RETRY_AFTER_SEC",
    "ActiveTest",
    "Deny",
    "DenyReason",
    "Grant",
    "Limits",
    "TestRequest",
    "TestType",
    "decide",
    "effective_limits",
    "policy_summary",
    "quota_status",
    "retry_after_seconds",
]

# The wire protocol bounds retry_after to a day (link.messages.MAX_RETRY_AFTER_SEC); no quota
# here looks back further than a day, so a longer wait is never needed.
MAX_RETRY_AFTER_SEC: Final = DAY_SEC


class TestType(StrEnum):
    """The tests a session can be granted for; the value is the wire `test_type`."""

    __test__ = False  # not a pytest test class, despite the name

    UDP_ECHO = "udp_echo"
    THROUGHPUT = "throughput"


class DenyReason(StrEnum):
    """Why a session request was refused; the value is the wire error `code`."""

    TEST_TYPE_DISABLED = "test_type_disabled"
    DURATION_EXCEEDED = "duration_exceeded"
    STREAMS_EXCEEDED = "streams_exceeded"
    BITRATE_EXCEEDED = "bitrate_exceeded"
    OUTSIDE_WINDOW = "outside_window"
    BUSY = "busy"
    HEAVY_TEST_RUNNING = "heavy_test_running"
    HOURLY_QUOTA = "hourly_quota"
    DAILY_BYTES_QUOTA = "daily_bytes_quota"
    COOLDOWN = "cooldown"
    NO_PORT_AVAILABLE = "no_port_available"
    # Not a policy decision: the usage ledger cannot be written (e.g. disk full), so nothing
    # can be accounted and nothing is granted (fail closed).
    STATE_UNAVAILABLE = "state_unavailable"


@dataclass(frozen=True, kw_only=True)
class TestRequest:
    """The policy-relevant part of a session request; None means "not asked for"."""

    __test__ = False  # not a pytest test class, despite the name

    test_type: TestType
    duration_sec: int
    streams: int | None = None
    bitrate_bps: int | None = None


@dataclass(frozen=True, kw_only=True)
class ActiveTest:
    """A session currently holding resources, as the policy needs to see it."""

    peer_id: str
    test_type: TestType
    seconds_left: float


@dataclass(frozen=True, kw_only=True)
class Grant:
    """Permission to run the test with these effective limits.

    `streams` is the requested count or iperf3.default_streams (throughput only);
    `bitrate_cap_bps` is what the engine must enforce: the requested rate, else the operator's
    cap, else None (unlimited).
    """

    test_type: TestType
    duration_sec: int
    streams: int | None
    bitrate_cap_bps: int | None


@dataclass(frozen=True, kw_only=True)
class Deny:
    """A refusal: a reason code, one line for a human, and when retrying could help."""

    reason: DenyReason
    message: str
    retry_after: int | None = None


@dataclass(frozen=True, kw_only=True)
class _Ask:
    """Everything one decision looks at, so each check is a function of one argument."""

    request: TestRequest
    peer_id: str
    now: Instant
    quotas: QuotaConfig
    iperf3: Iperf3Config
    usage: PeerUsage
    active: Sequence[ActiveTest]


@dataclass(frozen=True, kw_only=True)
class Limits:
    """A peer's effective quota limits after applying its overrides."""

    tests_per_hour: int
    bytes_per_day: int  # 0 = unlimited
    heavy_window: Window | None


def effective_limits(quotas: QuotaConfig, peer_id: str) -> Limits:
    """The global quotas with the peer's `[quotas.peers."ID"]` overrides (0/empty = global).

    Raises ValueError for a malformed window; the manager checks windows at start-up.
    """
    override = quotas.peers.get(peer_id)
    per_hour = quotas.max_tests_per_hour_per_peer
    per_day = quotas.max_bytes_per_day_per_peer
    window_text = quotas.heavy_tests_window
    if override is not None:
        per_hour = override.max_tests_per_hour or per_hour
        per_day = override.max_bytes_per_day or per_day
        window_text = override.heavy_tests_window or window_text
    window = parse_window(window_text) if window_text else None
    return Limits(tests_per_hour=per_hour, bytes_per_day=per_day, heavy_window=window)


def decide(
    request: TestRequest,
    peer_id: str,
    now: Instant,
    quotas: QuotaConfig,
    iperf3: Iperf3Config,
    usage: PeerUsage,
    active_sessions: Sequence[ActiveTest],
) -> Grant | Deny:
    """Grant or refuse `request` from `peer_id`; the first failing check (see module) wins."""
    ask = _Ask(
        request=request,
        peer_id=peer_id,
        now=now,
        quotas=quotas,
        iperf3=iperf3,
        usage=usage,
        active=active_sessions,
    )
    for check in _CHECKS:
        deny = check(ask)
        if deny is not None:
            return deny
    return _grant(ask)


def _grant(ask: _Ask) -> Grant:
    req = ask.request
    streams = None
    if req.test_type is TestType.THROUGHPUT:
        streams = req.streams if req.streams is not None else ask.iperf3.default_streams
    cap = req.bitrate_bps
    if cap is None and ask.iperf3.max_bitrate_bps:
        cap = ask.iperf3.max_bitrate_bps
    return Grant(
        test_type=req.test_type, duration_sec=req.duration_sec, streams=streams, bitrate_cap_bps=cap
    )


def retry_after_seconds(seconds: float) -> int:
    """Whole seconds to wait for a `retry_after`: rounded up, at least 1 (0 would invite an
    immediate identical retry), at most `MAX_RETRY_AFTER_SEC`."""
    return min(MAX_RETRY_AFTER_SEC, max(1, math.ceil(seconds)))


def _check_type_enabled(ask: _Ask) -> Deny | None:
    kind = ask.request.test_type
    if _type_allowed(ask.quotas, kind):
        return None
    return Deny(
        reason=DenyReason.TEST_TYPE_DISABLED, message=f"{kind} tests are disabled on this endpoint"
    )


def _check_duration(ask: _Ask) -> Deny | None:
    limit = ask.quotas.max_test_duration_sec
    if ask.request.duration_sec <= limit:
        return None
    return Deny(
        reason=DenyReason.DURATION_EXCEEDED,
        message=f"duration {ask.request.duration_sec} s exceeds the limit of {limit} s",
    )


def _check_streams(ask: _Ask) -> Deny | None:
    streams, limit = ask.request.streams, ask.iperf3.max_streams
    if ask.request.test_type is not TestType.THROUGHPUT or streams is None or streams <= limit:
        return None
    return Deny(
        reason=DenyReason.STREAMS_EXCEEDED,
        message=f"{streams} parallel streams exceed the limit of {limit}",
    )


def _check_bitrate(ask: _Ask) -> Deny | None:
    rate, limit = ask.request.bitrate_bps, ask.iperf3.max_bitrate_bps
    if not limit or rate is None or rate <= limit:
        return None
    return Deny(
        reason=DenyReason.BITRATE_EXCEEDED,
        message=f"bitrate {rate} bit/s exceeds the limit of {limit} bit/s",
    )


def _check_window(ask: _Ask) -> Deny | None:
    if ask.request.test_type is not TestType.THROUGHPUT:
        return None
    window = effective_limits(ask.quotas, ask.peer_id).heavy_window
    if window is None:
        return None
    tz = ZoneInfo(ask.quotas.timezone)
    if in_window(window, ask.now.wall, tz):
        return None
    return Deny(
        reason=DenyReason.OUTSIDE_WINDOW,
        message=f"throughput tests run only between {window} ({ask.quotas.timezone})",
        retry_after=retry_after_seconds(seconds_until_open(window, ask.now.wall, tz)),
    )


def _check_concurrency(ask: _Ask) -> Deny | None:
    limit = ask.quotas.max_concurrent_tests
    if len(ask.active) < limit:
        return None
    return Deny(
        reason=DenyReason.BUSY,
        message=f"the endpoint is busy: {len(ask.active)} of {limit} concurrent tests running",
        retry_after=retry_after_seconds(min(a.seconds_left for a in ask.active)),
    )


def _check_heavy(ask: _Ask) -> Deny | None:
    if ask.request.test_type is not TestType.THROUGHPUT:
        return None
    heavy = [a.seconds_left for a in ask.active if a.test_type is TestType.THROUGHPUT]
    if not heavy:
        return None
    return Deny(
        reason=DenyReason.HEAVY_TEST_RUNNING,
        message="another throughput test is running; only one runs at a time",
        retry_after=retry_after_seconds(min(heavy)),
    )


def _check_hourly(ask: _Ask) -> Deny | None:
    limit = effective_limits(ask.quotas, ask.peer_id).tests_per_hour
    wait = _count_wait(ask.usage.start_ages, limit, HOUR_SEC)
    if wait is None:
        return None
    return Deny(
        reason=DenyReason.HOURLY_QUOTA,
        message=f"hourly quota used: {ask.usage.tests_last_hour} of {limit} tests in the last hour",
        retry_after=retry_after_seconds(wait),
    )


def _check_daily_bytes(ask: _Ask) -> Deny | None:
    limit = effective_limits(ask.quotas, ask.peer_id).bytes_per_day
    wait = _bytes_wait(ask.usage.byte_records, limit)
    if wait is None:
        return None
    return Deny(
        reason=DenyReason.DAILY_BYTES_QUOTA,
        message=f"daily quota used: {ask.usage.bytes_last_day} of {limit} bytes in the last 24 h",
        retry_after=retry_after_seconds(wait),
    )


def _check_cooldown(ask: _Ask) -> Deny | None:
    wait = _cooldown_wait(ask.usage.last_end_age, ask.quotas.cooldown_sec)
    if wait is None:
        return None
    return Deny(
        reason=DenyReason.COOLDOWN,
        message=f"cooldown: tests must be {ask.quotas.cooldown_sec} s apart",
        retry_after=retry_after_seconds(wait),
    )


# The order of the checks, in one place (the module docstring explains it).
_CHECKS: Final[tuple[Callable[[_Ask], Deny | None], ...]] = (
    _check_type_enabled,
    _check_duration,
    _check_streams,
    _check_bitrate,
    _check_window,
    _check_concurrency,
    _check_heavy,
    _check_hourly,
    _check_daily_bytes,
    _check_cooldown,
)


def _count_wait(ages: Sequence[float], limit: int, window: float) -> float | None:
    """Seconds until fewer than `limit` of the events (ages, oldest first) lie within `window`;
    None if that is already so."""
    must_age_out = len(ages) - limit + 1
    if must_age_out <= 0:
        return None
    return window - ages[must_age_out - 1]


def _bytes_wait(records: Sequence[tuple[float, int]], limit: int) -> float | None:
    """Seconds until the bytes of tests within the last day drop below `limit` (0 = no limit);
    None if they already are. Tests age out oldest first, taking their bytes with them."""
    total = sum(n for _, n in records)
    if not limit or total < limit:
        return None
    for age, n in records:
        total -= n
        if total < limit:
            return DAY_SEC - age
    return None  # pragma: no cover - total reaches 0 < limit within the loop


def _cooldown_wait(last_end_age: float | None, cooldown: int) -> float | None:
    if not cooldown or last_end_age is None or last_end_age >= cooldown:
        return None
    return cooldown - last_end_age


def quota_status(
    peer_id: str, quotas: QuotaConfig, usage: PeerUsage, now: Instant
) -> dict[str, object]:
    """The peer's remaining allowance as JSON-able data (the `quota` of a StatusSnapshot)."""
    limits = effective_limits(quotas, peer_id)
    hourly_wait = _count_wait(usage.start_ages, limits.tests_per_hour, HOUR_SEC)
    bytes_wait = _bytes_wait(usage.byte_records, limits.bytes_per_day)
    cooldown_wait = _cooldown_wait(usage.last_end_age, quotas.cooldown_sec)
    bytes_left = None
    if limits.bytes_per_day:
        bytes_left = max(0, limits.bytes_per_day - usage.bytes_last_day)
    window = limits.heavy_window
    tz = ZoneInfo(quotas.timezone)
    return {
        "tests_per_hour": limits.tests_per_hour,
        "tests_left_this_hour": max(0, limits.tests_per_hour - usage.tests_last_hour),
        "hourly_retry_after": _wait_or_zero(hourly_wait),
        "bytes_per_day": limits.bytes_per_day or None,
        "bytes_last_24h": usage.bytes_last_day,
        "bytes_left_today": bytes_left,
        "bytes_retry_after": _wait_or_zero(bytes_wait),
        "cooldown_sec": quotas.cooldown_sec,
        "cooldown_remaining_sec": _wait_or_zero(cooldown_wait),
        "heavy_tests_window": str(window) if window else None,
        "heavy_window_open": window is None or in_window(window, now.wall, tz),
        "timezone": quotas.timezone,
    }


def _wait_or_zero(wait: float | None) -> int:
    return 0 if wait is None else retry_after_seconds(wait)


def policy_summary(quotas: QuotaConfig, iperf3: Iperf3Config, peer_id: str) -> dict[str, object]:
    """The limits a peer is held to, as JSON-able data (e.g. ServerHello's policy_summary)."""
    limits = effective_limits(quotas, peer_id)
    types = [t.value for t in TestType if _type_allowed(quotas, t)]
    return {
        "test_types": types,
        "max_test_duration_sec": quotas.max_test_duration_sec,
        "max_concurrent_tests": quotas.max_concurrent_tests,
        "max_tests_per_hour": limits.tests_per_hour,
        "max_bytes_per_day": limits.bytes_per_day or None,
        "cooldown_sec": quotas.cooldown_sec,
        "heavy_tests_window": str(limits.heavy_window) if limits.heavy_window else None,
        "timezone": quotas.timezone,
        "max_streams": iperf3.max_streams,
        "max_bitrate_bps": iperf3.max_bitrate_bps or None,
        "max_udp_echo_pps": quotas.max_udp_echo_pps,
    }


def _type_allowed(quotas: QuotaConfig, kind: TestType) -> bool:
    return quotas.allow_udp_echo if kind is TestType.UDP_ECHO else quotas.allow_throughput
