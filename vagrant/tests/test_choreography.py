"""Firewall choreography against real machines (issue 7, spec §3.2, §9.2, §10.2).

Three machines on one private network: the endpoint (provisioned by the Ansible role), the
appliance (paired with it) and the outsider (an unpaired host on the same network). Every
reachability claim is checked from the machine whose view it is, by connecting; a "closed" is
only meaningful while something listens behind it, so the tests keep a listener there.

- Tunneled mode: from the appliance and from the outsider, only the control port answers, even
  while a throughput test runs and while other ports have listeners.
- Direct mode: the appliance reaches the data port it was granted and no other; the outsider
  reaches none; the hole closes when the grant expires; after `kill -9` of the service the hole
  is gone within its timeout (the kernel's element timeout, or the restarted service's flush).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from machines import (
    CONTROL_PORT,
    REFLECTOR,
    Grant,
    Machine,
    listening_locally,
    probe_tcp,
    transient_unit,
    unit_active,
    unit_errors,
    unit_output,
    wait_service_ready,
    wait_until,
)

from reflector.firewall.ruleset import HOLE_GRACE_S

DATA_PORTS = range(5201, 5300)
# Decoys: listeners the tests start on the endpoint, outside and inside the data port range,
# so that "does not answer" is proven to be the firewall's doing.
DECOY_PORTS = (CONTROL_PORT + 1, 8080, 5299)
# The bounded scan: the control port, the decoys, common service ports, the data port range.
# SSH (22) is left out on purpose: the role keeps it open so the host stays manageable.
SCAN_PORTS = sorted({CONTROL_PORT, *DECOY_PORTS, 80, 443, 3000, 5000, 9000, *DATA_PORTS})
# "Closed by" allows for one probe's connect timeout, a poll interval and timer latency.
CLOSE_SLACK_S = 5.0
# A throughput test long enough to scan two machines while it runs.
TUNNELED_TEST_S = 8
THROUGHPUT_DONE_TIMEOUT_S = 90.0
# Grants: long enough for the probes that run inside them, short enough to wait out.
GRANT_S = 20
EXPIRY_GRANT_S = 10


def start_decoys(endpoint: Machine, guard_listener: Callable[[int], None]) -> None:
    for port in DECOY_PORTS:
        guard_listener(port)
    wait_until(
        lambda: all(listening_locally(endpoint, p) for p in DECOY_PORTS),
        15,
        f"the decoys listen on {DECOY_PORTS}",
    )


@pytest.mark.tunneled
def test_tunneled_only_the_control_port_answers_from_the_appliance_and_the_outsider(
    tunneled: None,
    endpoint: Machine,
    appliance: Machine,
    outsider: Machine,
    endpoint_id: str,
    guard_listener: Callable[[int], None],
) -> None:
    start_decoys(endpoint, guard_listener)
    argv = [
        REFLECTOR, "client", "throughput", "-e", f"{endpoint.address}:{CONTROL_PORT}",
        "--expect-id", endpoint_id, "-t", str(TUNNELED_TEST_S), "--json",
    ]  # fmt: skip
    with transient_unit(appliance, argv, "rfl-tput") as unit:
        wait_until(
            lambda: endpoint.run("pgrep -x iperf3").rc == 0,
            30,
            "the endpoint runs iperf3 for the appliance's test",
        )
        seen = {m.name: probe_tcp(m, endpoint.address, SCAN_PORTS) for m in (appliance, outsider)}
        assert seen == {"appliance": {CONTROL_PORT}, "outsider": {CONTROL_PORT}}

        wait_until(lambda: not unit_active(appliance, unit), THROUGHPUT_DONE_TIMEOUT_S, "done")
        out, err = unit_output(appliance, unit), unit_errors(appliance, unit)
    assert out.strip(), f"the tunneled throughput test printed no report:\n{err}"
    report = json.loads(out)
    assert report["mode"] == "tunneled"
    assert report["appliance"]["received_bps"] > 0


@pytest.mark.direct
def test_direct_the_appliance_reaches_its_granted_port_and_the_outsider_does_not(
    direct: None,
    endpoint: Machine,
    appliance: Machine,
    outsider: Machine,
    hold_grant: Callable[[int], Grant],
) -> None:
    grant = hold_grant(GRANT_S)
    port = grant.ports["data"]
    assert grant.mode == "direct_ephemeral"
    assert port in DATA_PORTS

    # Scans first (their SYNs to the data port are dropped, so the one-client iperf3 behind it
    # is still there for the appliance's own connect afterwards).
    assert probe_tcp(outsider, endpoint.address, SCAN_PORTS) == {CONTROL_PORT}
    others = [p for p in SCAN_PORTS if p != port]
    assert probe_tcp(appliance, endpoint.address, others) == {CONTROL_PORT}
    assert probe_tcp(appliance, endpoint.address, [port]) == {port}


@pytest.mark.direct
def test_direct_the_hole_closes_when_the_grant_expires(
    direct: None,
    endpoint: Machine,
    appliance: Machine,
    hold_grant: Callable[[int], Grant],
    guard_listener: Callable[[int], None],
) -> None:
    grant = hold_grant(EXPIRY_GRANT_S)
    port = grant.ports["data"]
    assert probe_tcp(appliance, endpoint.address, [port]) == {port}
    guard_listener(port)

    time.sleep(max(0.0, grant.expires_at - time.time()))
    wait_until(
        lambda: port not in probe_tcp(appliance, endpoint.address, [port]),
        HOLE_GRACE_S + CLOSE_SLACK_S,
        f"the appliance's hole to port {port} closes after the grant expired",
    )
    # Still listening behind the closed hole: the firewall refuses, not an empty port.
    wait_until(lambda: listening_locally(endpoint, port), 15, f"a listener on {port}")


@pytest.mark.direct
def test_direct_after_kill_9_the_hole_is_gone_within_its_timeout(
    direct: None,
    endpoint: Machine,
    appliance: Machine,
    hold_grant: Callable[[int], Grant],
    guard_listener: Callable[[int], None],
) -> None:
    grant = hold_grant(GRANT_S)
    port = grant.ports["data"]
    assert probe_tcp(appliance, endpoint.address, [port]) == {port}
    guard_listener(port)

    main_pid = endpoint.check("systemctl show --property=MainPID --value reflector.service")
    assert int(main_pid) > 0
    endpoint.check("sudo kill -9 %s", main_pid.strip())
    # Nobody removes the hole now: the kernel's element timeout (the grant's remaining life
    # plus HOLE_GRACE_S) or the restarted service's table flush must.
    wait_until(
        lambda: port not in probe_tcp(appliance, endpoint.address, [port]),
        max(0.0, grant.expires_at - time.time()) + HOLE_GRACE_S + CLOSE_SLACK_S,
        f"the hole to port {port} is gone after kill -9",
    )
    wait_until(lambda: listening_locally(endpoint, port), 15, f"a listener on {port}")
    wait_service_ready(endpoint)  # Restart=on-failure brings it back for whatever runs next
