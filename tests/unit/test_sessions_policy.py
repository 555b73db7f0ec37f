"""`decide`: every refusal reason, in the documented order, with the right retry_after."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime

import pytest

from reflector.config import Iperf3Config, PeerQuotaConfig, QuotaConfig
from reflector.sessions.accounting import DAY_SEC, HOUR_SEC, PeerUsage
from reflector.sessions.clock import Instant
from reflector.sessions.policy import (
    MAX_RETRY_AFTER_SEC,
    ActiveTest,
    Deny,
    DenyReason,
    Grant,
    TestRequest,
    TestType,
    decide,
    policy_summary,
    quota_status,
)

PEER = "PEER-ONE"
OTHER = "PEER-TWO"
NOON = datetime(2024, 5, 1, 12, 0, tzinfo=UTC).timestamp()
NOW = Instant(wall=NOON, boot_id="b", boottime=5000.0)
QUOTAS = QuotaConfig()
IPERF3 = Iperf3Config()
ECHO = TestRequest(test_type=TestType.UDP_ECHO, duration_sec=30)
HEAVY = TestRequest(test_type=TestType.THROUGHPUT, duration_sec=30, streams=4)


def ask(
    request: TestRequest = ECHO,
    *,
    quotas: QuotaConfig = QUOTAS,
    iperf3: Iperf3Config = IPERF3,
    usage: PeerUsage | None = None,
    active: tuple[ActiveTest, ...] = (),
    now: Instant = NOW,
    peer: str = PEER,
) -> Grant | Deny:
    return decide(request, peer, now, quotas, iperf3, usage or PeerUsage(), active)


def denied(result: Grant | Deny, reason: DenyReason) -> Deny:
    assert isinstance(result, Deny), result
    assert result.reason is reason, result
    assert result.message
    assert "\n" not in result.message
    return result


def q(**changes: object) -> QuotaConfig:
    return dataclasses.replace(QUOTAS, **changes)  # type: ignore[arg-type]


def running(test_type: TestType, seconds_left: float, peer: str = OTHER) -> ActiveTest:
    return ActiveTest(peer_id=peer, test_type=test_type, seconds_left=seconds_left)


def test_a_plain_request_is_granted_with_effective_limits() -> None:
    assert ask(ECHO) == Grant(
        test_type=TestType.UDP_ECHO, duration_sec=30, streams=None, bitrate_cap_bps=None
    )
    grant = ask(dataclasses.replace(HEAVY, streams=None))
    assert isinstance(grant, Grant)
    assert grant.streams == IPERF3.default_streams


def test_the_operator_bitrate_cap_applies_when_none_is_requested() -> None:
    capped = dataclasses.replace(IPERF3, max_bitrate_bps=100_000_000)
    grant = ask(HEAVY, iperf3=capped)
    assert isinstance(grant, Grant)
    assert grant.bitrate_cap_bps == 100_000_000
    grant = ask(dataclasses.replace(HEAVY, bitrate_bps=5_000_000), iperf3=capped)
    assert isinstance(grant, Grant)
    assert grant.bitrate_cap_bps == 5_000_000


def test_disabled_test_types_are_refused_without_retry() -> None:
    deny = denied(ask(ECHO, quotas=q(allow_udp_echo=False)), DenyReason.TEST_TYPE_DISABLED)
    assert deny.retry_after is None
    assert "udp_echo" in deny.message
    denied(ask(HEAVY, quotas=q(allow_throughput=False)), DenyReason.TEST_TYPE_DISABLED)
    assert isinstance(ask(ECHO, quotas=q(allow_throughput=False)), Grant)


def test_duration_over_the_limit_is_refused() -> None:
    deny = denied(ask(dataclasses.replace(ECHO, duration_sec=61)), DenyReason.DURATION_EXCEEDED)
    assert deny.retry_after is None
    assert "61" in deny.message
    assert "60" in deny.message
    assert isinstance(ask(dataclasses.replace(ECHO, duration_sec=60)), Grant)


def test_too_many_streams_are_refused() -> None:
    deny = denied(ask(dataclasses.replace(HEAVY, streams=9)), DenyReason.STREAMS_EXCEEDED)
    assert deny.retry_after is None
    assert isinstance(ask(dataclasses.replace(HEAVY, streams=8)), Grant)


def test_bitrate_over_a_nonzero_cap_is_refused() -> None:
    fast = dataclasses.replace(HEAVY, bitrate_bps=10**9)
    assert isinstance(ask(fast), Grant)  # 0 = no cap
    capped = dataclasses.replace(IPERF3, max_bitrate_bps=10**8)
    deny = denied(ask(fast, iperf3=capped), DenyReason.BITRATE_EXCEEDED)
    assert deny.retry_after is None


def test_throughput_outside_the_window_waits_until_it_opens() -> None:
    night = q(heavy_tests_window="22:00-06:00")
    deny = denied(ask(HEAVY, quotas=night), DenyReason.OUTSIDE_WINDOW)
    assert deny.retry_after == 10 * HOUR_SEC
    assert "22:00-06:00" in deny.message
    assert isinstance(ask(ECHO, quotas=night), Grant)  # light tests ignore the window


def test_window_is_read_in_the_configured_time_zone() -> None:
    # Noon UTC is 22:00 in Sydney (AEST, UTC+10) on 1 May.
    sydney_night = q(heavy_tests_window="22:00-06:00", timezone="Australia/Sydney")
    assert isinstance(ask(HEAVY, quotas=sydney_night), Grant)


def test_a_peer_window_replaces_the_global_one() -> None:
    quotas = q(
        heavy_tests_window="22:00-06:00",
        peers={PEER: PeerQuotaConfig(heavy_tests_window="11:00-13:00")},
    )
    assert isinstance(ask(HEAVY, quotas=quotas), Grant)
    deny = denied(ask(HEAVY, quotas=quotas, peer=OTHER), DenyReason.OUTSIDE_WINDOW)
    assert deny.retry_after == 10 * HOUR_SEC


def test_busy_when_the_concurrency_limit_is_reached() -> None:
    deny = denied(ask(ECHO, active=(running(TestType.UDP_ECHO, 12.2),)), DenyReason.BUSY)
    assert deny.retry_after == 13
    two = q(max_concurrent_tests=2)
    active = (running(TestType.UDP_ECHO, 40.0), running(TestType.UDP_ECHO, 7.5))
    assert denied(ask(ECHO, quotas=two, active=active), DenyReason.BUSY).retry_after == 8
    assert isinstance(ask(ECHO, quotas=two, active=active[:1]), Grant)


def test_only_one_heavy_test_runs_at_a_time() -> None:
    many = q(max_concurrent_tests=4)
    active = (running(TestType.UDP_ECHO, 5.0), running(TestType.THROUGHPUT, 30.0))
    deny = denied(ask(HEAVY, quotas=many, active=active), DenyReason.HEAVY_TEST_RUNNING)
    assert deny.retry_after == 30
    assert isinstance(ask(ECHO, quotas=many, active=active), Grant)


def test_hourly_quota_waits_for_the_oldest_test_to_age_out() -> None:
    usage = PeerUsage(start_ages=tuple(float(3000 - 100 * i) for i in range(10)))
    deny = denied(ask(ECHO, usage=usage), DenyReason.HOURLY_QUOTA)
    assert deny.retry_after == HOUR_SEC - 3000
    assert "10 of 10" in deny.message
    nine = PeerUsage(start_ages=usage.start_ages[1:])
    assert isinstance(ask(ECHO, usage=nine), Grant)


def test_hourly_quota_after_the_limit_was_lowered_waits_for_enough_tests() -> None:
    usage = PeerUsage(start_ages=(3000.0, 2000.0, 1000.0))
    deny = denied(
        ask(ECHO, quotas=q(max_tests_per_hour_per_peer=2), usage=usage), DenyReason.HOURLY_QUOTA
    )
    assert deny.retry_after == HOUR_SEC - 2000  # two tests must leave the window


def test_a_peer_override_replaces_the_hourly_limit() -> None:
    quotas = q(peers={PEER: PeerQuotaConfig(max_tests_per_hour=2)})
    usage = PeerUsage(start_ages=(100.0, 50.0))
    denied(ask(ECHO, quotas=quotas, usage=usage), DenyReason.HOURLY_QUOTA)
    assert isinstance(ask(ECHO, quotas=quotas, usage=usage, peer=OTHER), Grant)


def test_daily_bytes_quota_waits_until_enough_bytes_age_out() -> None:
    usage = PeerUsage(byte_records=((80_000.0, 3_000_000_000), (1_000.0, 3_000_000_000)))
    deny = denied(ask(ECHO, usage=usage), DenyReason.DAILY_BYTES_QUOTA)
    assert deny.retry_after == DAY_SEC - 80_000
    assert isinstance(ask(ECHO, usage=usage, quotas=q(max_bytes_per_day_per_peer=0)), Grant)
    bigger = q(peers={PEER: PeerQuotaConfig(max_bytes_per_day=10**10)})
    assert isinstance(ask(ECHO, usage=usage, quotas=bigger), Grant)


def test_cooldown_counts_from_the_last_test_end() -> None:
    usage = PeerUsage(last_end_age=20.0)
    assert isinstance(ask(ECHO, usage=usage), Grant)  # cooldown 0 by default
    deny = denied(ask(ECHO, usage=usage, quotas=q(cooldown_sec=300)), DenyReason.COOLDOWN)
    assert deny.retry_after == 280
    assert isinstance(
        ask(ECHO, usage=PeerUsage(last_end_age=300.0), quotas=q(cooldown_sec=300)), Grant
    )


def test_checks_run_in_the_documented_order() -> None:
    everything_wrong = dataclasses.replace(HEAVY, duration_sec=999, streams=99, bitrate_bps=10**9)
    strict = q(
        allow_throughput=False,
        heavy_tests_window="01:00-02:00",
        cooldown_sec=600,
        max_bytes_per_day_per_peer=1,
        max_tests_per_hour_per_peer=1,
    )
    usage = PeerUsage(start_ages=(10.0,), byte_records=((10.0, 5),), last_end_age=1.0)
    active: tuple[ActiveTest, ...] = (running(TestType.THROUGHPUT, 5.0),)
    capped = dataclasses.replace(IPERF3, max_bitrate_bps=10)
    order = [
        (DenyReason.TEST_TYPE_DISABLED, {"allow_throughput": True}),
        (DenyReason.DURATION_EXCEEDED, {}),
        (DenyReason.STREAMS_EXCEEDED, {}),
        (DenyReason.BITRATE_EXCEEDED, {}),
        (DenyReason.OUTSIDE_WINDOW, {"heavy_tests_window": ""}),
        (DenyReason.BUSY, {"max_concurrent_tests": 2}),
        (DenyReason.HEAVY_TEST_RUNNING, {}),
        (DenyReason.HOURLY_QUOTA, {"max_tests_per_hour_per_peer": 10}),
        (DenyReason.DAILY_BYTES_QUOTA, {"max_bytes_per_day_per_peer": 0}),
        (DenyReason.COOLDOWN, {"cooldown_sec": 0}),
    ]
    request = everything_wrong
    for reason, fix in order:
        denied(ask(request, quotas=strict, iperf3=capped, usage=usage, active=active), reason)
        strict = dataclasses.replace(strict, **fix)  # type: ignore[arg-type]
        if reason is DenyReason.DURATION_EXCEEDED:
            request = dataclasses.replace(request, duration_sec=30)
        if reason is DenyReason.STREAMS_EXCEEDED:
            request = dataclasses.replace(request, streams=4)
        if reason is DenyReason.BITRATE_EXCEEDED:
            request = dataclasses.replace(request, bitrate_bps=None)
        if reason is DenyReason.HEAVY_TEST_RUNNING:
            active = ()
    # The cap stays, but the granted rate is clamped to it rather than refused.
    assert ask(request, quotas=strict, iperf3=capped, usage=usage, active=active) == Grant(
        test_type=TestType.THROUGHPUT, duration_sec=30, streams=4, bitrate_cap_bps=10
    )


def test_retry_after_is_whole_seconds_between_one_and_a_day() -> None:
    tiny = denied(ask(ECHO, active=(running(TestType.UDP_ECHO, 0.0),)), DenyReason.BUSY)
    assert tiny.retry_after == 1
    # Just after 02:45 CET on the 30th; the next night skips 02:15-02:45 (DST), so the
    # window next opens on 1 April, more than a day away.
    dst = q(heavy_tests_window="02:15-02:45", timezone="Europe/Berlin")
    just_before = Instant(
        wall=datetime(2024, 3, 30, 1, 50, tzinfo=UTC).timestamp(), boot_id="b", boottime=1.0
    )
    deny = denied(ask(HEAVY, quotas=dst, now=just_before), DenyReason.OUTSIDE_WINDOW)
    assert deny.retry_after == MAX_RETRY_AFTER_SEC


def test_quota_status_reports_what_is_left() -> None:
    quotas = q(cooldown_sec=60, heavy_tests_window="22:00-06:00")
    usage = PeerUsage(
        start_ages=(600.0, 30.0), byte_records=((600.0, 1_000), (30.0, 500)), last_end_age=20.0
    )
    status = quota_status(PEER, quotas, usage, NOW)
    assert status["tests_left_this_hour"] == 8
    assert status["hourly_retry_after"] == 0
    assert status["bytes_last_24h"] == 1_500
    assert status["bytes_left_today"] == 5_000_000_000 - 1_500
    assert status["cooldown_remaining_sec"] == 40
    assert status["heavy_tests_window"] == "22:00-06:00"
    assert status["heavy_window_open"] is False
    json.dumps(status)
    full = quota_status(PEER, q(max_tests_per_hour_per_peer=2), usage, NOW)
    assert full["tests_left_this_hour"] == 0
    assert full["hourly_retry_after"] == HOUR_SEC - 600
    unlimited = quota_status(PEER, q(max_bytes_per_day_per_peer=0), usage, NOW)
    assert unlimited["bytes_left_today"] is None


def test_policy_summary_lists_the_limits_a_peer_is_held_to() -> None:
    quotas = q(allow_throughput=False, peers={PEER: PeerQuotaConfig(max_tests_per_hour=3)})
    summary = policy_summary(quotas, IPERF3, PEER)
    assert summary["test_types"] == ["udp_echo"]
    assert summary["max_tests_per_hour"] == 3
    assert summary["max_test_duration_sec"] == 60
    assert policy_summary(quotas, IPERF3, OTHER)["max_tests_per_hour"] == 10
    json.dumps(summary)


@pytest.mark.parametrize("reason", list(DenyReason))
def test_reason_codes_are_wire_error_codes(reason: DenyReason) -> None:
    assert reason.value.replace("_", "").isalpha()
    assert reason.value.islower()
