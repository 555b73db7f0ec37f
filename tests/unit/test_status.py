"""`reflector status`: the running endpoint's view, quota from the ledger as of now, denies."""

from __future__ import annotations

import dataclasses
import json
import os
import sqlite3
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest

from reflector.audit import open_audit_log
from reflector.config import Config, load_config
from reflector.endpoint_id import endpoint_id_from_public_key
from reflector.sessions import clock
from reflector.sessions.accounting import DB_FILE_NAME, HOUR_SEC, UsageStore
from reflector.sessions.clock import Instant
from reflector.status import collect_status, format_status

PEER = endpoint_id_from_public_key(bytes(range(32)))
OTHER = endpoint_id_from_public_key(bytes(range(1, 33)))


def config_for(state: Path) -> Config:
    cfg = load_config(None, state_dir=state)
    return dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, journald="off"))


def earlier(now: Instant, seconds: float) -> Instant:
    """The same boot, `seconds` before `now` (as the ledger measures ages)."""
    return Instant(wall=now.wall - seconds, boot_id=now.boot_id, boottime=now.boottime - seconds)


def write_status(state: Path, pid: int, *, running: bool = True, **fields: Any) -> None:
    """A status.json as the server writes it; `peers` holds a stale quota on purpose."""
    doc = {
        "endpoint_id": "PPTEST",
        "running": running,
        "pid": pid,
        "mode": "tunneled",
        "engine_host": "local child processes (no systemd helper)",
        "updated": 0,
        "active_sessions": [],
        "max_concurrent_tests": 1,
        "peers": {PEER: {"tests_per_hour": 10, "tests_left_this_hour": 0, "bytes_last_24h": 1}},
        **fields,
    }
    state.mkdir(parents=True, exist_ok=True)
    (state / "status.json").write_text(json.dumps(doc))


def record_tests(state: Path, peer: str, starts: list[Instant], nbytes: int = 0) -> None:
    """Tests in the real ledger, started at `starts` and ended a second later."""
    with UsageStore.open(state) as ledger:
        for index, started in enumerate(starts):
            session_id = f"{peer[:6]}-{index}-{started.wall}"
            ledger.record_start(
                session_id=session_id, peer_id=peer, test_type="udp_echo", started=started
            )
            ledger.record_bytes(session_id, nbytes, 0)
            ledger.record_end(session_id, earlier(started, -1), "completed")


def test_a_live_endpoint_is_shown_with_its_sessions_quota_and_denies(tmp_path: Path) -> None:
    state = tmp_path / "s"
    now = clock.now()
    session = {"session_id": "s1", "test_type": "udp_echo", "peer_id": PEER, "seconds_left": 9}
    write_status(state, os.getpid(), active_sessions=[{**session, "expires_at": now.wall + 9}])
    record_tests(state, PEER, [earlier(now, 60), earlier(now, 30), earlier(now, 10)], nbytes=14)
    audit = open_audit_log(state, "PPTEST", "off", True)
    audit.emit("session_deny", peer_id=PEER, reason="busy", test_type="udp_echo")
    audit.emit("session_grant", peer_id=PEER, test_id="s1", test_type="udp_echo")
    audit.close()
    doc = collect_status(config_for(state), 10, now)
    assert doc["running"] is True
    assert [d["reason"] for d in doc["recent_denies"]] == ["busy"]
    text = format_status(doc)
    assert "s1  udp_echo" in text
    assert f"{PEER}  tests 3/10  bytes 42/5000000000" in text
    assert f"session_deny  busy  {PEER}" in text


def test_quota_comes_from_the_ledger_as_of_now_not_from_the_last_status_write(
    tmp_path: Path,
) -> None:
    # The server wrote status.json when the peer was out of tests; then the endpoint sat idle.
    state = tmp_path / "s"
    now = clock.now()
    write_status(state, os.getpid())
    record_tests(state, PEER, [earlier(now, 2 * HOUR_SEC), earlier(now, 50 * 60)])
    quota = collect_status(config_for(state), 10, now)["peers"][PEER]
    assert quota["tests_left_this_hour"] == 9  # the test of two hours ago no longer counts
    assert quota["hourly_retry_after"] == 0
    an_hour_on = Instant(now.wall + HOUR_SEC, now.boot_id, now.boottime + HOUR_SEC)
    later = collect_status(config_for(state), 10, an_hour_on)["peers"][PEER]
    assert later["tests_left_this_hour"] == 10  # nobody rewrote anything; the window moved


def test_peers_seen_in_the_last_day_and_peers_with_a_live_session_are_listed(
    tmp_path: Path,
) -> None:
    state = tmp_path / "s"
    now = clock.now()
    live = {"session_id": "s1", "test_type": "udp_echo", "peer_id": OTHER}
    write_status(state, os.getpid(), active_sessions=[live])
    record_tests(state, PEER, [earlier(now, 23 * HOUR_SEC)])
    record_tests(state, "PP-GONE", [earlier(now, 25 * HOUR_SEC)])
    doc = collect_status(config_for(state), 10, now)
    assert sorted(doc["peers"]) == sorted([PEER, OTHER])
    assert doc["peers"][OTHER]["tests_left_this_hour"] == 10


def test_seconds_left_counts_down_from_expires_at(tmp_path: Path) -> None:
    state = tmp_path / "s"
    now = clock.now()
    written = now.wall - 35  # the file is 35 s old and still says 60 s
    session = {"session_id": "s1", "test_type": "throughput", "peer_id": PEER}
    sessions = [
        {**session, "seconds_left": 60, "expires_at": written + 60},
        {**session, "session_id": "s2", "seconds_left": 20, "expires_at": written + 20},
    ]
    write_status(state, os.getpid(), updated=written, active_sessions=sessions)
    doc = collect_status(config_for(state), 10, now)
    assert [s["seconds_left"] for s in doc["active_sessions"]] == [25.0, 0.0]
    assert doc["age_sec"] == 35.0
    assert "s1  throughput peer" in format_status(doc) and "25 s left" in format_status(doc)


def test_a_dead_endpoint_is_reported_as_not_running_without_its_sessions(tmp_path: Path) -> None:
    state = tmp_path / "s"
    session = {"session_id": "s1", "test_type": "udp_echo", "peer_id": PEER, "expires_at": 2e9}
    write_status(state, 2**22 + 12345, active_sessions=[session])  # no such pid
    doc = collect_status(config_for(state), 10)
    assert doc["running"] is False
    assert "gone" in doc["note"]
    assert doc["active_sessions"] == []


def test_no_status_file_means_never_ran(tmp_path: Path) -> None:
    doc = collect_status(config_for(tmp_path), 10)
    assert doc["running"] is False
    assert "has not run here" in doc["note"]


def test_no_ledger_means_no_test_has_run_and_nothing_is_created(tmp_path: Path) -> None:
    state = tmp_path / "s"
    write_status(state, os.getpid())
    doc = collect_status(config_for(state), 10)
    assert doc["peers"] == {}
    assert "no test has run here" in doc["quota_note"]
    assert "no test has run here" in format_status(doc)
    assert not (state / DB_FILE_NAME).exists()


def test_a_ledger_that_is_not_a_database_is_named_in_the_output(tmp_path: Path) -> None:
    state = tmp_path / "s"
    write_status(state, os.getpid())
    (state / DB_FILE_NAME).write_bytes(b"not sqlite at all" * 100)
    doc = collect_status(config_for(state), 10)
    assert "peers" not in doc  # never the stale copy from status.json
    assert doc["quota_error"].startswith(f"cannot read usage ledger {state / DB_FILE_NAME}: ")
    assert "quota      unknown: cannot read usage ledger" in format_status(doc)


def test_a_ledger_of_another_schema_version_is_named_in_the_output(tmp_path: Path) -> None:
    state = tmp_path / "s"
    record_tests(state, PEER, [clock.now()])
    with sqlite3.connect(state / DB_FILE_NAME) as db:
        db.execute("PRAGMA user_version = 99")  # as a newer reflector would
    db.close()
    doc = collect_status(config_for(state), 10)
    assert "schema version 99, not the supported 1" in doc["quota_error"]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_ledger_this_user_cannot_read_is_named_not_a_crash(
    shared_tmp: Path, unprivileged: Callable[[], AbstractContextManager[None]]
) -> None:
    state = shared_tmp / "s"
    record_tests(state, PEER, [clock.now()])  # root's 0600 ledger
    state.chmod(0o755)
    write_status(state, os.getpid())
    (state / "status.json").chmod(0o644)
    with unprivileged():
        doc = collect_status(config_for(state), 10)
    assert doc["quota_error"] == (
        f"cannot read usage ledger {state / DB_FILE_NAME}: Permission denied"
        " (run as the service user or root)"
    )
    assert doc["running"] is True


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user")
def test_a_state_dir_this_user_cannot_enter_is_named_for_every_source(
    shared_tmp: Path, unprivileged: Callable[[], AbstractContextManager[None]]
) -> None:
    state = shared_tmp / "s"
    record_tests(state, PEER, [clock.now()])  # root's 0700 state dir
    audit = open_audit_log(state, "PPTEST", "off", True)
    audit.emit("session_deny", peer_id=PEER, reason="busy", test_type="udp_echo")
    audit.close()
    write_status(state, os.getpid())
    with unprivileged():
        doc = collect_status(config_for(state), 10)
    assert doc["note"] == f"{state / 'status.json'}: unreadable: Permission denied"
    assert "Permission denied" in doc["quota_error"]
    assert (
        doc["denies_error"] == f"cannot read audit log {state / 'audit.jsonl'}: Permission denied"
    )
    text = format_status(doc)
    assert "quota      unknown:" in text and "recent denies unknown:" in text
