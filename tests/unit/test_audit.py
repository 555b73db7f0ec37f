"""The audit trail: event model, redaction, the hash-chained file, sinks, queries and export."""

from __future__ import annotations

import csv
import gc
import hashlib
import io
import json
import logging
import os
import socket
import stat
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from reflector.audit import (
    AUDIT_FILE_NAME,
    CSV_COLUMNS,
    MESSAGE_IDS,
    REDACTED,
    AuditEvent,
    AuditLog,
    Decision,
    EventKind,
    JournalSink,
    JsonlSink,
    format_records,
    normalize_journal_entry,
    open_audit_log,
    read_jsonl,
    redact,
    verify_chain,
)
from reflector.audit.events import (
    MAX_PARAMS_BYTES,
    MAX_REASON_CHARS,
    journal_fields,
    priority,
    to_record,
)
from reflector.endpoint_id import endpoint_id_from_public_key
from reflector.errors import ConfigError, ReflectorError

ENDPOINT = endpoint_id_from_public_key(bytes(range(32)))
PEER_A = endpoint_id_from_public_key(bytes(range(1, 33)))
PEER_B = endpoint_id_from_public_key(bytes(range(2, 34)))
START = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def ticking_clock(step: timedelta = timedelta(seconds=1)) -> Callable[[], datetime]:
    """A clock that advances by `step` on every reading, from START."""
    moments: Iterator[datetime] = (START + n * step for n in range(10**9))
    return lambda: next(moments)


def jsonl_log(tmp_path: Path) -> tuple[AuditLog, Path]:
    path = tmp_path / AUDIT_FILE_NAME
    return AuditLog([JsonlSink(path)], ENDPOINT, clock=ticking_clock()), path


def emit_sessions(log: AuditLog, count: int) -> None:
    for n in range(count):
        log.emit(
            EventKind.SESSION_GRANT,
            peer_id=PEER_A,
            test_id=f"t-{n}",
            test_type="udp_echo",
            params={"duration": 10},
        )


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


# --- the event model -------------------------------------------------------------------------


def test_every_kind_has_its_own_fixed_128_bit_message_id() -> None:
    assert set(MESSAGE_IDS) == set(EventKind)
    assert len(set(MESSAGE_IDS.values())) == len(EventKind)
    assert all(isinstance(mid, uuid.UUID) for mid in MESSAGE_IDS.values())
    # Pinned: these identify event kinds in journald forever and must never change.
    assert MESSAGE_IDS[EventKind.SESSION_GRANT].hex == "8ac3ef09fdc34202b19d78e19f5f29eb"
    assert MESSAGE_IDS[EventKind.CONNECTION_DENY].hex == "ccc45d42fe7d4879b04ff00be17eceed"


def test_the_nineteen_kinds_of_the_brief_and_request_deny_exist() -> None:
    names = (
        "connection_accept connection_deny pairing_open pairing_enroll pairing_deny peer_added"
        " peer_removed identity_created identity_rotated session_grant session_deny"
        " session_close engine_start engine_exit accounting service_start service_stop"
        " hole_open hole_close request_deny"
    )
    assert {k.value for k in EventKind} == set(names.split())


def test_decision_kinds_imply_their_decision_and_a_deny_needs_a_reason() -> None:
    grant = AuditEvent(kind=EventKind.SESSION_GRANT, ts=START, endpoint_id=ENDPOINT)
    assert grant.decision is Decision.GRANT
    deny = AuditEvent(kind=EventKind.SESSION_DENY, ts=START, endpoint_id=ENDPOINT, reason="quota")
    assert deny.decision is Decision.DENY
    with pytest.raises(ValueError, match="without a reason"):
        AuditEvent(kind=EventKind.CONNECTION_DENY, ts=START, endpoint_id=ENDPOINT)
    with pytest.raises(ValueError, match="cannot carry decision=deny"):
        AuditEvent(
            kind=EventKind.SESSION_GRANT, ts=START, endpoint_id=ENDPOINT, decision=Decision.DENY
        )
    with pytest.raises(ValueError):
        AuditEvent(kind=EventKind.ACCOUNTING, ts=START, endpoint_id=ENDPOINT, decision="maybe")  # type: ignore[arg-type]


def test_free_text_is_bounded_to_one_printable_line() -> None:
    event = AuditEvent(
        kind=EventKind.CONNECTION_DENY,
        ts=START,
        endpoint_id=ENDPOINT,
        peer_id="EVIL\nREFLECTOR_EVENT=session_grant",
        reason="x" * 5000,
        source_addr="203.0.113.7:4000\r\u2028",
    )
    assert event.peer_id == "EVIL\\x0aREFLECTOR_EVENT=session_grant"
    assert event.source_addr == "203.0.113.7:4000\\x0d\\u2028"
    assert event.reason is not None
    assert len(event.reason) == MAX_REASON_CHARS
    assert event.reason.endswith("\u2026")
    assert "\n" not in event.message
    assert len(event.message) <= 1024


def test_programming_errors_in_fields_raise() -> None:
    def make(**fields: object) -> AuditEvent:
        return AuditEvent(kind=EventKind.ENGINE_EXIT, ts=START, endpoint_id=ENDPOINT, **fields)  # type: ignore[arg-type]

    with pytest.raises(TypeError):
        make(bytes_rx="12")
    with pytest.raises(TypeError):
        make(pid=True)
    with pytest.raises(ValueError, match="bytes_tx=-1"):
        make(bytes_tx=-1)
    with pytest.raises(ValueError, match="exit_code=300"):
        make(exit_code=300)
    with pytest.raises(ValueError, match="pid=0"):
        make(pid=0)
    with pytest.raises(TypeError):
        make(no_such_field=1)
    with pytest.raises(ValueError, match="timezone-aware"):
        AuditEvent(kind=EventKind.ENGINE_EXIT, ts=datetime(2024, 1, 1), endpoint_id=ENDPOINT)
    with pytest.raises(ValueError):
        AuditEvent(kind="no_such_kind", ts=START, endpoint_id=ENDPOINT)  # type: ignore[arg-type]
    assert make(exit_code=-9, pid=4242, runtime_ms=0).exit_code == -9


def test_default_message_summarises_the_event_on_one_line() -> None:
    event = AuditEvent(
        kind=EventKind.SESSION_DENY,
        ts=START,
        endpoint_id=ENDPOINT,
        peer_id=PEER_A,
        test_type="throughput",
        reason="rate limit: 10 tests/hour",
    )
    assert event.message == (
        f"session_deny peer_id={PEER_A} test_type=throughput decision=deny "
        "reason=rate limit: 10 tests/hour"
    )
    own = AuditEvent(kind=EventKind.SERVICE_START, ts=START, endpoint_id=ENDPOINT, message="up")
    assert own.message == "up"


def test_priorities_single_out_trust_changes_and_refusals() -> None:
    assert priority(EventKind.SESSION_DENY) == 5
    assert priority(EventKind.PEER_ADDED) == 5
    assert priority(EventKind.SESSION_GRANT) == 6
    assert priority(EventKind.ACCOUNTING) == 6


# --- redaction -------------------------------------------------------------------------------


def test_redact_replaces_every_secret_named_key_at_any_depth() -> None:
    params = {
        "duration": 30,
        "Token": "t0ps3cret",
        "nested": {"password": "hunter2", "streams": [{"hmac_key": "abc"}, {"port": 5201}]},
        "pairing-token": "p",
        "auth_cookie": "c",
        "api_key": "k",
        "SECRET": "s",
        "keyframes": 3,
    }
    assert redact(params) == {
        "duration": 30,
        "Token": REDACTED,
        "nested": {"password": REDACTED, "streams": [{"hmac_key": REDACTED}, {"port": 5201}]},
        "pairing-token": REDACTED,
        "auth_cookie": REDACTED,
        "api_key": REDACTED,
        "SECRET": REDACTED,
        "keyframes": 3,
    }
    assert params["Token"] == "t0ps3cret"  # the caller's mapping is left alone


def test_redact_makes_anything_json_safe() -> None:
    deep: dict[str, object] = {}
    node = deep
    for _ in range(20):
        node["d"] = {}
        node = node["d"]  # type: ignore[assignment]
    out = redact({"path": Path("/x"), "nan": float("nan"), "t": (1, 2), "deep": deep})
    json.dumps(out, allow_nan=False)  # must not raise
    assert isinstance(out, dict)
    assert out["path"] == "/x"
    assert out["t"] == [1, 2]
    assert "[too deep]" in json.dumps(out)


def test_secrets_never_reach_the_file(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    log.emit(
        EventKind.SESSION_GRANT,
        peer_id=PEER_A,
        test_type="throughput",
        params={"duration": 30, "token": "SUPERSECRET-1", "auth": {"key": "SUPERSECRET-2"}},
    )
    log.close()
    text = path.read_text()
    assert "SUPERSECRET" not in text
    assert json.loads(text)["params"] == {
        "auth": {"key": REDACTED},
        "duration": 30,
        "token": REDACTED,
    }


def test_oversized_params_are_replaced_by_their_size() -> None:
    event = AuditEvent(
        kind=EventKind.SESSION_DENY,
        ts=START,
        endpoint_id=ENDPOINT,
        reason="bad request",
        params={"junk": "x" * (2 * MAX_PARAMS_BYTES)},
    )
    assert event.params is not None
    assert set(event.params) == {"truncated_bytes"}
    assert event.params["truncated_bytes"] > MAX_PARAMS_BYTES  # type: ignore[operator]


# --- the hash-chained file -------------------------------------------------------------------


def test_chain_is_written_and_verifies(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 5)
    log.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    lines = lines_of(path)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == "0" * 64
    for previous, record in zip(lines, records[1:], strict=False):
        assert record["prev"] == hashlib.sha256(previous.rstrip(b"\n")).hexdigest()
    assert records[0]["ts"] == "2024-05-01T12:00:00.123456Z"
    assert records[0]["reflector_event"] == "session_grant"
    assert records[0]["endpoint_id"] == ENDPOINT
    assert records[0]["decision"] == "grant"
    assert records[0]["message_id"] == MESSAGE_IDS[EventKind.SESSION_GRANT].hex
    assert list(records[0])[:3] == ["seq", "ts", "prev"]
    result = verify_chain(path)
    assert result.ok
    assert result.records == 5
    assert result.line is None


def test_an_edited_middle_record_is_named(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 7)
    log.close()
    lines = lines_of(path)
    lines[3] = lines[3].replace(b'"test_id":"t-3"', b'"test_id":"t-X"')
    path.write_bytes(b"".join(lines))
    result = verify_chain(path)
    assert not result.ok
    assert result.line == 4
    assert result.records == 3
    assert result.reason is not None
    assert "altered" in result.reason


def test_a_deleted_line_is_named(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 6)
    log.close()
    lines = lines_of(path)
    del lines[2]
    path.write_bytes(b"".join(lines))
    result = verify_chain(path)
    assert not result.ok
    assert result.line == 3
    assert result.reason == "seq 4 where 3 was expected: 1 record(s) removed"


def test_a_removed_first_line_and_a_replaced_start_are_detected(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 3)
    log.close()
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[1:]))
    assert verify_chain(path).line == 1
    first = json.loads(lines[0])
    first["prev"] = "1" * 64
    path.write_bytes(
        json.dumps(first, separators=(",", ":")).encode() + b"\n" + b"".join(lines[1:])
    )
    result = verify_chain(path)
    assert result.line == 1
    assert "64 zeros" in (result.reason or "")


def test_bad_json_and_a_torn_last_line_are_reported(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 3)
    log.close()
    whole = path.read_bytes()
    path.write_bytes(whole[:-20])  # crash in the middle of writing record 3
    torn = verify_chain(path)
    assert (torn.ok, torn.line, torn.records) == (False, 3, 2)
    assert "incomplete last line" in (torn.reason or "")
    lines = lines_of(tmp_path / AUDIT_FILE_NAME)
    path.write_bytes(whole.replace(lines[1], b"{not json\n"))
    assert verify_chain(path).line == 2


def test_an_empty_log_verifies_and_a_missing_one_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_bytes(b"")
    assert verify_chain(tmp_path / "empty.jsonl").ok
    with pytest.raises(ReflectorError, match="cannot read audit log"):
        verify_chain(tmp_path / "missing.jsonl")


def test_reopening_continues_the_chain(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 3)
    log.close()
    again, _ = jsonl_log(tmp_path)
    emit_sessions(again, 2)
    again.close()
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 2, 3, 4, 5]
    assert verify_chain(path).records == 5


def test_reopening_after_a_crash_mid_write_drops_only_the_torn_fragment(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 3)
    log.close()
    path.write_bytes(path.read_bytes()[:-20])
    with caplog.at_level(logging.WARNING):
        again, _ = jsonl_log(tmp_path)
    assert "incomplete last line" in caplog.text
    emit_sessions(again, 1)
    again.close()
    assert [json.loads(line)["seq"] for line in lines_of(path)] == [1, 2, 3]
    assert verify_chain(path).ok


def test_reopening_a_log_longer_than_the_tail_window_finds_its_end(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    for n in range(80):  # about 1.3 KiB each: the file outgrows the 64 KiB tail window
        log.emit(EventKind.ACCOUNTING, peer_id=PEER_A, params={"n": n, "pad": "p" * 1200})
    log.close()
    assert path.stat().st_size > 2 * (32 * 1024 + 1)
    path.write_bytes(path.read_bytes()[:-7])  # and crashed mid-write
    again, _ = jsonl_log(tmp_path)
    emit_sessions(again, 1)
    again.close()
    assert verify_chain(path).records == 80
    assert json.loads(lines_of(path)[-1])["seq"] == 80


def test_an_overlong_line_is_reported_without_reading_it_whole(tmp_path: Path) -> None:
    log, path = jsonl_log(tmp_path)
    emit_sessions(log, 1)
    log.close()
    with path.open("ab") as stream:
        stream.write(b"x" * 100_000 + b"\n")
    result = verify_chain(path)
    assert (result.line, result.records) == (2, 1)
    assert "longer than" in (result.reason or "")


def test_reopening_refuses_a_log_whose_last_line_is_not_a_record(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE_NAME
    path.write_bytes(b"hello\n")
    with pytest.raises(ReflectorError, match="last line is not an audit record"):
        JsonlSink(path)


def test_two_writers_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE_NAME
    server = AuditLog([JsonlSink(path)], ENDPOINT, clock=ticking_clock())
    cli = AuditLog([JsonlSink(path)], ENDPOINT, clock=ticking_clock())
    for _ in range(3):
        server.emit(EventKind.CONNECTION_ACCEPT, peer_id=PEER_A)
        cli.emit(EventKind.PAIRING_OPEN, reason="operator ran reflector pair")
    server.close()
    cli.close()
    result = verify_chain(path)
    assert (result.ok, result.records) == (True, 6)


def test_an_existing_file_is_tightened_to_owner_only(tmp_path: Path) -> None:
    path = tmp_path / AUDIT_FILE_NAME
    path.write_bytes(b"")
    path.chmod(0o644)
    JsonlSink(path).close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_symlink_is_never_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_bytes(b"")
    (tmp_path / AUDIT_FILE_NAME).symlink_to(target)
    with pytest.raises(ReflectorError, match="cannot open audit log"):
        JsonlSink(tmp_path / AUDIT_FILE_NAME)


# --- fail-safe emit and sink selection -------------------------------------------------------


class BrokenSink:
    """A sink whose storage is gone: every write fails as a full disk would."""

    name = "broken"

    def __init__(self) -> None:
        self.healthy = False

    def write(self, event: AuditEvent) -> None:
        if not self.healthy:
            raise OSError(28, "No space left on device")

    def close(self) -> None:
        pass


def test_a_failing_sink_never_raises_and_is_reported_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = BrokenSink()
    path = tmp_path / AUDIT_FILE_NAME
    log = AuditLog([broken, JsonlSink(path)], ENDPOINT, clock=ticking_clock())
    with caplog.at_level(logging.WARNING, logger="reflector.audit"):
        emit_sessions(log, 3)
        assert log.failures == {"broken": 3}
        broken.healthy = True
        emit_sessions(log, 1)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert "audit sink broken failed" in errors[0].getMessage()
    assert "works again after 3 failed writes" in caplog.text
    assert log.failures == {}
    assert verify_chain(path).records == 4  # the healthy sink kept everything


@pytest.mark.skipif(Path("/run/systemd/journal/socket").exists(), reason="journald is running")
def test_journal_sink_without_journald_fails_safe(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    log = AuditLog([JournalSink()], ENDPOINT, clock=ticking_clock())
    with caplog.at_level(logging.ERROR, logger="reflector.audit"):
        event = log.emit(EventKind.SERVICE_START)
    assert event.kind is EventKind.SERVICE_START
    assert log.failures == {"journald": 1}
    assert "audit sink journald failed" in caplog.text


def test_open_audit_log_picks_sinks(tmp_path: Path) -> None:
    absent = tmp_path / "no-journal-socket"
    log = open_audit_log(tmp_path, ENDPOINT, "auto", False, journal_socket=absent)
    assert [s.name for s in log.sinks] == ["jsonl"]  # without journald the file is always used
    log.close()
    log = open_audit_log(tmp_path, ENDPOINT, "off", False, journal_socket=absent)
    assert [s.name for s in log.sinks] == ["jsonl"]
    log.close()
    with pytest.raises(ConfigError, match="journald is not running"):
        open_audit_log(tmp_path, ENDPOINT, "on", True, journal_socket=absent)
    with pytest.raises(ConfigError, match="auto, on or off"):
        open_audit_log(tmp_path, ENDPOINT, "yes", True)  # type: ignore[arg-type]


def test_open_audit_log_uses_journald_when_its_socket_exists(tmp_path: Path) -> None:
    sock_path = tmp_path / "socket"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        both = open_audit_log(tmp_path, ENDPOINT, "auto", True, journal_socket=sock_path)
        only = open_audit_log(tmp_path, ENDPOINT, "auto", False, journal_socket=sock_path)
    assert [s.name for s in both.sinks] == ["journald", "jsonl"]
    assert [s.name for s in only.sinks] == ["journald"]
    both.close()
    only.close()


def test_open_audit_log_in_a_missing_directory_is_an_operator_error(tmp_path: Path) -> None:
    with pytest.raises(ReflectorError, match="cannot open audit log"):
        open_audit_log(tmp_path / "nope", ENDPOINT, "off", True)


# --- queries and export ----------------------------------------------------------------------


@pytest.fixture
def mixed_log(tmp_path: Path) -> Path:
    """Six events a minute apart: grants and denies for two peers, and a service start."""
    path = tmp_path / AUDIT_FILE_NAME
    log = AuditLog([JsonlSink(path)], ENDPOINT, clock=ticking_clock(timedelta(minutes=1)))
    log.emit(EventKind.SERVICE_START)
    log.emit(EventKind.SESSION_GRANT, peer_id=PEER_A, test_type="udp_echo", test_id="a1")
    log.emit(EventKind.SESSION_DENY, peer_id=PEER_B, reason='=HYPERLINK("x")')
    log.emit(EventKind.ENGINE_EXIT, peer_id=PEER_A, test_id="a1", pid=77, exit_code=-9)
    log.emit(EventKind.SESSION_GRANT, peer_id=PEER_B, test_type="throughput", params={"s": 4})
    log.emit(EventKind.ACCOUNTING, peer_id=PEER_A, bytes_rx=10, bytes_tx=20, runtime_ms=1500)
    log.close()
    return path


def test_read_jsonl_filters_by_time_peer_and_kind(mixed_log: Path) -> None:
    def seqs(**filters: object) -> list[int]:
        return [r["seq"] for r in read_jsonl(mixed_log, **filters)]  # type: ignore[arg-type]

    assert seqs() == [1, 2, 3, 4, 5, 6]
    assert seqs(peer=PEER_A) == [2, 4, 6]
    assert seqs(peer=PEER_A.lower().replace("-", " ")) == [2, 4, 6]  # typed loosely
    assert seqs(kind="session_grant") == [2, 5]
    assert seqs(kind=EventKind.SESSION_GRANT, peer=PEER_B) == [5]
    # since inclusive, until exclusive
    assert seqs(since=START + timedelta(minutes=1), until=START + timedelta(minutes=3)) == [2, 3]
    assert seqs(since=START + timedelta(minutes=10)) == []
    with pytest.raises(ConfigError, match="unknown audit event 'grant'"):
        seqs(kind="grant")


def test_read_jsonl_skips_damaged_lines_and_says_so(
    mixed_log: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lines = lines_of(mixed_log)
    lines[1] = b"garbage\n"
    mixed_log.write_bytes(b"".join(lines)[:-5])
    with caplog.at_level(logging.WARNING):
        got = [r["seq"] for r in read_jsonl(mixed_log)]
    assert got == [1, 3, 4, 5]
    assert "line 2 is not a record" in caplog.text
    assert "line 6 is not a record" in caplog.text


def test_csv_export_has_fixed_columns_and_defuses_formulas(mixed_log: Path) -> None:
    text = "".join(format_records(read_jsonl(mixed_log), "csv"))
    rows = list(csv.DictReader(io.StringIO(text)))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 6
    assert rows[2]["reason"] == '\'=HYPERLINK("x")'
    assert rows[3]["exit_code"] == "-9"  # numbers are not mangled
    assert rows[4]["params"] == '{"s":4}'
    assert rows[5]["bytes_tx"] == "20"
    assert rows[0]["peer_id"] == ""


def test_jsonl_export_round_trips_the_records(mixed_log: Path) -> None:
    records = list(read_jsonl(mixed_log, peer=PEER_B))
    lines = list(format_records(records, "jsonl"))
    assert all(line.endswith("\n") and line.count("\n") == 1 for line in lines)
    assert [json.loads(line) for line in lines] == records
    with pytest.raises(ConfigError, match="unknown export format 'xml'"):
        format_records(records, "xml")


# --- journald shape --------------------------------------------------------------------------


def as_journal_entry(event: AuditEvent) -> dict[str, object]:
    """What systemd.journal.Reader returns for this event: its real converters applied to the
    fields JournalSink sends, plus the journal's own timestamp."""
    from systemd import journal

    raw = {
        "MESSAGE": event.message.encode(),
        "MESSAGE_ID": event.message_id.hex.encode(),
        "PRIORITY": str(priority(event.kind)).encode(),
        "SYSLOG_IDENTIFIER": b"reflector",
        **{k: v.encode() for k, v in journal_fields(event).items()},
    }
    converted: dict[str, object] = {
        k: journal.DEFAULT_CONVERTERS.get(k, bytes.decode)(v) for k, v in raw.items()
    }
    converted["__REALTIME_TIMESTAMP"] = event.ts.astimezone()  # Reader gives local time
    return converted


def test_journal_fields_are_upper_case_text() -> None:
    event = AuditEvent(
        kind=EventKind.ENGINE_EXIT,
        ts=START,
        endpoint_id=ENDPOINT,
        peer_id=PEER_A,
        pid=123,
        exit_code=0,
        params={"b": 1, "a": "x"},
    )
    assert journal_fields(event) == {
        "REFLECTOR_EVENT": "engine_exit",
        "ENDPOINT_ID": ENDPOINT,
        "PEER_ID": PEER_A,
        "PARAMS": '{"a":"x","b":1}',
        "PID": "123",
        "EXIT_CODE": "0",
    }


def test_a_journal_entry_normalizes_to_the_jsonl_record_shape() -> None:
    event = AuditEvent(
        kind=EventKind.SESSION_DENY,
        ts=START,
        endpoint_id=ENDPOINT,
        peer_id=PEER_A,
        test_type="throughput",
        params={"duration": 30, "token": "s3cret"},
        reason="quota exceeded",
        source_addr="[2001:db8::7]:40000",
        bytes_rx=0,
        runtime_ms=12,
    )
    assert normalize_journal_entry(as_journal_entry(event)) == to_record(event)


def test_forged_or_foreign_journal_entries_do_not_break_normalization() -> None:
    assert normalize_journal_entry({"MESSAGE": "ordinary log line"}) is None
    entry = as_journal_entry(
        AuditEvent(kind=EventKind.ACCOUNTING, ts=START, endpoint_id=ENDPOINT, bytes_rx=5)
    )
    entry["BYTES_RX"] = "lots"
    entry["PARAMS"] = "{not json"
    entry["PEER_ID"] = [PEER_A, PEER_B]
    record = normalize_journal_entry(entry)
    assert record is not None
    assert "bytes_rx" not in record
    assert "params" not in record
    assert "peer_id" not in record
    assert record["reflector_event"] == "accounting"


def test_jsonl_sink_leaves_no_stray_descriptors(tmp_path: Path) -> None:
    gc.collect()  # so an earlier test's unreferenced socket is not finalized mid-count
    before = len(os.listdir("/proc/self/fd"))
    log, _ = jsonl_log(tmp_path)
    emit_sessions(log, 2)
    log.close()
    assert len(os.listdir("/proc/self/fd")) == before
