"""Fault injection against a real endpoint: the host, the service and the appliance driver.

Why this exists: the fault tests of test_faults.py each break one thing under a running test
(the parent, iperf3, the helper, the disk, journald) and then look at what is left. They share
a booted container prepared here the way an operator's host is: users `reflector` and
`reflector-engine`, the package in /opt/reflector, the helper's socket and service from units/,
the config root:reflector 0640, and the parent as a Type=notify unit under its own user.

The appliance side is `DRIVER`, a small script run inside the container that speaks the link
itself and prints one JSON line per step (grant, iperf3 done, result), so a test can strike at
a known moment: right after the grant, while data flows.
"""

from __future__ import annotations

import json
import queue
import subprocess
import textwrap
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from .harness import REPO_ROOT, SystemdHost, install_package, stop_process

__all__ = [
    "APP",
    "CONFIG",
    "DATA_PORT",
    "PARENT_UNIT",
    "STATE",
    "Driver",
    "Endpoint",
    "audit_records",
    "await_true",
    "prepare_endpoint_host",
]

VENV = "/opt/reflector"
PYTHON = f"{VENV}/bin/python"
REFLECTOR = f"{VENV}/bin/reflector"
CONFIG = "/etc/reflector/reflector.toml"
STATE = "/var/lib/reflector"
APP = "/root/appliance"
DRIVER_PATH = "/usr/local/lib/fault-driver.py"
PARENT_UNIT = "reflector-faults.service"
PARENT_LOG = "/var/log/reflector-faults.log"
HELPER_UNIT = "reflector-privd.service"
HELPER_SOCKET_UNIT = "reflector-privd.socket"
PARENT_USER, ENGINE_USER = "reflector", "reflector-engine"
CONTROL = "127.0.0.1:4000"
# One data port: a grant after a fault then proves the faulted session's port came free.
DATA_PORT = 5201
# Short grace so a killed scope's RuntimeMaxSec= (duration + grace) is reached quickly.
RUNTIME_GRACE_S = 2
# Enough tests per hour for every scenario of the module; the hourly window is tested in-process.
TESTS_PER_HOUR = 500

CONFIG_TEXT = f"""\
[service]
state_dir = "{STATE}"

[network]
listen_address = ["{CONTROL}"]
mode = "direct_ephemeral"
data_port_range_start = {DATA_PORT}
data_port_range_end = {DATA_PORT}

[quotas]
max_test_duration_sec = 30
max_concurrent_tests = 1
max_tests_per_hour_per_peer = {TESTS_PER_HOUR}
session_grace_sec = 1
# Loopback moves gigabytes a second; the daily byte quota is not what these faults test.
max_bytes_per_day_per_peer = 1_000_000_000_000

[limits]
memory_max = "128M"
tasks_max = 16
runtime_grace_sec = {RUNTIME_GRACE_S}

[audit]
journald = "auto"
jsonl = true
"""

# A plain Type=notify unit (the parent as the reflector user, no restart), so each fault is
# followed by an explicit, timed restart rather than systemd's own.
PARENT_UNIT_TEXT = f"""\
[Unit]
Description=Reflector under fault injection
Wants={HELPER_SOCKET_UNIT}
After={HELPER_SOCKET_UNIT}

[Service]
Type=notify
ExecStart={REFLECTOR} serve --config {CONFIG} --state-dir {STATE}
User={PARENT_USER}
Group={PARENT_USER}
StateDirectory=reflector
StateDirectoryMode=0700
WatchdogSec=30s
Restart=no
TimeoutStopSec=30s
# Its log goes to a file, because one of the faults is journald itself being gone.
StandardOutput=append:{PARENT_LOG}
StandardError=inherit
"""

# The appliance, inside the container: one scenario, one JSON line per step on stdout.
DRIVER = textwrap.dedent(
    """
    import asyncio, json, sys
    from pathlib import Path
    from reflector.client.link_client import ApplianceIdentity, LinkClient, RemoteError
    from reflector.client import measure
    from reflector.errors import ReflectorError
    from reflector.link.messages import (GetResult, Ok, Result, SessionClose, SessionGrant,
        SessionRequest, ThroughputParams, UdpEchoParams)

    def say(**doc):
        print(json.dumps(doc), flush=True)

    def failure(exc):
        return {"code": getattr(exc, "code", None), "message": str(exc)}

    async def connect(endpoint_id):
        app = ApplianceIdentity.open(Path("/root/appliance"))
        return app, await LinkClient.connect(("127.0.0.1", 4000), app, endpoint_id)

    async def throughput(endpoint_id, duration):
        app, client = await connect(endpoint_id)
        opts = measure.ThroughputOptions(duration_sec=duration)
        grant = await client.call(SessionRequest(test_type="throughput",
            params=ThroughputParams(duration_sec=duration, protocol="tcp", streams=1,
            reverse=False)), SessionGrant)
        say(step="grant", session_id=grant.session_id, ports=grant.ports, mode=grant.mode)
        try:
            await measure._run_iperf(client, app, grant, opts, duration, None)
            say(step="iperf_done", error=None)
        except ReflectorError as exc:
            say(step="iperf_done", error=failure(exc))
        try:
            await client.call(SessionClose(session_id=grant.session_id), Ok)
            closed = None
        except ReflectorError as exc:
            closed = failure(exc)
        try:
            result = (await client.call(GetResult(session_id=grant.session_id), Result)).result
            say(step="result", close_error=closed, result=result)
        except ReflectorError as exc:
            say(step="result", close_error=closed, error=failure(exc))
        await client.close()

    async def requests(endpoint_id, count):
        app, client = await connect(endpoint_id)
        outcomes = []
        for _ in range(count):
            try:
                grant = await client.call(SessionRequest(test_type="udp_echo",
                    params=UdpEchoParams(duration_sec=1)), SessionGrant)
            except RemoteError as exc:
                outcomes.append({"code": exc.code, "message": exc.remote_message})
                continue
            await client.call(SessionClose(session_id=grant.session_id), Ok)
            outcomes.append({"code": "grant", "session_id": grant.session_id})
        say(step="requests", outcomes=outcomes)
        await client.close()

    async def main(scenario, endpoint_id, number):
        try:
            if scenario == "throughput":
                await throughput(endpoint_id, number)
            else:
                await requests(endpoint_id, number)
        except (ReflectorError, OSError, ConnectionError) as exc:
            say(step="link_error", error=failure(exc))

    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
    """
)

# How often to look again while waiting for systemd, nftables or a file.
POLL_S = 0.2
# systemd starts the parent (Python, identity, sqlite, bind) in about 1-2 s on a loaded
# 2-core machine; 30 s only trips on a broken start.
START_TIMEOUT_S = 30.0
# A stop may take up to the unit's TimeoutStopSec= (30 s) before systemd kills the parent.
STOP_TIMEOUT_S = 45.0

T = TypeVar("T")


def await_true(
    probe: Callable[[], T | None], *, timeout: float, what: str, interval: float = POLL_S
) -> T:
    """Poll `probe` until it returns something truthy; AssertionError naming `what` if never."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.1f} s")
        time.sleep(interval)


@dataclass(frozen=True)
class Endpoint:
    """The prepared container and the two identities the tests need."""

    host: SystemdHost
    endpoint_id: str
    appliance_id: str

    # --- the parent

    def start_parent(self) -> None:
        self.host.run(["systemctl", "reset-failed", PARENT_UNIT], check=False)
        self.host.run(["systemctl", "start", PARENT_UNIT], timeout=START_TIMEOUT_S)

    def stop_parent(self) -> None:
        self.host.run(["systemctl", "stop", PARENT_UNIT], check=False, timeout=STOP_TIMEOUT_S)
        self.host.run(["systemctl", "reset-failed", PARENT_UNIT], check=False)

    def crash(self, unit: str) -> None:
        """SIGKILL the unit's main process, as a crash would (`--kill-whom=main`: killing the
        whole cgroup fails with EIO now and then in the nspawn container)."""
        self.host.run(["systemctl", "kill", "--kill-whom=main", "-s", "KILL", unit])

    def parent_log(self) -> str:
        return self.host.path(PARENT_LOG).read_text(errors="replace")

    def unit_state(self, unit: str) -> str:
        """ActiveState of `unit` ("active", "inactive", "failed", ...)."""
        out = self.host.run(["systemctl", "show", "-p", "ActiveState", "--value", unit]).stdout
        return out.strip()

    def restart_helper(self) -> None:
        """A fresh helper: no engines or holes left from an earlier test."""
        self.host.run(["systemctl", "reset-failed", HELPER_UNIT], check=False)
        self.host.run(["systemctl", "restart", HELPER_UNIT], timeout=STOP_TIMEOUT_S)

    def fresh(self) -> None:
        """Parent stopped, helper restarted, parent started: each fault starts from here."""
        self.stop_parent()
        self.restart_helper()
        self.start_parent()

    # --- what the tests look at

    def status(self) -> dict[str, Any]:
        out = self.host.run(
            [REFLECTOR, "status", "--json", "--config", CONFIG, "--state-dir", STATE]
        ).stdout
        doc: dict[str, Any] = json.loads(out)
        return doc

    def tests_used_this_hour(self) -> int:
        """The appliance's test count in the hourly window, as the running service reports it.

        Status lists the peers that tested in the last day: absent means none this hour.
        """
        quota = self.status()["peers"].get(self.appliance_id)
        if quota is None:
            return 0
        return int(quota["tests_per_hour"]) - int(quota["tests_left_this_hour"])

    def audit_verify(self) -> subprocess.CompletedProcess[str]:
        return self.host.run(
            [REFLECTOR, "audit", "verify", "--config", CONFIG, "--state-dir", STATE], check=False
        )

    def scope_active(self, session_id: str) -> bool:
        return self.unit_state(f"reflector-test-{session_id}.scope") in ("active", "deactivating")

    def holes(self) -> list[str]:
        """The elements of Reflector's IPv4 hole set, as `nft` prints them."""
        out = self.host.run(["nft", "-j", "list", "set", "inet", "reflector", "holes4"]).stdout
        elements: list[str] = []
        for item in json.loads(out)["nftables"]:
            for element in item.get("set", {}).get("elem", []):
                elements.append(json.dumps(element, sort_keys=True))
        return elements

    def ledger_row(self, session_id: str) -> dict[str, Any] | None:
        """The session's row in accounting.sqlite3, read the way support would read it."""
        script = (
            "import json, sqlite3, sys\n"
            "c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
            "c.row_factory = sqlite3.Row\n"
            "r = c.execute('SELECT * FROM tests WHERE session_id = ?', (sys.argv[2],)).fetchone()\n"
            "print(json.dumps(dict(r) if r else None))\n"
        )
        out = self.host.run([PYTHON, "-c", script, f"{STATE}/accounting.sqlite3", session_id])
        row: dict[str, Any] | None = json.loads(out.stdout)
        return row

    def integrity_check(self) -> str:
        script = (
            "import sqlite3, sys\n"
            "c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True)\n"
            "print(c.execute('PRAGMA integrity_check').fetchone()[0])\n"
        )
        return self.host.run([PYTHON, "-c", script, f"{STATE}/accounting.sqlite3"]).stdout.strip()

    def requests(self, count: int) -> list[dict[str, Any]]:
        """`count` UDP echo sessions, each closed at once; the outcome of each request."""
        result = self.host.run(
            [PYTHON, DRIVER_PATH, "requests", self.endpoint_id, str(count)], timeout=120
        )
        doc = json.loads(result.stdout.strip().splitlines()[-1])
        assert doc["step"] == "requests", doc
        outcomes: list[dict[str, Any]] = doc["outcomes"]
        return outcomes

    def throughput(self, duration_s: int) -> Driver:
        return Driver(self.host, ["throughput", self.endpoint_id, str(duration_s)])


def audit_records(host: SystemdHost, kind: str | None = None) -> list[dict[str, Any]]:
    """Records of the hash-chained audit file (optionally one event kind), read as root."""
    path = host.path(f"{STATE}/audit.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("reflector_event") == kind]


class Driver:
    """The appliance driver running in the background; its JSON lines arrive on a queue."""

    def __init__(self, host: SystemdHost, args: list[str]) -> None:
        self.proc = host.popen([PYTHON, DRIVER_PATH, *args])
        self.started = time.monotonic()
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._seen: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def next_step(self, timeout: float) -> dict[str, Any]:
        """The next JSON line the driver prints (AssertionError with its stderr if none)."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(f"driver printed no step in {timeout:.0f} s; {self._why()}")
            self._seen.append(line)
            if line.startswith("{"):
                doc: dict[str, Any] = json.loads(line)
                return doc

    def _why(self) -> str:
        if self.proc.poll() is None:
            return f"still running; printed {self._seen!r}"
        err = self.proc.stderr.read() if self.proc.stderr else ""
        return f"exited {self.proc.returncode}; printed {self._seen!r}; stderr:\n{err[-3000:]}"

    def wait(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        stop_process(self.proc)


def prepare_endpoint_host(host: SystemdHost) -> Endpoint:
    """Install everything an endpoint host has (see the module docstring) and start it."""
    install_package(host, VENV)
    for user in (PARENT_USER, ENGINE_USER):
        host.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
    appliance_id = host.run([REFLECTOR, "client", "id", "--state-dir", APP]).stdout.strip()
    host.write_file(DRIVER_PATH, DRIVER, mode=0o644)
    access = f'\n[access]\nauthorized_peers = ["{appliance_id}"]\n'
    host.write_file(CONFIG, CONFIG_TEXT + access, mode=0o640)
    host.run(["chown", f"root:{PARENT_USER}", CONFIG])
    for name in (HELPER_SOCKET_UNIT, HELPER_UNIT):
        # The units name the installed binary; here the package lives in the test's venv.
        text = (REPO_ROOT / "units" / name).read_text()
        text = text.replace("/usr/local/bin/reflector", REFLECTOR)
        host.write_file(f"/etc/systemd/system/{name}", text)
    host.write_file(f"/etc/systemd/system/{PARENT_UNIT}", PARENT_UNIT_TEXT)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", HELPER_SOCKET_UNIT])
    host.run(["systemctl", "start", PARENT_UNIT], timeout=START_TIMEOUT_S)
    endpoint_id = host.run([REFLECTOR, "id", "--state-dir", STATE]).stdout.strip()
    return Endpoint(host=host, endpoint_id=endpoint_id, appliance_id=appliance_id)
