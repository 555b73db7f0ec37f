"""`reflector status`: the running endpoint's view plus recent denies, and stale files."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from reflector.audit import open_audit_log
from reflector.config import load_config
from reflector.status import collect_status, format_status


def config_for(state: Path):  # type: ignore[no-untyped-def]
    cfg = load_config(None, state_dir=state)
    return dataclasses.replace(cfg, audit=dataclasses.replace(cfg.audit, journald="off"))


def write_status(state: Path, pid: int, running: bool = True) -> None:
    doc = {
        "endpoint_id": "PPTEST",
        "running": running,
        "pid": pid,
        "mode": "tunneled",
        "engine_host": "local child processes (no systemd helper)",
        "updated": 0,
        "active_sessions": [
            {"session_id": "s1", "test_type": "udp_echo", "peer_id": "PPPEER", "seconds_left": 9}
        ],
        "max_concurrent_tests": 1,
        "peers": {
            "PPPEER": {
                "tests_per_hour": 10,
                "tests_left_this_hour": 7,
                "bytes_last_24h": 42,
                "bytes_per_day": 100,
            }
        },
    }
    (state / "status.json").write_text(json.dumps(doc))


def test_a_live_endpoint_is_shown_with_its_sessions_quota_and_denies(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    write_status(state, os.getpid())
    audit = open_audit_log(state, "PPTEST", "off", True)
    audit.emit("session_deny", peer_id="PPPEER", reason="busy", test_type="udp_echo")
    audit.emit("session_grant", peer_id="PPPEER", test_id="s1", test_type="udp_echo")
    audit.close()
    doc = collect_status(config_for(state), 10)
    assert doc["running"] is True
    assert [d["reason"] for d in doc["recent_denies"]] == ["busy"]
    text = format_status(doc)
    assert "s1  udp_echo" in text
    assert "tests 3/10  bytes 42/100" in text
    assert "session_deny  busy  PPPEER" in text


def test_a_dead_endpoint_is_reported_as_not_running(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    write_status(state, 2**22 + 12345)  # no such pid
    doc = collect_status(config_for(state), 10)
    assert doc["running"] is False
    assert "gone" in doc["note"]


def test_no_status_file_means_never_ran(tmp_path: Path) -> None:
    doc = collect_status(config_for(tmp_path), 10)
    assert doc["running"] is False
    assert "has not run here" in doc["note"]
