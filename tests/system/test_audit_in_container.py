"""The audit trail as support reads it, on a real systemd host (spec §8.3, §1.1).

`reflector serve` runs as a Type=notify service under its own user in a booted container; an
appliance runs a test; the events are then found with `journalctl REFLECTOR_EVENT=... -o json`
and with `reflector audit export`, field for field, and none is lost in a burst of 1,000
requests.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from .harness import SystemdHost, install_package

pytestmark = [pytest.mark.system, pytest.mark.slow]

VENV = "/opt/reflector"
REFLECTOR = f"{VENV}/bin/reflector"
UNIT = "reflector-under-test"
CONFIG = "/etc/reflector/reflector.toml"
STATE = "/var/lib/reflector"
APP = "/root/appliance"
BURST = 1000

BURST_SCRIPT = """
import asyncio, sys
from pathlib import Path
from reflector.client.link_client import ApplianceIdentity, LinkClient
from reflector.link.messages import SessionRequest, UdpEchoParams
from reflector.link.connection import MAX_IN_FLIGHT

async def main():
    app = ApplianceIdentity.open(Path(sys.argv[1]))
    client = await LinkClient.connect(("127.0.0.1", 4000), app, sys.argv[2])
    answers = {}
    async def one():
        r = await client.request(SessionRequest(test_type="udp_echo",
                                                params=UdpEchoParams(duration_sec=1)))
        answers[r.TYPE + ":" + getattr(r, "code", "")] = answers.get(
            r.TYPE + ":" + getattr(r, "code", ""), 0) + 1
    for start in range(0, int(sys.argv[3]), MAX_IN_FLIGHT):
        n = min(MAX_IN_FLIGHT, int(sys.argv[3]) - start)
        await asyncio.gather(*(one() for _ in range(n)))
    await client.close()
    print(answers)

asyncio.run(main())
"""


@dataclass(frozen=True)
class Endpoint:
    host: SystemdHost
    endpoint_id: str
    appliance_id: str


@pytest.fixture(scope="module")
def endpoint(systemd_host_module: SystemdHost) -> Iterator[Endpoint]:
    host = systemd_host_module
    install_package(host, VENV)
    host.run(
        ["useradd", "--system", "--shell", "/usr/sbin/nologin", "--no-create-home", "reflector"]
    )
    appliance_id = host.run([REFLECTOR, "client", "id", "--state-dir", APP]).stdout.strip()
    host.write_file(
        CONFIG,
        '[network]\nlisten_address = ["127.0.0.1:4000"]\n'
        f'[access]\nauthorized_peers = ["{appliance_id}"]\n'
        '[audit]\njournald = "on"\njsonl = true\n'
        "[quotas]\nmax_tests_per_hour_per_peer = 3\n",
        mode=0o644,
    )
    host.run(
        [
            "systemd-run",
            f"--unit={UNIT}",
            "--property=Type=notify",
            "--property=User=reflector",
            "--property=StateDirectory=reflector",
            "--property=StateDirectoryMode=0700",
            "--property=WatchdogSec=10s",
            REFLECTOR,
            "serve",
            "--config",
            CONFIG,
            "--state-dir",
            STATE,
        ]
    )
    endpoint_id = host.run([REFLECTOR, "id", "--state-dir", STATE]).stdout.strip()
    yield Endpoint(host=host, endpoint_id=endpoint_id, appliance_id=appliance_id)
    host.run(["systemctl", "stop", UNIT], check=False)


def journal_events(host: SystemdHost, kind: str) -> list[dict[str, str]]:
    """The journal's records of one event kind, once journald has stored all it received."""
    host.run(["journalctl", "--sync"])
    out = host.run(["journalctl", f"REFLECTOR_EVENT={kind}", "-o", "json", "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_the_service_is_ready_and_says_who_it_is(endpoint: Endpoint) -> None:
    show = endpoint.host.run(
        ["systemctl", "show", UNIT, "-p", "ActiveState,StatusText,User"]
    ).stdout
    assert "ActiveState=active" in show
    assert f"StatusText=Endpoint {endpoint.endpoint_id}, 0 active sessions" in show
    starts = journal_events(endpoint.host, "service_start")
    assert starts and starts[-1]["ENDPOINT_ID"] == endpoint.endpoint_id


def test_a_grant_is_in_journald_and_in_the_export_field_for_field(endpoint: Endpoint) -> None:
    host = endpoint.host
    out = host.run(
        [
            REFLECTOR,
            "client",
            "latency",
            "-e",
            "127.0.0.1:4000",
            "--expect-id",
            endpoint.endpoint_id,
            "--state-dir",
            APP,
            "-t",
            "1",
            "--json",
        ],
        timeout=60,
    ).stdout
    session_id = json.loads(out)["session_id"]
    grants = [e for e in journal_events(host, "session_grant") if e["TEST_ID"] == session_id]
    assert len(grants) == 1
    entry = grants[0]
    assert entry["PEER_ID"] == endpoint.appliance_id
    assert entry["ENDPOINT_ID"] == endpoint.endpoint_id
    assert entry["TEST_TYPE"] == "udp_echo"
    assert entry["DECISION"] == "grant"
    assert entry["SYSLOG_IDENTIFIER"] == "reflector"
    assert len(entry["MESSAGE_ID"]) == 32
    exported = host.run(
        [
            REFLECTOR,
            "audit",
            "export",
            "--event",
            "session_grant",
            "--format",
            "jsonl",
            "--source",
            "journal",
            "--peer",
            endpoint.appliance_id,
            "--config",
            CONFIG,
            "--state-dir",
            STATE,
        ]
    ).stdout
    records = [json.loads(line) for line in exported.splitlines() if line.strip()]
    mine = [r for r in records if r["test_id"] == session_id]
    assert len(mine) == 1
    record = mine[0]
    # Field for field: every value the export gives is the journal's own (journald stores
    # text, params as compact JSON). Only the timestamp is journald's, in its own field.
    compared = []
    for key, value in record.items():
        if key == "ts" or value is None:
            continue
        field = key.upper()
        assert field in entry, f"{field} is exported but not in the journal entry"
        if key == "params":
            assert json.loads(entry[field]) == value, key
        else:
            assert entry[field] == str(value), (key, entry[field], value)
        compared.append(key)
    assert {"peer_id", "endpoint_id", "test_id", "test_type", "decision", "params"} <= set(
        compared
    ), compared
    # The same event is in the hash-chained file, and the chain verifies.
    file_records = host.run(
        [
            REFLECTOR,
            "audit",
            "export",
            "--event",
            "session_grant",
            "--source",
            "file",
            "--config",
            CONFIG,
            "--state-dir",
            STATE,
        ]
    ).stdout
    assert session_id in file_records
    verify = host.run([REFLECTOR, "audit", "verify", "--config", CONFIG, "--state-dir", STATE])
    assert ": ok," in verify.stdout
    closes = [e for e in journal_events(host, "accounting") if e["TEST_ID"] == session_id]
    assert int(closes[0]["BYTES_RX"]) > 0


def test_no_event_is_lost_in_a_burst_of_1000_requests(endpoint: Endpoint) -> None:
    host = endpoint.host
    before = len(journal_events(host, "session_grant")) + len(journal_events(host, "session_deny"))
    host.write_file("/root/burst.py", BURST_SCRIPT, mode=0o600)
    out = host.run(
        [f"{VENV}/bin/python", "/root/burst.py", APP, endpoint.endpoint_id, str(BURST)],
        timeout=120,
    ).stdout
    answers = eval(out.strip().splitlines()[-1])
    assert sum(answers.values()) == BURST
    host.run(["journalctl", "--sync"])
    after = len(journal_events(host, "session_grant")) + len(journal_events(host, "session_deny"))
    assert after - before == BURST
