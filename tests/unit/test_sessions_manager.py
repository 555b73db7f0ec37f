"""SessionManager: grants, tokens, ports, expiry and grace, and quotas that outlive restarts."""

from __future__ import annotations

import base64
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflector.config import Config, NetworkConfig, PeerQuotaConfig, QuotaConfig, parse_config_text
from reflector.errors import ConfigError
from reflector.link.messages import (
    SessionGrant,
    StatusSnapshot,
    ThroughputParams,
    UdpEchoParams,
    validate_outgoing,
)
from reflector.sessions import clock
from reflector.sessions.accounting import HOUR_SEC, UsageStore
from reflector.sessions.clock import Instant
from reflector.sessions.manager import (
    SETUP_SLACK_SEC,
    CloseError,
    CloseErrorCode,
    Outcome,
    Session,
    SessionManager,
)
from reflector.sessions.policy import Deny, DenyReason, TestType

ALICE = "PEER-ALICE"
BOB = "PEER-BOB"
ECHO = UdpEchoParams(duration_sec=30)
HEAVY = ThroughputParams(duration_sec=20, protocol="tcp", streams=4, reverse=False)
LIFETIME = ECHO.duration_sec + SETUP_SLACK_SEC


class FakeClock:
    """Hands out Instants; time only moves when a test says so."""

    def __init__(self) -> None:
        self.wall = 1_714_564_800.0  # 2024-05-01 12:00 UTC
        self.boot_id = "boot-1"
        self.boottime = 1_000.0

    def now(self) -> Instant:
        return Instant(wall=self.wall, boot_id=self.boot_id, boottime=self.boottime)

    def advance(self, seconds: float) -> Instant:
        self.wall += seconds
        self.boottime += seconds
        return self.now()

    def step_wall(self, seconds: float) -> Instant:
        """An operator or NTP steps the wall clock; CLOCK_BOOTTIME is unaffected."""
        self.wall += seconds
        return self.now()

    def reboot(self, downtime: float) -> Instant:
        self.wall += downtime
        self.boot_id = f"{self.boot_id}+"
        self.boottime = 10.0
        return self.now()


@pytest.fixture
def clk() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UsageStore]:
    s = UsageStore.open(tmp_path / "state")
    yield s
    s.close()


def make(
    store: UsageStore,
    clk: FakeClock,
    *,
    network: NetworkConfig | None = None,
    **quota_changes: object,
) -> SessionManager:
    quotas = dataclasses.replace(QuotaConfig(), **quota_changes)  # type: ignore[arg-type]
    config = Config(quotas=quotas, network=network or NetworkConfig())
    return SessionManager.from_config(config, store, clk.now())


def granted(result: Session | Deny) -> Session:
    assert isinstance(result, Session), result
    return result


def refused(result: Session | Deny, reason: DenyReason) -> Deny:
    assert isinstance(result, Deny), result
    assert result.reason is reason, result
    return result


def test_a_grant_carries_fresh_secrets_a_port_and_an_expiry(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    assert len(s.session_id) == 16
    assert len(s.token) >= 43  # 256 bits in URL-safe base64
    assert s.hmac_key is not None
    assert len(s.hmac_key) == 32
    assert s.mode == "tunneled"
    assert 5201 <= s.port <= 5299
    assert s.expires_at == clk.wall + LIFETIME
    assert s.max_pps == QuotaConfig().max_udp_echo_pps
    assert s.token not in repr(s)
    assert "hmac_key=" not in repr(s)
    other = granted(
        make(store, clk, max_concurrent_tests=2).request(BOB, "udp_echo", ECHO, clk.now())
    )
    assert other.token != s.token
    assert other.session_id != s.session_id


def test_grant_fields_make_a_valid_session_grant_message(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, network=NetworkConfig(mode="direct_ephemeral"))
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    wire = validate_outgoing(SessionGrant(request_id=7, **s.grant_fields()))
    assert wire["mode"] == "direct_ephemeral"
    assert wire["ports"] == {"data": s.port}
    extra = wire["extra"]
    assert isinstance(extra, dict)
    assert base64.urlsafe_b64decode(extra["hmac_key"]) == s.hmac_key


def test_throughput_sessions_have_no_hmac_key(store: UsageStore, clk: FakeClock) -> None:
    s = granted(make(store, clk).request(ALICE, "throughput", HEAVY, clk.now()))
    assert s.test_type is TestType.THROUGHPUT
    assert s.hmac_key is None
    assert s.max_pps is None
    assert s.streams == 4


def test_params_must_match_the_test_type(store: UsageStore, clk: FakeClock) -> None:
    with pytest.raises(ValueError, match="test_type"):
        make(store, clk).request(ALICE, "throughput", ECHO, clk.now())


def test_policy_refusals_come_back_as_deny(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, allow_throughput=False)
    refused(mgr.request(ALICE, "throughput", HEAVY, clk.now()), DenyReason.TEST_TYPE_DISABLED)
    granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    busy = refused(mgr.request(BOB, "udp_echo", ECHO, clk.advance(10)), DenyReason.BUSY)
    assert busy.retry_after == LIFETIME - 10


def test_a_token_validates_only_for_its_peer_while_active(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    assert mgr.check_token(s.session_id, s.token, ALICE, clk.now()) == s
    assert mgr.check_token(None, s.token, ALICE, clk.now()) == s
    assert mgr.check_token(s.session_id, s.token, BOB, clk.now()) is None
    flipped = s.token[:-1] + ("B" if s.token.endswith("A") else "A")
    assert mgr.check_token(s.session_id, flipped, ALICE, clk.now()) is None
    assert mgr.check_token(s.session_id, "", ALICE, clk.now()) is None
    assert mgr.check_token(s.session_id, "tok\u00e9n\ud800", ALICE, clk.now()) is None
    assert mgr.check_token("nosuchsession", s.token, ALICE, clk.now()) is None


def test_a_token_is_revoked_by_close(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    closed = mgr.close(s.session_id, ALICE, clk.advance(5))
    assert isinstance(closed, Session)
    assert closed.outcome is Outcome.CLOSED
    assert mgr.check_token(s.session_id, s.token, ALICE, clk.now()) is None
    assert mgr.check_token(None, s.token, ALICE, clk.now()) is None


def test_a_token_is_dead_at_its_deadline_even_before_expire_runs(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    assert mgr.check_token(s.session_id, s.token, ALICE, clk.advance(LIFETIME - 1)) == s
    assert mgr.check_token(s.session_id, s.token, ALICE, clk.advance(1)) is None


def test_a_wall_clock_step_neither_extends_nor_cuts_a_session(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    assert mgr.check_token(s.session_id, s.token, ALICE, clk.step_wall(2 * HOUR_SEC)) == s
    assert mgr.expire(clk.now()) == []
    clk.step_wall(-4 * HOUR_SEC)
    assert [x.session_id for x in mgr.expire(clk.advance(LIFETIME))] == [s.session_id]


def test_close_refuses_unknown_and_foreign_sessions(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    foreign = mgr.close(s.session_id, BOB, clk.now())
    assert isinstance(foreign, CloseError)
    assert foreign.code is CloseErrorCode.NOT_YOUR_SESSION
    assert mgr.session(s.session_id) == s  # still active
    unknown = mgr.close("nosuchsession", ALICE, clk.now())
    assert isinstance(unknown, CloseError)
    assert unknown.code is CloseErrorCode.UNKNOWN_SESSION
    assert isinstance(mgr.close(s.session_id, ALICE, clk.now()), Session)
    again = mgr.close(s.session_id, ALICE, clk.now())
    assert isinstance(again, CloseError)
    assert again.code is CloseErrorCode.UNKNOWN_SESSION


def test_close_returns_the_accounting_of_the_session(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    mgr.record_bytes(s.session_id, 1_000, 2_000)
    updated = mgr.record_bytes(s.session_id, 10, 20)
    assert updated is not None
    assert (updated.bytes_rx, updated.bytes_tx) == (1_010, 2_020)
    closed = mgr.close(s.session_id, ALICE, clk.advance(12))
    assert isinstance(closed, Session)
    assert (closed.bytes_rx, closed.bytes_tx) == (1_010, 2_020)
    assert closed.ended == clk.now()
    assert mgr.record_bytes(s.session_id, 5, 5) is None  # late counters still reach the ledger
    assert store.peer_usage(ALICE, clk.now()).bytes_last_day == 3_040


def test_one_timer_expire_and_next_deadline(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, max_concurrent_tests=3)
    assert mgr.next_deadline() is None
    assert mgr.next_timeout(clk.now()) is None
    first = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    clk.advance(10)
    granted(mgr.request(BOB, "udp_echo", UdpEchoParams(duration_sec=60), clk.now()))
    assert mgr.next_deadline() == first.deadline
    assert mgr.next_timeout(clk.now()) == LIFETIME - 10
    assert mgr.expire(clk.advance(LIFETIME - 11)) == []
    expired = mgr.expire(clk.advance(1))
    assert [s.session_id for s in expired] == [first.session_id]
    assert expired[0].outcome is Outcome.EXPIRED
    assert mgr.next_timeout(clk.now()) == (10 + 60 + SETUP_SLACK_SEC) - LIFETIME
    assert mgr.next_timeout(clk.advance(10_000)) == 0


def test_disconnect_grace_expires_the_peer_sessions(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, session_grace_sec=5, max_concurrent_tests=2)
    a = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    b = granted(mgr.request(BOB, "udp_echo", ECHO, clk.now()))
    mgr.peer_disconnected(ALICE, clk.advance(1))
    assert mgr.next_timeout(clk.now()) == 5
    mgr.peer_disconnected(ALICE, clk.advance(3))  # a second disconnect does not extend it
    assert mgr.next_timeout(clk.now()) == 2
    gone = mgr.expire(clk.advance(2))
    assert [(s.session_id, s.outcome) for s in gone] == [(a.session_id, Outcome.PEER_GONE)]
    assert mgr.active_sessions == [b]
    assert mgr.next_deadline() == b.deadline


def test_reconnecting_within_the_grace_keeps_the_sessions(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk, session_grace_sec=5)
    a = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    mgr.peer_disconnected(ALICE, clk.now())
    assert mgr.check_token(a.session_id, a.token, ALICE, clk.advance(5)) is None
    mgr.peer_reconnected(ALICE)
    assert mgr.check_token(a.session_id, a.token, ALICE, clk.now()) == a
    assert mgr.expire(clk.now()) == []
    assert mgr.next_deadline() == a.deadline


def test_a_disconnect_without_sessions_arms_nothing(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk)
    mgr.peer_disconnected(ALICE, clk.now())
    assert mgr.next_deadline() is None


def test_ports_are_never_handed_out_twice(store: UsageStore, clk: FakeClock) -> None:
    net = NetworkConfig(data_port_range_start=6000, data_port_range_end=6004)
    mgr = make(store, clk, network=net, max_concurrent_tests=8, max_tests_per_hour_per_peer=100)
    sessions = [granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now())) for _ in range(5)]
    assert sorted(s.port for s in sessions) == [6000, 6001, 6002, 6003, 6004]
    full = refused(
        mgr.request(ALICE, "udp_echo", ECHO, clk.advance(1)), DenyReason.NO_PORT_AVAILABLE
    )
    assert full.retry_after == LIFETIME - 1
    assert mgr.allocate_port(sessions[0].session_id) is None  # nowhere to move
    mgr.close(sessions[2].session_id, ALICE, clk.now())
    moved = mgr.allocate_port(sessions[0].session_id)
    assert moved is not None
    assert moved.port == 6002
    fresh = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    assert fresh.port == 6000
    ports = [s.port for s in mgr.active_sessions]
    assert len(ports) == len(set(ports)) == 5


def test_allocation_rotates_so_a_freed_port_rests(store: UsageStore, clk: FakeClock) -> None:
    net = NetworkConfig(data_port_range_start=6000, data_port_range_end=6009)
    mgr = make(store, clk, network=net, max_tests_per_hour_per_peer=100)
    seen = []
    for _ in range(12):
        s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
        seen.append(s.port)
        mgr.close(s.session_id, ALICE, clk.now())
    assert seen == [*range(6000, 6010), 6000, 6001]


def test_allocate_port_skips_ports_the_shell_could_not_bind(
    store: UsageStore, clk: FakeClock
) -> None:
    net = NetworkConfig(data_port_range_start=6000, data_port_range_end=6003)
    mgr = make(store, clk, network=net)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    moved = mgr.allocate_port(s.session_id, exclude={6001, 6002})
    assert moved is not None
    assert moved.port == 6003
    assert mgr.session(s.session_id) == moved
    assert mgr.allocate_port("nosuchsession") is None


def test_the_hourly_quota_survives_a_restart(tmp_path: Path, clk: FakeClock) -> None:
    with UsageStore.open(tmp_path) as store:
        mgr = make(store, clk, max_tests_per_hour_per_peer=2)
        for _ in range(2):
            s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
            mgr.close(s.session_id, ALICE, clk.advance(40))
    with UsageStore.open(tmp_path) as store:  # the service restarts
        mgr = make(store, clk, max_tests_per_hour_per_peer=2)
        deny = refused(
            mgr.request(ALICE, "udp_echo", ECHO, clk.advance(20)), DenyReason.HOURLY_QUOTA
        )
        assert deny.retry_after == HOUR_SEC - 100
        granted(mgr.request(ALICE, "udp_echo", ECHO, clk.advance(HOUR_SEC - 100)))


def test_a_test_cut_off_by_a_crash_still_counts_and_starts_the_cooldown(
    tmp_path: Path, clk: FakeClock
) -> None:
    with UsageStore.open(tmp_path) as store:
        granted(make(store, clk, cooldown_sec=300).request(ALICE, "udp_echo", ECHO, clk.now()))
        # The process dies here: no close, no expire.
    with UsageStore.open(tmp_path) as store:
        mgr = make(store, clk, cooldown_sec=300)  # start-up ends the orphan as interrupted
        deny = refused(mgr.request(ALICE, "udp_echo", ECHO, clk.advance(100)), DenyReason.COOLDOWN)
        assert deny.retry_after == 200
        assert store.peer_usage(ALICE, clk.now()).tests_last_hour == 1


def test_a_wall_clock_jump_forward_does_not_reopen_the_hourly_quota(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk, max_tests_per_hour_per_peer=1)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    mgr.close(s.session_id, ALICE, clk.advance(60))
    deny = refused(
        mgr.request(ALICE, "udp_echo", ECHO, clk.step_wall(2 * HOUR_SEC)), DenyReason.HOURLY_QUOTA
    )
    assert deny.retry_after == HOUR_SEC - 60


def test_a_wall_clock_jump_backward_does_not_wrongly_close_the_quota(
    store: UsageStore, clk: FakeClock
) -> None:
    mgr = make(store, clk, max_tests_per_hour_per_peer=1)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    mgr.close(s.session_id, ALICE, clk.advance(60))
    clk.step_wall(-2 * HOUR_SEC)
    granted(mgr.request(ALICE, "udp_echo", ECHO, clk.advance(HOUR_SEC - 60)))


def test_after_a_reboot_the_quota_is_measured_in_wall_time(tmp_path: Path, clk: FakeClock) -> None:
    with UsageStore.open(tmp_path) as store:
        mgr = make(store, clk, max_tests_per_hour_per_peer=1)
        s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
        mgr.close(s.session_id, ALICE, clk.advance(30))
    clk.reboot(downtime=600)  # boottime restarts near zero; only the wall clock relates
    with UsageStore.open(tmp_path) as store:
        mgr = make(store, clk, max_tests_per_hour_per_peer=1)
        deny = refused(mgr.request(ALICE, "udp_echo", ECHO, clk.now()), DenyReason.HOURLY_QUOTA)
        assert deny.retry_after == HOUR_SEC - 630
        granted(mgr.request(ALICE, "udp_echo", ECHO, clk.advance(HOUR_SEC - 630)))


def test_data_plane_bytes_drive_the_daily_quota(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, max_bytes_per_day_per_peer=1_000_000)
    s = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    mgr.record_bytes(s.session_id, 600_000, 400_000)
    mgr.close(s.session_id, ALICE, clk.advance(30))
    deny = refused(mgr.request(ALICE, "udp_echo", ECHO, clk.now()), DenyReason.DAILY_BYTES_QUOTA)
    assert deny.retry_after == 86_400 - 30
    granted(mgr.request(BOB, "udp_echo", ECHO, clk.now()))


def test_status_shows_own_sessions_and_remaining_quota(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, max_concurrent_tests=2, cooldown_sec=0)
    mine = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    granted(mgr.request(BOB, "udp_echo", ECHO, clk.now()))
    mgr.record_bytes(mine.session_id, 100, 50)
    status = mgr.status(ALICE, clk.advance(10))
    assert [s["session_id"] for s in status["sessions"]] == [mine.session_id]
    assert status["sessions"][0]["seconds_left"] == LIFETIME - 10
    assert status["sessions"][0]["bytes_rx"] == 100
    assert "token" not in json.dumps(status)
    assert mine.token not in json.dumps(status)
    assert status["quota"]["tests_left_this_hour"] == 9
    assert status["quota"]["bytes_last_24h"] == 150
    validate_outgoing(
        StatusSnapshot(request_id=1, sessions=tuple(status["sessions"]), quota=status["quota"])
    )


def test_snapshot_shows_every_peer_for_the_operator(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, max_concurrent_tests=2, session_grace_sec=5)
    a = granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    b = granted(mgr.request(BOB, "udp_echo", ECHO, clk.now()))
    mgr.close(a.session_id, ALICE, clk.advance(5))
    mgr.peer_disconnected(BOB, clk.now())
    snap = mgr.snapshot(clk.now())
    assert [s["peer_id"] for s in snap["active_sessions"]] == [BOB]
    assert snap["active_sessions"][0]["session_id"] == b.session_id
    assert sorted(snap["peers"]) == sorted([ALICE, BOB])
    assert snap["peers"][ALICE]["tests_left_this_hour"] == 9
    assert snap["disconnected_peers_grace_sec"] == {BOB: 5}
    assert b.token not in json.dumps(snap)


def test_shutdown_ends_every_session(store: UsageStore, clk: FakeClock) -> None:
    mgr = make(store, clk, max_concurrent_tests=2)
    granted(mgr.request(ALICE, "udp_echo", ECHO, clk.now()))
    granted(mgr.request(BOB, "udp_echo", ECHO, clk.now()))
    ended = mgr.shutdown(clk.advance(1))
    assert {s.outcome for s in ended} == {Outcome.SHUTDOWN}
    assert mgr.active_sessions == []
    assert mgr.next_deadline() is None
    assert store.peer_usage(ALICE, clk.now()).last_end_age == 0


def test_unusable_schedule_settings_are_config_errors(store: UsageStore, clk: FakeClock) -> None:
    with pytest.raises(ConfigError, match=r"quotas\.heavy_tests_window: .*equal"):
        make(store, clk, heavy_tests_window="06:00-06:00")
    peer_cfg = {ALICE: PeerQuotaConfig(heavy_tests_window="01:00-01:00")}
    with pytest.raises(ConfigError, match=r'quotas\.peers\."PEER-ALICE"\.heavy_tests_window'):
        make(store, clk, peers=peer_cfg)
    with pytest.raises(ConfigError, match=r"quotas\.timezone"):
        make(store, clk, timezone="Mars/Olympus_Mons")


def test_the_manager_works_with_a_loaded_config_and_the_real_clock(store: UsageStore) -> None:
    config = parse_config_text('[quotas]\nheavy_tests_window = "00:00-23:59"\n')
    now = clock.now()
    mgr = SessionManager.from_config(config, store, now)
    s = mgr.request(ALICE, "udp_echo", ECHO, now)
    assert isinstance(s, Session)
    later = clock.now()
    assert later.boot_id == now.boot_id
    assert later.boottime >= now.boottime
    assert mgr.check_token(s.session_id, s.token, ALICE, later) == s


def test_session_ids_start_with_a_letter_or_digit() -> None:
    """IDs are also firewall element comments and unit names: never a leading '-' or '_'."""
    manager = SessionManager.__new__(SessionManager)
    manager._sessions = {}  # type: ignore[attr-defined]
    ids = [manager._new_session_id() for _ in range(2000)]
    assert all(i[0].isalnum() for i in ids)
    assert len(set(ids)) == len(ids)
