"""Provisioning with the role's default install method: the signed single binary (issue 9 item 3,
issue 7, spec §9.3, §10).

This is the production path end to end. The binary is the one `.ci/build-binary.sh` builds (the
cached build of test_binary.py, shared so a CI run builds it once); the release manifest is
written and signed by `.ci/release_manifest.py` with the real `minisign` and a throwaway key.
The play runs in a fresh booted systemd container without `reflector_install_method`, so it
proves the default too. Then: the command the units run is byte for byte the artifact the
manifest signed, it starts as the service user, the service is READY and says who it is, the
privileged helper starts engines for an appliance in a peer namespace, self-update stays off as
the role's default says, and a second play changes nothing.

The tests share one provisioned host and run in file order; the last one re-runs the play.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from reflector import __version__

from . import test_binary
from .harness import REPO_ROOT, SystemdHost
from .provision import (
    CONFIG_FILE,
    PlayRecap,
    appliance_id,
    appliance_namespace,
    endpoint_id,
    minisign_keypair,
    run_appliance,
    run_playbook,
    unit_properties,
)

pytestmark = [pytest.mark.system, pytest.mark.slow]

# The single binary for this source tree: test_binary.py's module fixture, reused here (not
# copied) so both modules share one build function and one cache key (the hash of the sources).
binary = test_binary.binary

CONTROL_PORT = 4000
# Paths inside the container: where the operator put the release (the controller side), and
# where the role keeps the verified executable that /usr/local/bin/reflector links to.
RELEASE_DIR = "/srv/reflector-release"
COMMAND = "/usr/local/bin/reflector"
INSTALLED = "/opt/reflector/bin/reflector"
# Where the role stages the verified release and the trusted key (roles/reflector/vars/main.yml).
STAGED = "/opt/reflector/release"
# A couple of seconds each is enough to prove the path works; quality is measured elsewhere.
MEASURE_SECONDS = 2
# Writing and signing the manifest hashes ~25 MB; a minute means minisign waits for a password.
MANIFEST_TIMEOUT_S = 60.0


@dataclass(frozen=True, kw_only=True)
class Release:
    """A signed release directory on the machine, as an operator receives it."""

    manifest: Path
    public_key: str
    sha256: str


@dataclass(frozen=True, kw_only=True)
class Provisioned:
    """The provisioned host, the variables it was provisioned with and the first run's recap."""

    host: SystemdHost
    extra_vars: dict[str, Any]
    first_run: PlayRecap


@pytest.fixture(scope="module")
def release(binary: Path, tmp_path_factory: pytest.TempPathFactory) -> Release:
    """The cached binary in a release directory with a manifest signed by a throwaway key, made
    by the release tooling itself (.ci/release_manifest.py and the minisign tool)."""
    keys = tmp_path_factory.mktemp("release-key")
    secret, public = minisign_keypair(keys, "release")
    directory = tmp_path_factory.mktemp("release")
    artifact = Path(shutil.copy2(binary, directory / binary.name))
    done = subprocess.run(
        [
            sys.executable,
            str(REPO_ROOT / ".ci" / "release_manifest.py"),
            "--key",
            str(secret),
            "--out",
            str(directory),
            str(artifact),
        ],
        capture_output=True,
        text=True,
        timeout=MANIFEST_TIMEOUT_S,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, f"release_manifest.py failed:\n{done.stdout}\n{done.stderr}"
    manifest = directory / f"reflector-{__version__}.json"
    assert (directory / f"{manifest.name}.minisig").is_file(), done.stdout
    sha256 = hashlib.sha256(artifact.read_bytes()).hexdigest()
    return Release(manifest=manifest, public_key=public, sha256=sha256)


@pytest.fixture(scope="module")
def provisioned(systemd_host_module: SystemdHost, release: Release) -> Provisioned:
    host = systemd_host_module
    host.copy_in(release.manifest.parent, RELEASE_DIR)
    # No reflector_install_method: the default must be the signed binary.
    extra_vars = {
        "reflector_release_manifest_src": f"{RELEASE_DIR}/{release.manifest.name}",
        "reflector_minisign_public_key": release.public_key,
        "reflector_control_port": CONTROL_PORT,
        "reflector_authorized_peers": [appliance_id(host)],
    }
    recap = run_playbook(host, extra_vars, tag="binary-first")
    return Provisioned(host=host, extra_vars=extra_vars, first_run=recap)


@pytest.fixture(scope="module")
def appliance_ns(provisioned: Provisioned) -> Iterator[str]:
    with appliance_namespace(provisioned.host) as ns:
        yield ns


def test_the_first_run_installs_the_release_and_succeeds(provisioned: Provisioned) -> None:
    recap = provisioned.first_run
    assert (recap.failed, recap.unreachable) == (0, 0)
    assert recap.changed > 0, recap.output
    # The play went through the binary method's verification (the default method).
    assert "TASK [reflector : Verify the manifest's signature with the trusted key]" in recap.output


def test_the_command_is_the_artifact_the_manifest_signed(
    provisioned: Provisioned, release: Release
) -> None:
    host = provisioned.host
    assert host.run(["readlink", "-f", COMMAND]).stdout.strip() == INSTALLED
    installed = host.run(["sha256sum", INSTALLED]).stdout.split()[0]
    signed = json.loads(release.manifest.read_text())["artifacts"]
    assert [a["sha256"] for a in signed] == [release.sha256]
    assert installed == release.sha256
    # The default method installed no venv: the binary carries its own Python.
    venv_python = host.path("/opt/reflector/bin/python")
    assert not (venv_python.exists() or venv_python.is_symlink())
    assert not host.path("/opt/reflector/wheelhouse").exists()


def test_the_binary_runs_as_the_service_user(provisioned: Provisioned) -> None:
    out = provisioned.host.run([COMMAND, "--version"], user="reflector").stdout
    assert f"reflector {__version__} (" in out, out
    assert "single-binary: yes" in out, out


def test_the_service_runs_the_binary_and_is_ready(provisioned: Provisioned) -> None:
    host = provisioned.host
    props = unit_properties(
        host,
        "reflector.service",
        "ActiveState",
        "SubState",
        "Type",
        "UnitFileState",
        "MainPID",
        "StatusText",
    )
    assert (props["ActiveState"], props["SubState"]) == ("active", "running"), props
    assert (props["Type"], props["UnitFileState"]) == ("notify", "enabled")
    # systemd runs a Type=notify unit as active/running only after READY=1; the STATUS= text
    # comes from the same process and names the endpoint.
    assert endpoint_id(host) in props["StatusText"], props
    exe = host.run(["readlink", f"/proc/{props['MainPID']}/exe"]).stdout.strip()
    assert exe == INSTALLED


def test_self_update_is_off_on_a_host_the_role_manages(provisioned: Provisioned) -> None:
    """The role's updates switch (default off: the play is how releases roll out) reaches the
    config, and self-update, asked even only to check, refuses before fetching anything."""
    host = provisioned.host
    shown = host.run([COMMAND, "config", "show", "--config", CONFIG_FILE]).stdout
    updates = shown.split("[updates]", 1)[1].split("\n[", 1)[0]
    assert "enabled = false" in updates
    assert f'public_key_path = "{STAGED}/minisign.pub"' in updates
    manifest = f"{STAGED}/reflector-{__version__}.json"
    argv = [COMMAND, "self-update", "--check", "--manifest", manifest, "--config", CONFIG_FILE]
    result = host.run(argv, check=False)
    assert result.returncode == 2, result
    assert "self-update is disabled on this host" in result.stderr, result


def test_an_authorized_appliance_measures_latency_through_the_endpoint(
    provisioned: Provisioned, appliance_ns: str
) -> None:
    doc = run_appliance(
        provisioned.host, appliance_ns, CONTROL_PORT, "latency", "-t", str(MEASURE_SECONDS)
    )
    latency = doc["latency"]
    assert latency["sent"] > 0 and latency["received"] == latency["sent"], doc
    assert 0 < latency["rtt"]["min_ms"] <= latency["rtt"]["max_ms"]


def test_the_helper_runs_a_throughput_engine_for_the_appliance(
    provisioned: Provisioned, appliance_ns: str
) -> None:
    host = provisioned.host
    doc = run_appliance(host, appliance_ns, CONTROL_PORT, "throughput", "-t", str(MEASURE_SECONDS))
    assert doc["mode"] == "tunneled"
    theirs = doc["endpoint"]
    assert "error" not in theirs, theirs
    assert theirs["bytes_transferred"] > 0
    # The engine was started by the privileged helper, which is the same binary.
    helper = unit_properties(host, "reflector-privd.service", "ActiveState", "MainPID")
    assert helper["ActiveState"] == "active", helper
    exe = host.run(["readlink", f"/proc/{helper['MainPID']}/exe"]).stdout.strip()
    assert exe == INSTALLED


def test_a_second_run_changes_nothing(provisioned: Provisioned) -> None:
    recap = run_playbook(provisioned.host, provisioned.extra_vars, tag="binary-second")
    assert (recap.changed, recap.failed) == (0, 0), recap.output


# The unit's WatchdogSec=: systemd kills a service that does not ping within it.
WATCHDOG_SEC = 30


def test_the_binary_service_outlives_its_watchdog(provisioned: Provisioned) -> None:
    """The pings come from the bootloader's child (see server/notify.py), and systemd takes them.

    A single binary that never pinged would be killed and restarted every WatchdogSec.
    """
    host = provisioned.host
    before = unit_properties(
        host, "reflector.service", "MainPID", "NRestarts", "ActiveEnterTimestampMonotonic"
    )
    # CLOCK_MONOTONIC is the kernel's, shared with the container's systemd.
    active_for = time.monotonic() - int(before["ActiveEnterTimestampMonotonic"]) / 1e6
    time.sleep(max(0.0, WATCHDOG_SEC * 1.3 - active_for))
    after = unit_properties(
        host, "reflector.service", "ActiveState", "MainPID", "NRestarts", "WatchdogTimestamp"
    )
    assert after["ActiveState"] == "active", after
    assert (after["MainPID"], after["NRestarts"]) == (before["MainPID"], before["NRestarts"])
    assert after["WatchdogTimestamp"], after  # systemd has taken a WATCHDOG=1
