"""Faults under a running test: nothing is left open and nothing is lost (issue 8, "Faults").

One booted container plays the endpoint host (faults_support.py): the parent as a Type=notify
unit under `reflector`, the socket-activated root helper, engines in transient scopes under
`reflector-engine`, direct mode with Reflector's nftables holes. Each test breaks one thing
while an appliance (a driver script inside the container) has a session, then checks what the
operator would: the engine's scope, the hole set, the parent's unit, the quota the service
reports, the ledger and the hash-chained audit file.

The wall-clock jump is tested on an endpoint in a child process whose `time.time` is shifted
on command, because the container shares this machine's clock, which must never be changed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reflector.client.link_client import ApplianceIdentity, LinkClient, RemoteError
from reflector.link.messages import (
    GetStatus,
    SessionGrant,
    SessionRequest,
    StatusSnapshot,
    UdpEchoParams,
)
from reflector.sessions.manager import SETUP_SLACK_SEC

from .faults_support import (
    DATA_PORT,
    PARENT_UNIT,
    RUNTIME_GRACE_S,
    STATE,
    Endpoint,
    audit_records,
    await_true,
    prepare_endpoint_host,
)
from .harness import REPO_ROOT, SystemdHost, stop_process

pytestmark = [pytest.mark.system, pytest.mark.slow]

# Long enough to strike while iperf3's data flows, short enough for the module's time budget.
TEST_S = 6
# The engine's scope lives at most RuntimeMaxSec= = duration + limits.runtime_grace_sec.
RUNTIME_MAX_S = TEST_S + RUNTIME_GRACE_S
# systemd stops a scope within a second of RuntimeMaxSec=; a loaded CI machine adds a little.
SCOPE_SLACK_S = 3.0
# A grant, a scope and a listening iperf3 take about 1 s; 30 s means something hangs.
GRANT_TIMEOUT_S = 30.0
# The driver's iperf3 client gives up at duration + its own grace; then close and result.
DRIVER_TIMEOUT_S = TEST_S + 30.0
# Codes a throughput result carries when the engine did not finish its test.
ENGINE_FAILURE_CODES = {"iperf3_failed", "iperf3_timeout", "iperf3_bad_output"}


@pytest.fixture(scope="module")
def prepared(systemd_host_module: SystemdHost) -> Iterator[Endpoint]:
    endpoint = prepare_endpoint_host(systemd_host_module)
    yield endpoint
    endpoint.stop_parent()


@pytest.fixture
def endpoint(prepared: Endpoint) -> Endpoint:
    """The prepared host with a freshly started parent and helper (no leftovers of a test)."""
    prepared.fresh()
    return prepared


def session_events(endpoint: Endpoint, session_id: str) -> list[str]:
    return [
        r["reflector_event"] for r in audit_records(endpoint.host) if r.get("test_id") == session_id
    ]


def test_iperf3_killed_mid_test_ends_the_session_with_an_error_and_frees_the_port(
    endpoint: Endpoint,
) -> None:
    host = endpoint.host
    driver = endpoint.throughput(TEST_S)
    try:
        grant = driver.next_step(GRANT_TIMEOUT_S)
        assert grant["step"] == "grant", grant
        session_id = grant["session_id"]
        assert grant["ports"]["data"] == DATA_PORT
        await_true(lambda: endpoint.scope_active(session_id), timeout=5, what="engine scope")
        time.sleep(1.5)  # data flows
        killed = host.run(["pkill", "-9", "-u", "reflector-engine", "-x", "iperf3"], check=False)
        assert killed.returncode == 0, "no iperf3 of the engine user was running"
        done = driver.next_step(DRIVER_TIMEOUT_S)
        assert done["step"] == "iperf_done"
        result = driver.next_step(DRIVER_TIMEOUT_S)
        driver.wait(10)
    finally:
        driver.stop()
    # The appliance gets the session's result, and it is a typed engine failure.
    assert result["step"] == "result", result
    assert result["result"]["error"]["code"] in ENGINE_FAILURE_CODES, result
    # Ended by the failed engine itself or by the appliance's close, whichever came first
    # (test_dataplane_loopback shows the engine's side without an appliance racing it).
    assert result["result"]["outcome"] in ("failed", "closed")
    assert not endpoint.scope_active(session_id)
    assert endpoint.holes() == []
    events = session_events(endpoint, session_id)
    for kind in ("session_grant", "engine_start", "engine_exit", "session_close", "accounting"):
        assert kind in events, f"{kind} missing from the audit of {session_id}: {events}"
    (exit_record,) = [
        r for r in audit_records(host, "engine_exit") if r.get("test_id") == session_id
    ]
    assert exit_record["exit_code"] != 0, exit_record
    row = endpoint.ledger_row(session_id)
    assert row is not None and row["outcome"] == result["result"]["outcome"], row
    # The one data port came free: the next session is granted.
    assert [o["code"] for o in endpoint.requests(1)] == ["grant"]
    assert endpoint.unit_state(PARENT_UNIT) == "active"


def test_the_helper_killed_mid_session_leaves_no_engine_and_the_parent_carries_on(
    endpoint: Endpoint,
) -> None:
    driver = endpoint.throughput(TEST_S)
    try:
        grant = driver.next_step(GRANT_TIMEOUT_S)
        assert grant["step"] == "grant", grant
        session_id = grant["session_id"]
        await_true(lambda: endpoint.scope_active(session_id), timeout=5, what="engine scope")
        scope_started = time.monotonic()
        time.sleep(1.0)
        endpoint.crash("reflector-privd.service")
        # The socket stays: the next request (or Restart=on-failure) starts a new helper.
        assert endpoint.unit_state("reflector-privd.socket") == "active"
        await_true(
            lambda: not endpoint.scope_active(session_id),
            timeout=RUNTIME_MAX_S + SCOPE_SLACK_S,
            what="the orphaned engine scope ending",
        )
        gone_after = time.monotonic() - scope_started
        steps = [driver.next_step(DRIVER_TIMEOUT_S), driver.next_step(DRIVER_TIMEOUT_S)]
        driver.wait(10)
    finally:
        driver.stop()
    print(f"\nscope gone {gone_after:.1f} s after it started (RuntimeMaxSec={RUNTIME_MAX_S})")
    assert gone_after <= RUNTIME_MAX_S + SCOPE_SLACK_S
    # The parent closed the session although the helper that started its engine is gone.
    assert [s["step"] for s in steps] == ["iperf_done", "result"], steps
    assert steps[1].get("close_error") is None, steps[1]
    assert steps[1]["result"]["outcome"] == "closed", steps[1]
    assert endpoint.unit_state(PARENT_UNIT) == "active"
    events = session_events(endpoint, session_id)
    for kind in ("engine_exit", "session_close", "accounting"):
        assert kind in events, f"{kind} missing from the audit of {session_id}: {events}"
    assert endpoint.ledger_row(session_id)["outcome"] == "closed"  # type: ignore[index]
    # A new helper, started by its socket, serves the next session: engine and hole.
    assert [o["code"] for o in endpoint.requests(1)] == ["grant"]
    assert endpoint.holes() == []
    log = endpoint.parent_log()
    assert "Traceback" not in log, log[-3000:]


def charged_bytes(endpoint: Endpoint, session_id: str) -> int | None:
    """What the ledger charges the session so far; None while nothing is."""
    row = endpoint.ledger_row(session_id)
    total = int(row["bytes_rx"]) + int(row["bytes_tx"]) if row else 0
    return total or None


def test_kill_9_of_the_parent_leaves_no_engine_no_hole_and_keeps_quota_bytes_and_audit(
    endpoint: Endpoint,
) -> None:
    # Long enough for a byte checkpoint (every 5 s: the hole's counters, read via the helper)
    # before the crash, with iperf3 still running.
    test_s = 12
    used_before = endpoint.tests_used_this_hour()
    driver = endpoint.throughput(test_s)
    try:
        grant = driver.next_step(GRANT_TIMEOUT_S)
        assert grant["step"] == "grant", grant
        granted = time.monotonic()
        session_id = grant["session_id"]
        await_true(lambda: endpoint.scope_active(session_id), timeout=5, what="engine scope")
        holes = await_true(endpoint.holes, timeout=5, what="the session's hole")
        assert len(holes) == 1 and "127.0.0.1" in holes[0] and str(DATA_PORT) in holes[0], holes
        charged = await_true(
            lambda: charged_bytes(endpoint, session_id), timeout=9, what="a byte checkpoint"
        )
        assert endpoint.scope_active(session_id), "the crash must strike while iperf3 runs"
        endpoint.crash(PARENT_UNIT)
        await_true(
            lambda: endpoint.unit_state(PARENT_UNIT) in ("failed", "inactive"),
            timeout=10,
            what="the parent's death",
        )
        await_true(
            lambda: not endpoint.scope_active(session_id),
            timeout=test_s + RUNTIME_GRACE_S + SCOPE_SLACK_S,
            what="the engine scope ending",
        )
        scope_gone = time.monotonic() - granted
        # The hole's kernel timeout is the session's lifetime plus a grace (firewall.hole_ttl_s).
        await_true(lambda: not endpoint.holes(), timeout=test_s + 15 + 5 + 5, what="hole expiry")
        hole_gone = time.monotonic() - granted
        driver.wait(DRIVER_TIMEOUT_S)
    finally:
        driver.stop()
    print(f"\nafter the grant: scope gone at {scope_gone:.1f} s, hole gone at {hole_gone:.1f} s")
    assert scope_gone <= test_s + RUNTIME_GRACE_S + SCOPE_SLACK_S
    endpoint.start_parent()
    # The interrupted test still counts: the ledger kept it and the new process closed it,
    # with the bytes charged up to the last checkpoint before the crash.
    assert endpoint.tests_used_this_hour() == used_before + 1
    row = endpoint.ledger_row(session_id)
    assert row is not None and row["outcome"] == "interrupted", row
    assert row["bytes_rx"] + row["bytes_tx"] >= charged > 0, row
    verify = endpoint.audit_verify()
    assert verify.returncode == 0 and ": ok," in verify.stdout, verify.stdout + verify.stderr
    assert "session_grant" in session_events(endpoint, session_id)
    # Nothing of the dead parent's session blocks the next one: not the port, not the hole
    # (gone from the kernel by now), not the helper's record of it.
    outcomes = endpoint.requests(1)
    assert [o["code"] for o in outcomes] == ["grant"], outcomes


# The tmpfs over the state dir: room for the identity, the peers, the ledger and the audit file
# of this module's earlier tests, then filled up to the last block.
STATE_TMPFS_SIZE = "4m"


def test_a_full_state_disk_refuses_sessions_clearly_and_corrupts_nothing(
    endpoint: Endpoint,
) -> None:
    host = endpoint.host
    endpoint.stop_parent()
    uid = host.run(["id", "-u", "reflector"]).stdout.strip()
    host.run(["cp", "-a", f"{STATE}/.", "/root/state-before-disk-full"])
    options = f"size={STATE_TMPFS_SIZE},mode=0700,uid={uid},gid={uid}"
    host.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", STATE])
    try:
        host.run(["cp", "-a", "/root/state-before-disk-full/.", f"{STATE}/"])
        endpoint.start_parent()
        assert [o["code"] for o in endpoint.requests(1)] == ["grant"]
        records_before = len(audit_records(host))
        # A test is running when the disk fills up; it ends while the disk is full.
        driver = endpoint.throughput(TEST_S)
        try:
            grant = driver.next_step(GRANT_TIMEOUT_S)
            assert grant["step"] == "grant", grant
            session_id = grant["session_id"]
            fill = host.run(["dd", "if=/dev/zero", f"of={STATE}/filler", "bs=4k"], check=False)
            assert "No space left on device" in fill.stderr, fill.stderr
            steps = [driver.next_step(DRIVER_TIMEOUT_S), driver.next_step(DRIVER_TIMEOUT_S)]
            driver.wait(10)
        finally:
            driver.stop()
        print(f"\nthe session that ended on a full disk: {steps}")
        outcomes = endpoint.requests(3)
        print(f"new requests on a full disk: {outcomes}")
        # Its engine and hole are gone: nothing stays open because a record could not be kept.
        assert steps[1].get("close_error") is None, f"closing on a full disk failed: {steps[1]}"
        assert not endpoint.scope_active(session_id)
        assert endpoint.holes() == [], "the session's hole outlived its close"
        assert endpoint.unit_state(PARENT_UNIT) == "active"
        host.run(["rm", f"{STATE}/filler"])
        # Space is back: nothing is corrupt, and every grant made meanwhile was recorded.
        assert endpoint.integrity_check() == "ok"
        verify = endpoint.audit_verify()
        assert verify.returncode == 0 and ": ok," in verify.stdout, verify.stdout + verify.stderr
        # While full, a session is either granted *and* recorded, or refused as
        # state_unavailable with a message that says why; nothing else. (sqlite may still fit a
        # row into pages it already has, so not every request must fail.)
        for outcome in outcomes:
            if outcome["code"] == "grant":
                assert endpoint.ledger_row(outcome["session_id"]) is not None, outcome
            else:
                assert outcome["code"] == "state_unavailable", outcome
                assert "storage" in outcome["message"] or "usage" in outcome["message"], outcome
        audited = audit_records(host)[records_before:]
        print(f"audit records written while full: {[r['reflector_event'] for r in audited]}")
        assert [o["code"] for o in endpoint.requests(1)] == ["grant"]
    finally:
        endpoint.stop_parent()
        host.run(["umount", STATE], check=False)
        host.run(["rm", "-rf", "/root/state-before-disk-full"], check=False)


# Requests made in each phase without journald; each is one session_grant or session_deny.
REQUESTS_PER_PHASE = 5
JOURNALD_UNITS = (
    "systemd-journald.socket",
    "systemd-journald-dev-log.socket",
    "systemd-journald-audit.socket",
    "systemd-journald.service",
)
JOURNALD_SOCKET = "/run/systemd/journal/socket"


def session_decisions(host: SystemdHost) -> list[dict[str, object]]:
    return [
        r for r in audit_records(host) if r["reflector_event"] in ("session_grant", "session_deny")
    ]


def test_without_journald_every_event_reaches_the_audit_file(endpoint: Endpoint) -> None:
    host = endpoint.host
    before = len(session_decisions(host))
    host.run(["systemctl", "stop", *JOURNALD_UNITS])
    try:
        assert endpoint.unit_state("systemd-journald.service") == "inactive"
        # journald goes away under a running service: its sink fails, the file takes all.
        first = endpoint.requests(REQUESTS_PER_PHASE)
        # A service started without journald (audit.journald = "auto") uses the file alone.
        host.run(["rm", "-f", JOURNALD_SOCKET])
        endpoint.stop_parent()
        assert endpoint.unit_state("systemd-journald.service") == "inactive"
        assert not host.path(JOURNALD_SOCKET).exists()
        endpoint.start_parent()
        second = endpoint.requests(REQUESTS_PER_PHASE)
        assert endpoint.unit_state(PARENT_UNIT) == "active"
    finally:
        host.run(["systemctl", "start", *JOURNALD_UNITS], check=False)
    made = first + second
    assert [o["code"] for o in made] == ["grant"] * len(made), made
    decisions = session_decisions(host)[before:]
    granted = {str(o["session_id"]) for o in made}
    assert {str(r.get("test_id")) for r in decisions} == granted
    assert len(decisions) == len(made)
    closes = {r.get("test_id") for r in audit_records(host, "session_close")}
    assert granted <= closes
    verify = endpoint.audit_verify()
    assert verify.returncode == 0 and ": ok," in verify.stdout, verify.stdout + verify.stderr


# The endpoint for the clock test: `time.time` (the wall clock every part of Reflector reads)
# is shifted by the seconds written to stdin, one number a line; CLOCK_BOOTTIME and the event
# loop's monotonic clock are left alone, as in a real step of the system clock.
CLOCK_SERVER = r"""
import asyncio, json, sys, time
from pathlib import Path
_real_time, _offset = time.time, [0.0]
time.time = lambda: _real_time() + _offset[0]
from reflector.config import load_config
from reflector.server.run import start

async def main():
    running = await start(load_config(Path(sys.argv[1])), addresses=["127.0.0.1:0"])
    print(json.dumps({"port": running.addresses[0][1],
                      "endpoint_id": running.identity.endpoint_id}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        _offset[0] += float(line)
        print(json.dumps({"offset": _offset[0]}), flush=True)
    await running.stop()

asyncio.run(main())
"""
ECHO_S = 2
# The session's deadline is its duration plus the manager's setup slack, on CLOCK_BOOTTIME.
LIFETIME_S = ECHO_S + SETUP_SLACK_SEC
JUMP_S = 2 * 3600
# The expiry timer fires at the deadline; polling every POLL_S and a loaded machine add a bit.
EXPIRY_SLACK_S = 1.5
POLL_S = 0.25


class ClockServer:
    """The endpoint in a child process, and the pipe that steps its wall clock."""

    def __init__(self, config: Path, log: Path) -> None:
        self._log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CLOCK_SERVER, str(config)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
        self.ready = self._reply()

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, f"the endpoint exited ({self.proc.poll()})"
        doc: dict[str, Any] = json.loads(line)
        return doc

    def jump(self, seconds: float) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{seconds}\n")
        self.proc.stdin.flush()
        self._reply()

    def close(self) -> None:
        stop_process(self.proc)
        self._log.close()


async def own_sessions(client: LinkClient) -> StatusSnapshot:
    return await client.call(GetStatus(), StatusSnapshot)


async def refusal(client: LinkClient) -> str:
    try:
        await client.call(
            SessionRequest(test_type="udp_echo", params=UdpEchoParams(duration_sec=ECHO_S)),
            SessionGrant,
        )
    except RemoteError as exc:
        return exc.code
    return "grant"


async def clock_jump_scenario(server: ClockServer, appliance: ApplianceIdentity) -> dict[str, Any]:
    endpoint = ("127.0.0.1", int(server.ready["port"]))
    client = await LinkClient.connect(endpoint, appliance, str(server.ready["endpoint_id"]))
    seen: dict[str, Any] = {}
    try:
        grant = await client.call(
            SessionRequest(test_type="udp_echo", params=UdpEchoParams(duration_sec=ECHO_S)),
            SessionGrant,
        )
        granted = time.monotonic()
        server.jump(JUMP_S)  # forward: an hour-based window would reopen, a deadline pass
        seen["after_forward"] = (await own_sessions(client)).sessions
        seen["refusal_after_forward"] = await refusal(client)
        server.jump(-2 * JUMP_S)  # backward: a wall deadline would lie two hours ahead
        seen["after_backward"] = (await own_sessions(client)).sessions
        while (await own_sessions(client)).sessions:
            assert time.monotonic() - granted < LIFETIME_S + 10, "the session never expired"
            await asyncio.sleep(POLL_S)
        seen["ended_after_s"] = time.monotonic() - granted
        seen["refusal_after_expiry"] = await refusal(client)
        seen["quota"] = (await own_sessions(client)).quota
        seen["session_id"] = grant.session_id
    finally:
        await client.close()
    return seen


def test_a_wall_clock_jump_neither_moves_a_deadline_nor_reopens_the_hourly_quota(
    tmp_path: Path,
) -> None:
    appliance = ApplianceIdentity.open(tmp_path / "appliance")
    config = tmp_path / "reflector.toml"
    config.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[access]\nauthorized_peers = ["{appliance.identity.endpoint_id}"]\n'
        "[quotas]\nmax_tests_per_hour_per_peer = 1\nmax_concurrent_tests = 2\n"
        "session_grace_sec = 300\n"
        '[audit]\njournald = "off"\n'
    )
    server = ClockServer(config, tmp_path / "endpoint.log")
    try:
        seen = asyncio.run(clock_jump_scenario(server, appliance))
    finally:
        server.close()
    ended = seen["ended_after_s"]
    print(f"\nsession ended {ended:.2f} s after its grant (deadline {LIFETIME_S} s)")
    # Neither jump ended the session early or stretched its time left.
    for key in ("after_forward", "after_backward"):
        (session,) = seen[key]
        assert session["session_id"] == seen["session_id"]
        assert 0 < session["seconds_left"] <= LIFETIME_S, seen[key]
    assert LIFETIME_S - 0.5 <= ended <= LIFETIME_S + EXPIRY_SLACK_S
    # Two hours "later" the one test of this hour still counts.
    assert seen["refusal_after_forward"] == "hourly_quota"
    assert seen["refusal_after_expiry"] == "hourly_quota"
    assert seen["quota"]["tests_left_this_hour"] == 0
    log = (tmp_path / "endpoint.log").read_text()
    assert "Traceback" not in log, log[-3000:]
