"""The command line as an operator meets it: exit codes, one-line errors, JSON output."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from reflector.link import encode_frame


def cli(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflector", *args],
        input=stdin.decode() if stdin is not None else None,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    return lines[0]


def test_version_names_the_build() -> None:
    done = cli("--version")
    assert done.returncode == 0
    assert done.stdout.startswith("reflector 0.")
    assert "python 3.11" in done.stdout


def test_init_then_id_and_id_json_agree(tmp_path: Path) -> None:
    state = tmp_path / "s"
    init = cli("init", "--state-dir", str(state))
    assert init.returncode == 0
    endpoint_id = init.stdout.splitlines()[-1].split(": ", 1)[1]
    assert cli("id", "--state-dir", str(state)).stdout.strip() == endpoint_id
    doc = json.loads(cli("id", "--json", "--state-dir", str(state)).stdout)
    assert doc["endpoint_id"] == endpoint_id
    assert doc["key_path"] == str(state / "identity.ed25519")
    assert len(doc["public_key_sha256"]) == 64
    assert (state / "identity.ed25519").stat().st_mode & 0o777 == 0o600
    assert state.stat().st_mode & 0o777 == 0o700


def test_rotate_identity_keeps_a_backup_and_warns(tmp_path: Path) -> None:
    state = tmp_path / "s"
    cli("init", "--state-dir", str(state))
    old = cli("id", "--state-dir", str(state)).stdout.strip()
    done = cli("rotate-identity", "--yes", "--state-dir", str(state))
    assert done.returncode == 0
    assert f"old Endpoint ID: {old}" in done.stdout
    assert "must now re-pair" in done.stderr
    assert cli("id", "--state-dir", str(state)).stdout.strip() != old
    assert len(list(state.glob("identity.ed25519.*.bak"))) == 1
    audit = [json.loads(line) for line in (state / "audit.jsonl").read_text().splitlines()]
    assert audit[-1]["reflector_event"] == "identity_rotated"
    assert audit[-1]["params"]["old_id"] == old


def test_a_bad_config_is_one_line_and_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "reflector.toml"
    bad.write_text("[quotas]\nmax_test_duration_sec = -5\n")
    done = cli("config", "check", str(bad))
    assert done.returncode == 2
    assert one_line_error(done).endswith(
        "reflector.toml: quotas.max_test_duration_sec: must be between 1 and 3600, got -5"
    )
    good = tmp_path / "good.toml"
    good.write_text('[network]\nmode = "direct_ephemeral"\n')
    assert cli("config", "check", str(good)).returncode == 0
    shown = cli("config", "show", "--config", str(good)).stdout
    assert 'mode = "direct_ephemeral"' in shown and "max_test_duration_sec = 60" in shown


def test_missing_key_is_a_runtime_error_exit_1(tmp_path: Path) -> None:
    done = cli("id", "--state-dir", str(tmp_path / "nothing"))
    assert done.returncode == 1
    assert "does not exist" in one_line_error(done)


def test_peers_add_validates_check_characters_and_remove_revokes(tmp_path: Path) -> None:
    state = tmp_path / "s"
    appliance = cli("client", "id", "--state-dir", str(tmp_path / "app")).stdout.strip()
    typo = appliance[:-1] + ("0" if appliance[-1] != "0" else "1")
    bad = cli("peers", "add", typo, "--state-dir", str(state))
    assert bad.returncode == 2
    assert "not a valid peer ID" in one_line_error(bad)
    assert cli("peers", "add", appliance.lower(), "--state-dir", str(state)).returncode == 0
    listed = json.loads(cli("peers", "list", "--json", "--state-dir", str(state)).stdout)
    assert listed == [{"peer_id": appliance, "source": "peers.jsonl"}]
    assert cli("peers", "remove", appliance, "--state-dir", str(state)).returncode == 0
    again = cli("peers", "remove", appliance, "--state-dir", str(state))
    assert again.returncode == 1
    assert "not an authorized peer" in one_line_error(again)
    kinds = [
        json.loads(line)["reflector_event"]
        for line in (state / "audit.jsonl").read_text().splitlines()
    ]
    assert kinds.count("peer_added") == 1 and kinds.count("peer_removed") == 1


def test_pair_refuses_when_pairing_is_disabled(tmp_path: Path) -> None:
    done = cli("pair", "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 1
    assert "pairing is disabled" in one_line_error(done)


def test_pair_prints_a_token_once_and_records_only_its_hash(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    config.write_text('[access]\npairing_enabled = true\n[audit]\njournald = "off"\n')
    state = tmp_path / "s"
    done = cli("pair", "--ttl", "5m", "--config", str(config), "--state-dir", str(state))
    assert done.returncode == 0
    token = next(x.split(": ", 1)[1] for x in done.stdout.splitlines() if "Pairing token" in x)
    assert len(token) >= 32
    stored = (state / "pairing.json").read_text()
    assert token not in stored
    assert token not in (state / "audit.jsonl").read_text()
    assert (
        cli("pair", "--ttl", "5s", "--config", str(config), "--state-dir", str(state)).returncode
        == 1
    )  # below the minimum ttl: one clear line
    assert cli("pair", "--ttl", "ten", "--config", str(config)).returncode == 2


def test_trace_decode_pretty_prints_frames_and_flags_a_truncated_one(tmp_path: Path) -> None:
    capture = tmp_path / "capture.bin"
    hello = {"type": "hello", "request_id": 1, "version": 1, "features": []}
    capture.write_bytes(encode_frame(hello) + b'\x00\x00\x00\x50{"type"')
    done = cli("trace", "decode", str(capture))
    assert done.returncode == 0
    assert "hello" in done.stdout
    assert "truncated" in done.stdout.lower() or "incomplete" in done.stdout.lower()
    piped = cli("trace", "decode", "-", "--json", stdin=encode_frame(hello))
    assert json.loads(piped.stdout.splitlines()[0])["message"]["type"] == "hello"


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(tmp_path: Path) -> None:
    config = tmp_path / "r.toml"
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        config.write_text(
            f'[network]\nlisten_address = ["127.0.0.1:{port}"]\n[audit]\njournald = "off"\n'
        )
        done = cli("serve", "--config", str(config), "--state-dir", str(tmp_path / "s"))
    assert done.returncode == 1
    assert one_line_error(done) == (
        f"reflector: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )


def test_config_show_prints_the_effective_key_path(tmp_path: Path) -> None:
    state = tmp_path / "s"
    shown = cli("config", "show", "--state-dir", str(state)).stdout
    assert f'private_key_path = "{state / "identity.ed25519"}"' in shown
    assert 'private_key_path = ""' not in shown


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[service]\nstate_dir = ""', "service.state_dir: must be an absolute path, got ''"),
        ('[iperf3]\npath = "iperf3"', "iperf3.path: must be an absolute path, got 'iperf3'"),
    ],
)
def test_config_check_refuses_relative_paths_naming_the_key(
    tmp_path: Path, text: str, message: str
) -> None:
    bad = tmp_path / "reflector.toml"
    bad.write_text(text + "\n")
    done = cli("config", "check", str(bad))
    assert done.returncode == 2
    assert one_line_error(done).endswith(f"reflector.toml: {message}")


# Three records around 05:00 UTC, the moment that is 10:00 at UTC+5.
EXPORT_TRAIL = [
    {"ts": "2026-01-01T04:59:59.999999Z", "reflector_event": "session_deny", "reason": "early"},
    {"ts": "2026-01-01T05:00:00.000000Z", "reflector_event": "session_deny", "reason": "on"},
    {"ts": "2026-01-01T06:00:00.000000Z", "reflector_event": "session_deny", "reason": "late"},
]


def export_reasons(state: Path, tz: str, *window: str) -> list[str]:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "reflector",
            "audit",
            "export",
            "--source",
            "file",
            *window,
            "--state-dir",
            str(state),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, "TZ": tz},
    )
    assert done.returncode == 0, done.stderr
    return [json.loads(line)["reason"] for line in done.stdout.splitlines()]


def test_audit_export_reads_times_without_a_zone_as_local_time(tmp_path: Path) -> None:
    state = tmp_path / "s"
    state.mkdir()
    lines = (json.dumps(record) + "\n" for record in EXPORT_TRAIL)
    (state / "audit.jsonl").write_text("".join(lines))
    plus_five = "XYZ-5"  # POSIX TZ: local time is UTC+5 (the sign is inverted)
    assert export_reasons(state, plus_five, "--since", "2026-01-01T10:00") == ["on", "late"]
    window = ("--since", "2026-01-01T10:00", "--until", "2026-01-01T11:00")
    assert export_reasons(state, plus_five, *window) == ["on"]
    assert export_reasons(state, "UTC", "--since", "2026-01-01T10:00") == []
    # An explicit zone is that instant, whatever the local time zone.
    assert export_reasons(state, plus_five, "--since", "2026-01-01T05:00Z") == ["on", "late"]
    assert export_reasons(state, "UTC", "--until", "2026-01-01T10:00+05:00") == ["early"]


def test_audit_export_refuses_a_time_it_cannot_read(tmp_path: Path) -> None:
    done = cli("audit", "export", "--source", "file", "--since", "yesterday")
    assert done.returncode == 2
    assert one_line_error(done) == (
        "reflector: config error: --since: not an ISO 8601 time"
        " (e.g. 2026-12-01T08:00 or 2026-12-01T08:00Z): 'yesterday'"
    )
