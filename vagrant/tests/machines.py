"""The Vagrant machines as testinfra hosts, and the moves the choreography tests make with them.

Every command reaches a machine over SSH (the ssh config `vagrant ssh-config` wrote) as the
`vagrant` user, with sudo where it needs root; nothing here touches the host's own network or
firewall. The moves:

- `probe_tcp`: a bounded TCP connect scan run ON a machine (python3 is in the box), so the
  answer is what that machine's address sees through the endpoint's firewall.
- `add_ipv6` / `remove_ipv6`: each machine's static IPv6 address on the private network (the
  LXC network hands out IPv4 only), so every probe can be made over both families.
- `transient_unit`: a background command on a machine as a transient systemd service, stopped
  by name when the test ends, whatever its outcome.
- The scripts `HOLDER` (the appliance requests a session and keeps it) and `GUARD` (a listener
  on the endpoint that takes a port over as soon as it is free), run in such units.
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

# Must match MACHINES in vagrant/Vagrantfile (and DHCP_HOSTS in run-tests.sh).
ADDRESSES = {
    "endpoint": "198.51.100.10",
    "appliance": "198.51.100.11",
    "outsider": "198.51.100.12",
}
# The same machines over IPv6: documentation addresses in one /64 ("RF" = 0x5246, as in the
# MACs), host numbers as in IPv4. The tests add them (`add_ipv6`) on the interface that holds
# the IPv4 address, whatever the provider named it, and remove them when the session ends.
ADDRESSES6 = {
    "endpoint": "2001:db8:5246::10",
    "appliance": "2001:db8:5246::11",
    "outsider": "2001:db8:5246::12",
}
IPV6_PREFIX_LEN = 64
FAMILIES = ("ipv4", "ipv6")
# The role's defaults (ansible/roles/reflector/defaults/main.yml) and the units' paths.
CONTROL_PORT = 4000
CONFIG_FILE = "/etc/reflector/reflector.toml"
REFLECTOR = "/usr/local/bin/reflector"
APPLIANCE_PYTHON = "/opt/reflector/venv/bin/python"

# A connect that has not completed in 2 s between containers on one bridge never will: the
# endpoint's firewall dropped the SYN. Short enough to scan ~120 ports at once in one timeout.
CONNECT_TIMEOUT_S = 2.0
# The service is back within ~2 s of a (re)start; 60 s absorbs a loaded CI machine.
SERVICE_READY_TIMEOUT_S = 60.0
# A grant is written within a second of the request; the wait covers a previous test's session
# still in its disconnect grace (quotas.session_grace_sec) plus a slow TLS handshake.
GRANT_TIMEOUT_S = 45.0
POLL_S = 0.5


@dataclass(frozen=True)
class Machine:
    """One Vagrant machine: its name, its addresses on the private network, its testinfra host."""

    name: str
    address: str
    address6: str
    host: Any  # testinfra.host.Host, which has no type hints

    def address_in(self, family: str) -> str:
        """Its address in `family` ("ipv4" or "ipv6")."""
        if family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
        return self.address if family == "ipv4" else self.address6

    def run(self, command: str, *args: object) -> Any:
        """Run a shell command; `args` are quoted into the `%s` of `command`."""
        return self.host.run(command, *args)

    def check(self, command: str, *args: object) -> str:
        """Run a shell command that must succeed; its stdout."""
        result = self.host.run(command, *args)
        assert result.rc == 0, (
            f"on {self.name}: {result.command!r} exited {result.rc}\n"
            f"stdout: {result.stdout}\nstderr: {result.stderr}"
        )
        return str(result.stdout)


def wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> float:
    """Poll `predicate` until it holds; the seconds it took; fail after `timeout_s`."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting until {what}")
        time.sleep(POLL_S)
    return time.monotonic() - start


def interface_of(machine: Machine) -> str:
    """The interface that holds the machine's IPv4 address on the private network."""
    out = machine.check("ip -o -4 addr show to %s/32", machine.address)
    fields = out.split()
    assert len(fields) > 1, f"{machine.name} does not have {machine.address}: {out!r}"
    return fields[1]


def add_ipv6(machine: Machine) -> None:
    """Give the machine its static IPv6 address, at once usable.

    `nodad`: there is nobody else on this private network to collide with, and duplicate address
    detection would keep the address "tentative" (unusable) for a second or more. `replace`
    makes it idempotent (a kept environment, a rerun).
    """
    machine.check(
        "sudo ip -6 addr replace %s dev %s nodad",
        f"{machine.address6}/{IPV6_PREFIX_LEN}",
        interface_of(machine),
    )


def remove_ipv6(machine: Machine) -> None:
    """Take the static IPv6 address away again (the machine is as provisioned)."""
    machine.run(
        "sudo ip -6 addr del %s dev %s",
        f"{machine.address6}/{IPV6_PREFIX_LEN}",
        interface_of(machine),
    )


# --- Probing -------------------------------------------------------------------------------

# Connect to every port at once, print the ones that accepted (a JSON list).
PROBE = r"""
import asyncio, json, sys
address, timeout, ports = sys.argv[1], float(sys.argv[2]), [int(p) for p in sys.argv[3:]]
async def one(port):
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(address, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return None
    writer.close()
    return port
async def main():
    return sorted(p for p in await asyncio.gather(*(one(p) for p in ports)) if p is not None)
print(json.dumps(asyncio.run(main())))
"""


def probe_tcp(source: Machine, address: str, ports: list[int]) -> set[int]:
    """The ports among `ports` that accept a TCP connection from `source` to `address`."""
    out = source.check(
        "python3 -c %s %s %s " + " ".join(str(int(p)) for p in ports),
        PROBE,
        address,
        str(CONNECT_TIMEOUT_S),
    )
    return set(json.loads(out))


def listening_locally(endpoint: Machine, port: int) -> bool:
    """Whether something on the endpoint accepts on `port` at its own address. Traffic to a
    host's own address goes over `lo`, which Reflector's rules let through: this sees the
    listener, not the firewall."""
    return port in probe_tcp(endpoint, endpoint.address, [port])


# --- Transient units on the machines --------------------------------------------------------

_unit_numbers = itertools.count(1)


@contextmanager
def transient_unit(machine: Machine, argv: list[str], prefix: str) -> Iterator[str]:
    """Run `argv` as a transient systemd service on `machine`; stop it when the block ends.

    Its stdout goes to /run/<unit>.out, its stderr to /run/<unit>.err.
    """
    unit = f"{prefix}-{os.getpid()}-{next(_unit_numbers)}"
    machine.check(
        "sudo systemd-run --quiet --collect --unit=%s "
        "-p StandardOutput=file:/run/%s.out -p StandardError=file:/run/%s.err "
        + " ".join(shlex.quote(a) for a in argv),
        unit,
        unit,
        unit,
    )
    try:
        yield unit
    finally:
        machine.run("sudo systemctl stop %s", unit)
        machine.run("sudo rm -f /run/%s.out /run/%s.err", unit, unit)


def unit_output(machine: Machine, unit: str) -> str:
    return str(machine.run("sudo cat /run/%s.out", unit).stdout)


def unit_errors(machine: Machine, unit: str) -> str:
    return str(machine.run("sudo cat /run/%s.err", unit).stdout)


def unit_active(machine: Machine, unit: str) -> bool:
    return bool(machine.run("systemctl is-active --quiet %s", unit).rc == 0)


# --- The appliance holds a grant; the endpoint guards a port --------------------------------

# Runs on the appliance with the reflector venv: request a throughput session, print the grant
# as JSON, keep the control connection open (the grant lives) until SIGTERM or the session's
# end, then close the session so that the next test is not refused as "busy".
HOLDER = r"""
import asyncio, contextlib, json, signal, sys, time
from reflector.client.link_client import ApplianceIdentity, LinkClient, RemoteError
from reflector.client.link_client import default_appliance_dir
from reflector.link.messages import Ok, SessionClose, SessionGrant, SessionRequest
from reflector.link.messages import ThroughputParams

RETRYABLE = {"busy", "heavy_test_running", "cooldown"}

async def main(host, port, expect_id, duration, wait_s):
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    appliance = ApplianceIdentity.open(default_appliance_dir())
    client = await LinkClient.connect((host, int(port)), appliance, expect_id)
    params = ThroughputParams(duration_sec=int(duration), protocol="tcp", streams=1, reverse=False)
    give_up = time.monotonic() + float(wait_s)
    while True:
        try:
            grant = await client.call(SessionRequest(test_type="throughput", params=params),
                                      SessionGrant)
            break
        except RemoteError as exc:
            if exc.code not in RETRYABLE or time.monotonic() > give_up:
                raise
            await asyncio.sleep(min(max(exc.retry_after or 1, 1), 5))
    print(json.dumps({"session_id": grant.session_id, "mode": grant.mode,
                      "ports": grant.ports, "expires_at": grant.expires_at,
                      "granted_at": time.time()}), flush=True)
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), max(1.0, grant.expires_at - time.time()))
    with contextlib.suppress(Exception):
        await client.call(SessionClose(session_id=grant.session_id), Ok)
    await client.close()

asyncio.run(main(*sys.argv[1:]))
"""

# Binds 0.0.0.0:PORT as soon as the port is free (iperf3 holds it until its one client is
# done), then accepts and closes connections until stopped.
GUARD = r"""
import socket, sys, time
port = int(sys.argv[1])
sock = socket.socket()
sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
while True:
    try:
        sock.bind(("0.0.0.0", port))
        break
    except OSError:
        time.sleep(0.1)
sock.listen(16)
while True:
    conn, _ = sock.accept()
    conn.close()
"""


@dataclass(frozen=True)
class Grant:
    """What the appliance was granted (SessionGrant), and the unit that holds it."""

    session_id: str
    mode: str
    ports: dict[str, int]
    expires_at: float  # wall clock; the containers share the host's clock
    granted_at: float
    unit: str


def read_grant(appliance: Machine, unit: str) -> Grant:
    """Wait for the holder in `unit` to print its grant (or to die trying)."""

    def settled() -> bool:
        return bool(unit_output(appliance, unit).strip()) or not unit_active(appliance, unit)

    wait_until(settled, GRANT_TIMEOUT_S + 10, "the appliance holds a grant")
    out = unit_output(appliance, unit).strip()
    if not out:
        pytest.fail(f"the appliance got no grant:\n{unit_errors(appliance, unit)}")
    return Grant(unit=unit, **json.loads(out.splitlines()[0]))


# --- The endpoint's service and mode --------------------------------------------------------


def current_mode(endpoint: Machine) -> str:
    out = endpoint.check("sudo sed -n 's/^mode *= *\"\\(.*\\)\"/\\1/p' %s", CONFIG_FILE)
    return out.strip()


def wait_service_ready(endpoint: Machine) -> None:
    def ready() -> bool:
        active = endpoint.run("systemctl is-active --quiet reflector.service").rc == 0
        return bool(active) and listening_locally(endpoint, CONTROL_PORT)

    wait_until(ready, SERVICE_READY_TIMEOUT_S, "reflector.service is active and listening")
