"""The privilege boundary on a real systemd host: the unprivileged parent asks the socket-activated
root helper for an engine, and the engine runs in its own transient scope as another user.

In a booted container: users `reflector` (the parent) and `reflector-engine`, the package in
/opt/reflector, the two units from units/ installed and the socket started. Each scenario is a
small script run as a given user that uses `PrivsepClient` and prints what it saw as JSON.
"""

from __future__ import annotations

import json
import textwrap
import time
from typing import Any

import pytest

from .harness import REPO_ROOT, SystemdHost, install_package

pytestmark = [pytest.mark.system, pytest.mark.slow]

VENV = "/opt/reflector"
PYTHON = f"{VENV}/bin/python"
STATE_DIR = "/var/lib/reflector"
KEY_FILE = f"{STATE_DIR}/identity.ed25519"
SOCKET = "/run/reflector/privd.sock"
CONFIG = "/etc/reflector/reflector.toml"
PARENT, ENGINE_USER, INTRUDER = "reflector", "reflector-engine", "intruder"
# Short durations keep the module under a minute; RuntimeMaxSec = duration + grace.
GRACE_S = 1
CONFIG_TEXT = f"""\
[network]
listen_address = ["127.0.0.1:4000"]
data_port_range_start = 5201
data_port_range_end = 5210

[quotas]
max_test_duration_sec = 20
session_grace_sec = 0

[limits]
memory_max = "128M"
cpu_quota = "50%"
tasks_max = 16
runtime_grace_sec = {GRACE_S}
"""

# Run as a user inside the container: one PrivsepClient call sequence, the outcome as JSON.
CLIENT = textwrap.dedent(
    """
    import asyncio, json, subprocess, sys, time
    from pathlib import Path
    from reflector.config import load_config
    from reflector.privsep import EngineLimits, PrivsepClient, PrivsepError, open_reader

    async def start(client, test_id, port, duration, limits=None):
        config = load_config(Path("/etc/reflector/reflector.toml"))
        limits = limits or EngineLimits.from_config(config)
        return await client.start_engine(test_id=test_id, kind="iperf3", port=port,
            duration_s=duration, bind="127.0.0.1", peer="127.0.0.1", limits=limits)

    def show(unit):
        props = ("MemoryMax,CPUQuotaPerSecUSec,TasksMax,RuntimeMaxUSec,ActiveState,LoadState,"
                 "IPAccounting,IPAddressAllow,IPAddressDeny,SocketBindAllow,SocketBindDeny")
        out = subprocess.run(["systemctl", "show", "-p", props, unit],
                             capture_output=True, text=True).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    async def main(scenario):
        client = PrivsepClient("/run/reflector/privd.sock")
        report = {}
        try:
            if scenario == "full":
                h = await start(client, "sysfull", 5201, 15)
                report["handle"] = {"pid": h.pid, "unit": h.unit, "ready": h.ready,
                                    "protections": list(h.protections)}
                report["scope"] = show(h.unit)
                report["user"] = subprocess.run(["ps", "-o", "user=", "-p", str(h.pid)],
                                                capture_output=True, text=True).stdout.strip()
                out, err = await open_reader(h.stdout_fd), await open_reader(h.stderr_fd)
                subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", "5201", "-t", "1", "-J"],
                               capture_output=True, timeout=20)
                doc = json.loads(await asyncio.wait_for(out.read(), 20))
                report["json_end"] = sorted(doc.get("end", {}))
                e = await client.stop_engine("sysfull")
                report["exit"] = {"code": e.exit_code, "by": e.stopped_by, "ms": e.runtime_ms,
                                  "in": e.ip_ingress_bytes, "out": e.ip_egress_bytes}
                report["after"] = show(h.unit)
            elif scenario == "timeout":
                t0 = time.monotonic()
                h = await start(client, "systime", 5202, 2)
                out = await open_reader(h.stdout_fd)
                await asyncio.wait_for(out.read(), 30)  # EOF: the engine is gone
                report["eof_after_s"] = time.monotonic() - t0
                e = await client.stop_engine("systime")
                report["exit"] = {"code": e.exit_code, "by": e.stopped_by, "ms": e.runtime_ms}
                report["after"] = show(h.unit)
            elif scenario == "stop":
                h = await start(client, "sysstop", 5203, 15)
                e = await client.stop_engine("sysstop")
                report["exit"] = {"code": e.exit_code, "by": e.stopped_by}
            elif scenario == "out_of_range":
                await start(client, "sysrange", 6000, 5)
            elif scenario == "over_limit":
                await start(client, "syslimit", 5204, 5, EngineLimits(
                    memory_max_bytes=1 << 30, cpu_quota_percent=50, tasks_max=16))
            elif scenario == "any":
                await start(client, "sysany", 5205, 5)
        except PrivsepError as exc:
            report["error"] = {"code": exc.code, "message": exc.message}
        print(json.dumps(report))

    asyncio.run(main(sys.argv[1]))
    """
)


@pytest.fixture(scope="module")
def helper_host(systemd_host_module: SystemdHost) -> SystemdHost:
    """The container with the package, the three users, a state dir with a key, and the helper."""
    host = systemd_host_module
    install_package(host, VENV)
    for user in (PARENT, ENGINE_USER):
        host.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user])
    # In the parent's group (so the socket's mode lets it connect) but not the parent's uid.
    host.run(["useradd", "--system", "--no-create-home", "-G", PARENT, INTRUDER])
    host.run(["install", "-d", "-o", PARENT, "-g", PARENT, "-m", "0700", STATE_DIR])
    host.write_file(
        KEY_FILE, "not a real key, but a secret all the same\n", mode=0o600, owner=PARENT
    )
    host.write_file(CONFIG, CONFIG_TEXT, mode=0o644)
    host.write_file("/usr/local/lib/privsep-client.py", CLIENT, mode=0o644)
    for name in ("reflector-privd.socket", "reflector-privd.service"):
        text = (REPO_ROOT / "units" / name).read_text()
        text = text.replace("/usr/local/bin/reflector", f"{VENV}/bin/reflector")
        host.write_file(f"/etc/systemd/system/{name}", text)
    host.run(["systemctl", "daemon-reload"])
    host.run(["systemctl", "start", "reflector-privd.socket"])
    return host


def client(host: SystemdHost, scenario: str, user: str = PARENT) -> dict[str, Any]:
    result = host.run(
        [PYTHON, "/usr/local/lib/privsep-client.py", scenario], user=user, check=False, timeout=60
    )
    assert result.returncode == 0, f"client {scenario} as {user} failed:\n{result.stderr}"
    report: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


def test_the_socket_is_root_owned_and_only_the_parent_group_may_connect(
    helper_host: SystemdHost,
) -> None:
    stat = helper_host.run(["stat", "-c", "%U %G %a", SOCKET]).stdout.split()
    assert stat == ["root", PARENT, "660"]


def test_an_engine_runs_in_its_own_scope_as_the_engine_user_and_reports_back(
    helper_host: SystemdHost,
) -> None:
    report = client(helper_host, "full")
    assert "error" not in report, report
    handle = report["handle"]
    assert handle["unit"] == "reflector-test-sysfull.scope"
    assert handle["ready"] is True
    assert {"scope", "engine_user", "runtime_max"} <= set(handle["protections"])
    scope = report["scope"]
    assert scope["ActiveState"] == "active"
    assert scope["MemoryMax"] == str(128 * 1024 * 1024)
    assert scope["CPUQuotaPerSecUSec"] == "500ms"  # 50%
    assert scope["TasksMax"] == "16"
    assert scope["RuntimeMaxUSec"] == f"{15 + GRACE_S}s"
    assert scope["IPAccounting"] == "yes"
    # Where the host enforces them (the helper probes at start and says so in protections),
    # the scope admits only the granted peer and binds only the granted port; elsewhere the
    # properties are absent rather than set and silently ignored.
    # (systemctl show leaves out properties that are empty.)
    if "ip_address_allow" in handle["protections"]:
        assert "127.0.0.1" in scope["IPAddressAllow"], scope
        assert "0.0.0.0/0" in scope["IPAddressDeny"] or "any" in scope["IPAddressDeny"], scope
    else:
        assert scope.get("IPAddressDeny", "") == "", scope
    if "socket_bind_allow" in handle["protections"]:
        assert "5201" in scope["SocketBindAllow"] and scope["SocketBindDeny"], scope
    else:
        assert scope.get("SocketBindAllow", "") == "", scope
    assert report["user"] == ENGINE_USER
    # iperf3's own JSON arrived through the passed stdout fd after a client ran.
    assert {"sum_received", "sum_sent"} <= set(report["json_end"])
    assert report["exit"]["code"] == 0
    assert report["exit"]["by"] == "exit"
    assert report["exit"]["ms"] > 0
    assert report["after"]["ActiveState"] == "inactive"  # the scope is gone


def test_systemd_kills_an_engine_at_its_runtime_limit(helper_host: SystemdHost) -> None:
    report = client(helper_host, "timeout")
    assert "error" not in report, report
    limit_s = 2 + GRACE_S
    # RuntimeMaxSec= counts from the scope's start, a little after our clock started.
    assert limit_s - 0.5 <= report["eof_after_s"] <= limit_s + 3.0
    assert report["exit"]["by"] == "runtime_limit"
    assert report["after"]["ActiveState"] == "inactive"


def test_stop_engine_stops_the_scope_and_returns_the_exit_status(helper_host: SystemdHost) -> None:
    report = client(helper_host, "stop")
    assert "error" not in report, report
    assert report["exit"]["by"] == "stop"
    assert isinstance(report["exit"]["code"], int)


def test_the_engine_user_cannot_read_the_identity_key(helper_host: SystemdHost) -> None:
    denied = helper_host.run(["cat", KEY_FILE], user=ENGINE_USER, check=False)
    assert denied.returncode != 0
    assert "secret" not in denied.stdout


def test_a_port_outside_the_range_is_refused(helper_host: SystemdHost) -> None:
    report = client(helper_host, "out_of_range")
    assert report["error"]["code"] == "out_of_range"


def test_limits_above_the_config_are_refused(helper_host: SystemdHost) -> None:
    report = client(helper_host, "over_limit")
    assert report["error"]["code"] == "over_limit"


def test_another_uid_is_refused_by_peer_credentials_and_logged(helper_host: SystemdHost) -> None:
    report = client(helper_host, "any", user=INTRUDER)
    assert report["error"]["code"] == "not_permitted"
    uid = helper_host.run(["id", "-u", INTRUDER]).stdout.strip()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        log = helper_host.journal("-u", "reflector-privd.service")
        if f"refused a request from uid {uid}" in log:
            break
        time.sleep(0.2)
    else:
        pytest.fail(f"the refusal of uid {uid} is not in the helper's log:\n{log[-2000:]}")


def test_a_user_outside_the_group_cannot_even_connect(helper_host: SystemdHost) -> None:
    report = client(helper_host, "any", user="nobody")
    assert report["error"]["code"] == "helper_unreachable"
