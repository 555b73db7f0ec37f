"""The usage ledger: a real sqlite file that survives restarts and ignores wall-clock steps."""

from __future__ import annotations

import sqlite3
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflector.errors import ReflectorError
from reflector.sessions.accounting import (
    DAY_SEC,
    DB_FILE_NAME,
    HOUR_SEC,
    RETENTION_SEC,
    SCHEMA_VERSION,
    PeerUsage,
    UsageStore,
)
from reflector.sessions.clock import Instant, age_seconds

BOOT = "boot-a"
OTHER_BOOT = "boot-b"
T0 = 1_700_000_000.0  # an arbitrary wall time
B0 = 10_000.0  # an arbitrary CLOCK_BOOTTIME
PEER = "PEER-ONE"
OTHER_PEER = "PEER-TWO"


def at(seconds: float, *, wall_shift: float = 0.0, boot: str = BOOT) -> Instant:
    """`seconds` after the start of the test, with the wall clock stepped by `wall_shift`."""
    return Instant(wall=T0 + seconds + wall_shift, boot_id=boot, boottime=B0 + seconds)


def start(store: UsageStore, sid: str, when: Instant, peer: str = PEER) -> None:
    store.record_start(session_id=sid, peer_id=peer, test_type="udp_echo", started=when)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[UsageStore]:
    s = UsageStore.open(tmp_path / "state")
    yield s
    s.close()


def test_age_uses_boottime_within_a_boot_and_wall_time_across_boots() -> None:
    then = at(0)
    assert age_seconds(then, at(60, wall_shift=7200)) == 60
    assert age_seconds(then, at(60, wall_shift=-7200)) == 60
    assert age_seconds(then, Instant(wall=T0 + 500, boot_id=OTHER_BOOT, boottime=3.0)) == 500
    # A clock that is behind after a reboot makes the record look new, never negative.
    assert age_seconds(then, Instant(wall=T0 - 500, boot_id=OTHER_BOOT, boottime=3.0)) == 0


def test_database_is_private_wal_and_versioned(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with UsageStore.open(state) as store:
        start(store, "s1", at(0))
        db = state / DB_FILE_NAME
        assert store.path == db
        assert stat.S_IMODE(db.stat().st_mode) == 0o600
        wal = state / f"{DB_FILE_NAME}-wal"
        assert wal.exists()
        assert stat.S_IMODE(wal.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    finally:
        conn.close()


def test_an_existing_database_file_open_to_others_is_tightened(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    db = tmp_path / DB_FILE_NAME
    db.touch(mode=0o644)
    db.chmod(0o644)
    UsageStore.open(tmp_path).close()
    assert stat.S_IMODE(db.stat().st_mode) == 0o600


def test_a_newer_schema_is_refused_with_the_file_name(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    conn = sqlite3.connect(tmp_path / DB_FILE_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(ReflectorError, match=rf"{DB_FILE_NAME}.*schema version"):
        UsageStore.open(tmp_path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    tmp_path.chmod(0o700)
    (tmp_path / DB_FILE_NAME).write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ReflectorError, match="accounting database"):
        UsageStore.open(tmp_path)


def test_usage_counts_tests_bytes_and_the_last_end(store: UsageStore) -> None:
    start(store, "s1", at(0))
    assert store.record_bytes("s1", 1000, 500)
    assert store.record_bytes("s1", 1, 2)
    store.record_end("s1", at(70), "closed")
    start(store, "s2", at(100))
    start(store, "other", at(100), peer=OTHER_PEER)
    store.record_bytes("other", 10**9, 0)
    usage = store.peer_usage(PEER, at(200))
    assert usage.start_ages == (200, 100)  # oldest first
    assert usage.tests_last_hour == 2
    assert usage.bytes_last_day == 1503
    assert usage.byte_records == ((200, 1503), (100, 0))
    assert usage.last_end_age == 130
    assert store.peer_usage("PEER-NOBODY", at(200)) == PeerUsage()


def test_record_end_keeps_the_first_end(store: UsageStore) -> None:
    start(store, "s1", at(0))
    store.record_end("s1", at(10), "closed")
    store.record_end("s1", at(50), "expired")
    assert store.peer_usage(PEER, at(60)).last_end_age == 50


def test_byte_deltas_must_be_non_negative_integers(store: UsageStore) -> None:
    start(store, "s1", at(0))
    with pytest.raises(ValueError, match="rx"):
        store.record_bytes("s1", -1, 0)
    with pytest.raises(ValueError, match="tx"):
        store.record_bytes("s1", 0, 1.5)  # type: ignore[arg-type]
    assert not store.record_bytes("unknown", 5, 5)


def test_tests_leave_the_hour_and_the_day_as_they_age(store: UsageStore) -> None:
    start(store, "s1", at(0))
    store.record_bytes("s1", 7, 0)
    assert store.peer_usage(PEER, at(HOUR_SEC - 1)).tests_last_hour == 1
    assert store.peer_usage(PEER, at(HOUR_SEC)).tests_last_hour == 0
    assert store.peer_usage(PEER, at(HOUR_SEC)).bytes_last_day == 7
    assert store.peer_usage(PEER, at(DAY_SEC)).bytes_last_day == 0


def test_usage_survives_reopening_the_database(tmp_path: Path) -> None:
    with UsageStore.open(tmp_path / "s") as store:
        start(store, "s1", at(0))
        store.record_bytes("s1", 4096, 1024)
        store.record_end("s1", at(30), "closed")
    with UsageStore.open(tmp_path / "s") as reopened:
        usage = reopened.peer_usage(PEER, at(60))
    assert usage.tests_last_hour == 1
    assert usage.bytes_last_day == 5120
    assert usage.last_end_age == 30


def test_wall_clock_jump_forward_does_not_reopen_the_hour(store: UsageStore) -> None:
    start(store, "s1", at(0))
    store.record_end("s1", at(60), "closed")
    later = at(120, wall_shift=2 * HOUR_SEC)  # two minutes later, but the wall says 2 h
    usage = store.peer_usage(PEER, later)
    assert usage.start_ages == (120,)
    assert usage.last_end_age == 60


def test_wall_clock_jump_backward_does_not_keep_the_hour_closed(store: UsageStore) -> None:
    start(store, "s1", at(0))
    later = at(HOUR_SEC + 1, wall_shift=-2 * HOUR_SEC)  # an hour later, the wall went back
    assert store.peer_usage(PEER, later).tests_last_hour == 0


def test_after_a_reboot_ages_come_from_the_wall_clock(store: UsageStore) -> None:
    start(store, "s1", at(0))
    rebooted_soon = Instant(wall=T0 + 1800, boot_id=OTHER_BOOT, boottime=30.0)
    rebooted_late = Instant(wall=T0 + HOUR_SEC + 5, boot_id=OTHER_BOOT, boottime=30.0)
    assert store.peer_usage(PEER, rebooted_soon).start_ages == (1800,)
    assert store.peer_usage(PEER, rebooted_late).tests_last_hour == 0
    assert store.peer_usage(PEER, rebooted_late).byte_records == ((HOUR_SEC + 5, 0),)


def test_close_unfinished_ends_tests_a_dead_process_left_open(store: UsageStore) -> None:
    start(store, "s1", at(0))
    start(store, "s2", at(5))
    store.record_end("s2", at(10), "closed")
    assert store.close_unfinished(at(100), "interrupted") == 1
    assert store.peer_usage(PEER, at(130)).last_end_age == 30
    assert store.close_unfinished(at(200), "interrupted") == 0


def test_prune_deletes_only_tests_older_than_the_retention(store: UsageStore) -> None:
    start(store, "old", at(0))
    start(store, "new", at(DAY_SEC))
    assert store.prune(at(RETENTION_SEC - 1)) == 0
    assert store.prune(at(RETENTION_SEC)) == 1
    assert store.peers_seen(at(RETENTION_SEC), within=RETENTION_SEC) == [PEER]
    assert store.peer_usage(PEER, at(DAY_SEC + 1)).start_ages == (1,)


def test_peers_seen_lists_recent_peers_once(store: UsageStore) -> None:
    start(store, "a1", at(0))
    start(store, "a2", at(10))
    start(store, "b1", at(20), peer=OTHER_PEER)
    assert store.peers_seen(at(30)) == [PEER, OTHER_PEER]
    assert store.peers_seen(at(DAY_SEC + 15)) == [OTHER_PEER]
