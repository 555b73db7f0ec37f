"""The identity as an operator meets it on a real host: the package installed into its own venv,
`reflector init` and `reflector id` run by an unprivileged system user with no login shell, and
the key protected by the file system (spec §4.1, §4.3: 0600 key, dedicated user account).

The container is an overlay of this machine, so the repository and its venv are visible inside
at the same paths. The package is installed from the repository without a network, into a venv
made by Debian's python3 (which any user may execute, unlike a per-user pyenv build); that venv
finds its dependencies, pip and setuptools in the test run's own site-packages (a .pth line), so
the versions are exactly the ones the unit tests ran with.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reflector.endpoint_id import endpoint_id_from_public_key, public_key_fingerprint

from .harness import SystemdHost, install_package

pytestmark = pytest.mark.system

VENV = "/opt/reflector"
REFLECTOR = f"{VENV}/bin/reflector"
STATE_DIR = "/var/lib/reflector"
KEY_FILE = f"{STATE_DIR}/identity.ed25519"
USER = "reflector"


@dataclass(frozen=True, kw_only=True)
class Initialised:
    """What `reflector init` printed the first time it ran."""

    output: str
    endpoint_id: str


@pytest.fixture(scope="module")
def installed(systemd_host_module: SystemdHost) -> SystemdHost:
    """The container with the package in /opt/reflector and the `reflector` system user."""
    host = systemd_host_module
    install_package(host, VENV)
    host.run(
        [
            "useradd",
            "--system",
            "--shell",
            "/usr/sbin/nologin",
            "--home-dir",
            STATE_DIR,
            "--no-create-home",
            USER,
        ]
    )
    host.run(["install", "-d", "-o", USER, "-g", USER, "-m", "0700", STATE_DIR])
    return host


@pytest.fixture(scope="module")
def initialised(installed: SystemdHost) -> Initialised:
    output = installed.run([REFLECTOR, "init", "--state-dir", STATE_DIR], user=USER).stdout
    ids = [line.split(":", 1)[1].strip() for line in output.splitlines() if "Endpoint ID" in line]
    assert len(ids) == 1, f"init printed no single Endpoint ID line:\n{output}"
    return Initialised(output=output, endpoint_id=ids[0])


def _mode_and_owner(host: SystemdHost, path: str) -> list[str]:
    return host.run(["stat", "-c", "%U %G %a", path]).stdout.split()


def test_the_package_runs_from_its_own_venv_not_the_repository(installed: SystemdHost) -> None:
    where = installed.run(
        [f"{VENV}/bin/python", "-c", "import reflector; print(reflector.__file__)"], user=USER
    ).stdout.strip()
    assert where.startswith(f"{VENV}/lib/")
    version = installed.run([REFLECTOR, "--version"], user=USER).stdout
    assert version.startswith("reflector ")


def test_the_service_user_is_a_system_user_without_a_shell(installed: SystemdHost) -> None:
    entry = installed.run(["getent", "passwd", USER]).stdout.strip().split(":")
    uid, home, shell = int(entry[2]), entry[5], entry[6]
    assert uid < 1000  # a system account (Debian's SYS_UID_MAX is 999)
    assert (home, shell) == (STATE_DIR, "/usr/sbin/nologin")


def test_init_as_the_service_user_creates_a_private_key(
    installed: SystemdHost, initialised: Initialised
) -> None:
    assert "identity created" in initialised.output
    assert KEY_FILE in initialised.output
    assert _mode_and_owner(installed, KEY_FILE) == [USER, USER, "600"]
    assert _mode_and_owner(installed, STATE_DIR) == [USER, USER, "700"]


def test_the_printed_id_is_derived_from_the_key_on_disk(
    installed: SystemdHost, initialised: Initialised
) -> None:
    key = serialization.load_pem_private_key(installed.path(KEY_FILE).read_bytes(), None)
    assert isinstance(key, Ed25519PrivateKey)
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert initialised.endpoint_id.startswith("PP")
    assert initialised.endpoint_id == endpoint_id_from_public_key(raw)


def test_id_and_id_json_agree_with_init(installed: SystemdHost, initialised: Initialised) -> None:
    plain = installed.run([REFLECTOR, "id", "--state-dir", STATE_DIR], user=USER).stdout
    assert plain.strip() == initialised.endpoint_id
    as_json = installed.run([REFLECTOR, "id", "--json", "--state-dir", STATE_DIR], user=USER)
    doc = json.loads(as_json.stdout)
    assert doc["endpoint_id"] == initialised.endpoint_id
    assert doc["key_path"] == KEY_FILE
    raw = (
        serialization.load_pem_private_key(installed.path(KEY_FILE).read_bytes(), None)
        .public_key()
        .public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    )
    assert doc["public_key_sha256"] == public_key_fingerprint(raw)


def test_init_again_keeps_the_identity(installed: SystemdHost, initialised: Initialised) -> None:
    again = installed.run([REFLECTOR, "init", "--state-dir", STATE_DIR], user=USER).stdout
    assert "already present" in again
    assert initialised.endpoint_id in again
    assert _mode_and_owner(installed, KEY_FILE) == [USER, USER, "600"]


def test_another_user_can_neither_read_the_key_nor_use_it(
    installed: SystemdHost, initialised: Initialised
) -> None:
    assert installed.run(["cat", KEY_FILE], user="nobody", check=False).returncode != 0
    denied = installed.run([REFLECTOR, "id", "--state-dir", STATE_DIR], user="nobody", check=False)
    # Refused as an operator error that names the directory (exit 1 or 2), not as a crash.
    assert denied.returncode in {1, 2}
    assert STATE_DIR in denied.stderr
    assert "Traceback" not in denied.stderr
    assert initialised.endpoint_id not in denied.stdout + denied.stderr
