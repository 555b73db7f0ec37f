"""JournalSink and read_journal against a real journald, inside a booted systemd container.

The emitting and reading run *inside* the container, with the repository's venv Python (the
container is an overlay of this machine, so the venv and the editable install are there), and
are counted from outside with journalctl, which is the independent witness.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path

import pytest

from reflector.audit import MESSAGE_IDS, EventKind
from reflector.endpoint_id import endpoint_id_from_public_key

from .harness import REPO_ROOT, SystemdHost

pytestmark = pytest.mark.system

PYTHON = str(REPO_ROOT / ".venv" / "bin" / "python")
# The burst size the brief asks for: well above one journald socket buffer's worth of
# datagrams, well below journald's default rate limit (10,000 per 30 s).
BURST = 1000
# journald writes entries to its files as it receives them; a few seconds absorbs a loaded CI.
JOURNAL_WAIT_S = 20.0

EMIT = """
import json, sys
from reflector.audit import AuditLog, EventKind, JournalSink
from reflector.audit.events import to_record

endpoint, peer, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
secret = sys.stdin.read().strip()  # not in argv: journald records each sender's command line
log = AuditLog([JournalSink()], endpoint)
for n in range(count):
    event = log.emit(
        EventKind.SESSION_GRANT,
        peer_id=peer,
        test_id=f"t-{n}",
        test_type="udp_echo",
        params={"duration": 10, "token": secret},
        source_addr="[2001:db8::7]:40000",
        bytes_rx=n,
    )
    print(json.dumps(to_record(event)))
if log.failures:
    sys.exit(f"sink failures: {log.failures}")
"""

READ = """
import json, sys
from datetime import datetime
from reflector.audit import read_journal

peer, kind = sys.argv[1], sys.argv[2]
since = datetime.fromisoformat(sys.argv[3]) if len(sys.argv) > 3 else None
for record in read_journal(since=since, peer=peer, kind=kind):
    print(json.dumps(record))
"""


def _json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.2)


def test_a_burst_of_audit_events_all_reach_journald_intact(systemd_host: SystemdHost) -> None:
    endpoint = endpoint_id_from_public_key(secrets.token_bytes(32))
    peer = endpoint_id_from_public_key(secrets.token_bytes(32))  # unique: counts only this run
    secret = f"secret-{secrets.token_hex(8)}"
    argv = [PYTHON, "-c", EMIT, endpoint, peer, str(BURST)]
    emitted = _json_lines(systemd_host.run(argv, timeout=120, input_text=secret).stdout)
    assert len(emitted) == BURST

    def journal_entries() -> list[dict[str, object]]:
        argv = ["journalctl", "REFLECTOR_EVENT=session_grant", f"PEER_ID={peer}"]
        return _json_lines(systemd_host.run([*argv, "-o", "json", "--no-pager"]).stdout)

    _wait_for(lambda: len(journal_entries()) >= BURST, JOURNAL_WAIT_S, f"{BURST} entries")
    entries = journal_entries()
    assert len(entries) == BURST
    first = entries[0]
    assert first["MESSAGE_ID"] == MESSAGE_IDS[EventKind.SESSION_GRANT].hex
    assert first["SYSLOG_IDENTIFIER"] == "reflector"
    assert first["PRIORITY"] == "6"
    assert first["ENDPOINT_ID"] == endpoint
    assert first["DECISION"] == "grant"
    assert first["PARAMS"] == '{"duration":10,"token":"[redacted]"}'
    assert sorted(int(str(e["BYTES_RX"])) for e in entries) == list(range(BURST))
    assert not any(secret in json.dumps(e) for e in entries)

    read = _json_lines(
        systemd_host.run([PYTHON, "-c", READ, peer, "session_grant"], timeout=120).stdout
    )
    assert len(read) == BURST
    by_test = {r["test_id"]: r for r in read}
    for sent in emitted:
        got = by_test[sent["test_id"]]
        # Same shape and values as the jsonl record; only the clock differs (journald stamps
        # the entry when it receives it).
        assert {k: v for k, v in got.items() if k != "ts"} == {
            k: v for k, v in sent.items() if k != "ts"
        }
    journal_ts = {str(e["TEST_ID"]): int(str(e["__REALTIME_TIMESTAMP"])) for e in entries}
    for record in read:
        stamped = journal_ts[str(record["test_id"])]
        assert _ts_to_usec(str(record["ts"])) == stamped


def test_read_journal_seeks_to_since(systemd_host: SystemdHost) -> None:
    endpoint = endpoint_id_from_public_key(secrets.token_bytes(32))
    peer = endpoint_id_from_public_key(secrets.token_bytes(32))
    systemd_host.run([PYTHON, "-c", EMIT, endpoint, peer, "5"], input_text="s")
    time.sleep(1.0)  # a clear gap in journald's own timestamps
    systemd_host.run([PYTHON, "-c", EMIT, endpoint, peer, "3"], input_text="s")

    def read(*since: str) -> list[dict[str, object]]:
        argv = [PYTHON, "-c", READ, peer, "session_grant", *since]
        return _json_lines(systemd_host.run(argv).stdout)

    _wait_for(lambda: len(read()) >= 8, JOURNAL_WAIT_S, "8 entries")
    everything = read()
    assert len(everything) == 8
    later = read(str(everything[5]["ts"]))
    assert [r["bytes_rx"] for r in later] == [0, 1, 2]
    assert read(str(everything[7]["ts"]).replace("Z", "+00:00"))[0] == everything[7]


def _ts_to_usec(text: str) -> int:
    when = datetime.fromisoformat(text)
    return int(when.timestamp()) * 1_000_000 + when.microsecond


def test_the_container_has_the_repository(systemd_host: SystemdHost) -> None:
    """Guard for the two tests above: they rely on the venv being visible inside."""
    assert Path(systemd_host.path(PYTHON)).exists()
