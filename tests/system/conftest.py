"""Pytest fixtures for system tests: booted systemd containers and peer network namespaces.

A machine that cannot run these tests (not root, no systemd-nspawn) makes them FAIL with the
reason, so CI can never go green by silently skipping them; only with
REFLECTOR_ALLOW_SKIP_SYSTEM=1 (a developer laptop) do they skip. When a test that used a
container fails, the container's journal goes to test-artifacts/<test name>/journal.txt and its
tail is printed into the report.

Fixtures:
- `systemd_host`: a container booted once per test module and shared by its tests (about 3 s).
- `systemd_host_module`: the same container, for module-scoped setup fixtures.
- `fresh_systemd_host`: a container for one test; `systemd_host_factory`: several.
- `netns_pair`: endpoint and peer namespaces on this machine; `container_netns_pair`: the same
  inside the shared container. Both are `harness.NetnsPair` (`add_peer`, `run_in`, `ping`).
- `require_systemd`, `require_netns`: for tests that use the harness's context managers directly.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Generator, Iterator
from contextlib import ExitStack

import pytest

from . import harness
from .harness import (
    ALLOW_SKIP_ENV,
    NetnsPair,
    SystemdHost,
    artifact_dir_for,
    journal_tail,
    missing_prerequisites,
    save_journal,
)

_PHASE_REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM'd run still tears down its containers and namespaces (see the harness)."""
    harness.interrupt_on_sigterm()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """Keep each phase's report on the item, so fixtures can tell in teardown if it failed."""
    report = yield
    item.stash.setdefault(_PHASE_REPORTS, {})[report.when] = report
    return report


def require_system(*, need_systemd: bool) -> None:
    """Fail (or, where explicitly allowed, skip) when this machine cannot run system tests."""
    problems = missing_prerequisites(need_systemd=need_systemd)
    if not problems:
        return
    message = (
        "system tests cannot run on this machine: "
        + "; ".join(problems)
        + f". Run them as root on a machine with systemd-container installed, or set"
        f" {ALLOW_SKIP_ENV}=1 to skip them on a developer machine."
    )
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@pytest.fixture
def require_systemd() -> None:
    """For tests that boot containers themselves: fail here first if the machine cannot."""
    require_system(need_systemd=True)


@pytest.fixture
def require_netns() -> None:
    """For tests that build network namespaces themselves."""
    require_system(need_systemd=False)


def _test_failed(request: pytest.FixtureRequest) -> bool:
    reports = request.node.stash.get(_PHASE_REPORTS, {})
    return any(report.failed for report in reports.values())


def _keep_journal_if_failed(
    request: pytest.FixtureRequest, host: SystemdHost, filename: str = "journal.txt"
) -> None:
    if not _test_failed(request):
        return
    path = save_journal(host, artifact_dir_for(request.node.name), filename=filename)
    text = path.read_text()
    print(f"\n=== journal of container {host.machine} (saved to {path}), last lines ===")
    print(journal_tail(text))


@pytest.fixture(autouse=True)
def _journal_of_shared_container_on_failure(request: pytest.FixtureRequest) -> Iterator[None]:
    """Any test that used the module's container, even through another fixture, keeps its
    journal when it fails."""
    if "systemd_host_module" not in request.fixturenames:
        yield
        return
    host: SystemdHost = request.getfixturevalue("systemd_host_module")
    yield
    _keep_journal_if_failed(request, host)


@pytest.fixture(scope="module")
def systemd_host_module(request: pytest.FixtureRequest) -> Iterator[SystemdHost]:
    """The container behind `systemd_host`, for module-scoped setup fixtures (an install, say).

    Booted once per test module; its journal is saved for every test that fails while using it.
    """
    require_system(need_systemd=True)
    artifacts = artifact_dir_for(f"{request.module.__name__}-boot")
    with harness.systemd_host(name="rfl", artifacts_dir=artifacts) as host:
        print(f"\ncontainer {host.machine} booted in {host.boot_seconds:.1f} s")
        yield host


@pytest.fixture
def systemd_host(systemd_host_module: SystemdHost) -> SystemdHost:
    """A booted container shared by the tests of one module (state carries over between them)."""
    return systemd_host_module


@pytest.fixture
def fresh_systemd_host(request: pytest.FixtureRequest) -> Iterator[SystemdHost]:
    """A container booted for this test alone (about 3 s), for tests that need a clean host."""
    require_system(need_systemd=True)
    with harness.systemd_host(name="rfl") as host:
        yield host
        _keep_journal_if_failed(request, host)


@pytest.fixture
def netns_pair() -> Iterator[NetnsPair]:
    """Endpoint and peer namespaces on this machine (no systemd involved)."""
    require_system(need_systemd=False)
    with harness.netns_pair() as pair:
        yield pair


@pytest.fixture
def container_netns_pair(systemd_host: SystemdHost) -> Iterator[NetnsPair]:
    """Endpoint and peer namespaces inside the module's shared container."""
    with harness.netns_pair(systemd_host) as pair:
        yield pair


@pytest.fixture
def systemd_host_factory(
    request: pytest.FixtureRequest,
) -> Iterator[Callable[[], SystemdHost]]:
    """Boot as many fresh containers as a test needs (e.g. two hosts); all torn down after it."""
    require_system(need_systemd=True)
    hosts: list[SystemdHost] = []
    with ExitStack() as stack:

        def boot() -> SystemdHost:
            host = stack.enter_context(harness.systemd_host(name="rfl"))
            hosts.append(host)
            return host

        yield boot
        for host in hosts:
            _keep_journal_if_failed(request, host, filename=f"journal-{host.machine}.txt")
