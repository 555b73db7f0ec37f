"""Fixtures for the choreography tests: the three machines, a held grant, a guarded port, the
endpoint's mode.

Run through vagrant/run-tests.sh (`make vagrant-test`): it brings the machines up, provisions
and pairs them, exports the Vagrant environment and passes `--ssh-config`. Without that the
tests fail at once (they never skip: there is nothing to test without the machines).
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest
import testinfra  # type: ignore[import-untyped]
from machines import (
    ADDRESSES,
    ADDRESSES6,
    APPLIANCE_PYTHON,
    CONFIG_FILE,
    CONTROL_PORT,
    GRANT_TIMEOUT_S,
    GUARD,
    HOLDER,
    REFLECTOR,
    Grant,
    Machine,
    add_ipv6,
    current_mode,
    read_grant,
    remove_ipv6,
    transient_unit,
    wait_service_ready,
)

SSH_CONFIG_ENV = "REFLECTOR_VAGRANT_SSH_CONFIG"
# Re-provisioning the endpoint runs the whole role (about a minute here); a hung ansible run
# must fail the test long before CI's budget.
PROVISION_TIMEOUT_S = 600


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "tunneled: runs with the endpoint in tunneled mode")
    config.addinivalue_line("markers", "direct: runs with the endpoint in direct_ephemeral mode")


def _ssh_config(config: pytest.Config) -> str:
    path = getattr(config.option, "ssh_config", None) or os.environ.get(SSH_CONFIG_ENV, "")
    if not path or not Path(path).is_file():
        pytest.fail(
            "no ssh config for the Vagrant machines: run these tests through "
            "vagrant/run-tests.sh (make vagrant-test)",
            pytrace=False,
        )
    return str(path)


@pytest.fixture(scope="session")
def machines(pytestconfig: pytest.Config) -> Iterator[dict[str, Machine]]:
    """The three machines, each with its fixed IPv4 address (checked) and its static IPv6
    address (added here, removed when the session ends)."""
    ssh_config = _ssh_config(pytestconfig)
    found = {}
    for name, address in ADDRESSES.items():
        host = testinfra.get_host(f"ssh://{name}", ssh_config=ssh_config)
        machine = Machine(name=name, address=address, address6=ADDRESSES6[name], host=host)
        # The fixed addresses are what the firewall sees: check the network is as designed.
        addresses = machine.check("ip -4 -o addr show")
        assert f" {address}/" in addresses, f"{name} does not have {address}:\n{addresses}"
        found[name] = machine
    with ExitStack() as stack:
        for machine in found.values():
            add_ipv6(machine)
            stack.callback(remove_ipv6, machine)
        yield found


@pytest.fixture(scope="session")
def endpoint(machines: dict[str, Machine]) -> Machine:
    return machines["endpoint"]


@pytest.fixture(scope="session")
def appliance(machines: dict[str, Machine]) -> Machine:
    return machines["appliance"]


@pytest.fixture(scope="session")
def outsider(machines: dict[str, Machine]) -> Machine:
    return machines["outsider"]


@pytest.fixture(scope="session")
def endpoint_id(endpoint: Machine) -> str:
    return endpoint.check(f"sudo -u reflector {REFLECTOR} id --config {CONFIG_FILE}").strip()


@pytest.fixture
def hold_grant(
    appliance: Machine, endpoint: Machine, endpoint_id: str
) -> Iterator[Callable[[int], Grant]]:
    """`hold_grant(duration_s)`: the appliance asks for a throughput session and keeps it
    (until the test ends or the session does)."""
    with ExitStack() as stack:

        def hold(duration_s: int) -> Grant:
            argv = [
                APPLIANCE_PYTHON, "-c", HOLDER, endpoint.address, str(CONTROL_PORT),
                endpoint_id, str(duration_s), str(GRANT_TIMEOUT_S),
            ]  # fmt: skip
            unit = stack.enter_context(transient_unit(appliance, argv, "rfl-grant"))
            return read_grant(appliance, unit)

        yield hold


@pytest.fixture
def guard_listener(endpoint: Machine) -> Iterator[Callable[[int], None]]:
    """`guard_listener(port)`: keep a TCP listener on the endpoint's `port` for the test, so
    that a refused connection is the firewall's doing and not an empty port."""
    with ExitStack() as stack:

        def guard(port: int) -> None:
            argv = ["python3", "-c", GUARD, str(port)]
            stack.enter_context(transient_unit(endpoint, argv, "rfl-guard"))

        yield guard


@pytest.fixture(scope="session")
def set_mode(endpoint: Machine) -> Callable[[str], None]:
    """`set_mode(mode)`: the endpoint's data-plane mode, changed the way an operator would, by
    running the role again (`vagrant provision endpoint` with REFLECTOR_MODE), if it differs."""

    failed: dict[str, str] = {}  # a mode whose provisioning failed is not retried per test

    def switch(mode: str) -> None:
        if mode in failed:
            pytest.fail(
                f"re-provisioning the endpoint in {mode} mode failed earlier:\n{failed[mode]}"
            )
        if current_mode(endpoint) != mode:
            if "VAGRANT_DOTFILE_PATH" not in os.environ:
                pytest.fail("switching modes needs the Vagrant environment of run-tests.sh")
            done = subprocess.run(
                ["vagrant", "provision", "endpoint"],
                env={**os.environ, "REFLECTOR_MODE": mode},
                capture_output=True,
                text=True,
                timeout=PROVISION_TIMEOUT_S,
                check=False,
            )
            if done.returncode != 0:
                failed[mode] = done.stdout[-4000:]
                pytest.fail(f"vagrant provision failed:\n{failed[mode]}")
            assert current_mode(endpoint) == mode
        wait_service_ready(endpoint)

    return switch


@pytest.fixture
def tunneled(set_mode: Callable[[str], None]) -> None:
    set_mode("tunneled")


@pytest.fixture
def direct(set_mode: Callable[[str], None]) -> None:
    set_mode("direct_ephemeral")
