"""Root at the command line, the service as its own user: the state stays the service's.

On a deployed host the state dir belongs to `reflector` (0700) and the service runs as that
user, while the operator runs `reflector pair`, `peers add`, `rotate-identity` or `status` as
root. Every file those commands create there must belong to the dir's owner, or the service can
no longer read its own allowlist, pairing window or key. Here `nobody` plays the service user:
the service's part runs as nobody (setpriv), the operator's part as root.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from reflector.endpoint_id import endpoint_id_from_public_key

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to play both users")

NOBODY_UID = 65534
NOGROUP_GID = 65534
APPLIANCE = endpoint_id_from_public_key(bytes(range(32)))
AS_NOBODY = ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups"]


@pytest.fixture
def state(shared_tmp: Path) -> Path:
    """A service-owned state dir (nobody:nogroup, 0700) in a directory nobody may traverse."""
    path = shared_tmp / "state"
    path.mkdir(mode=0o700)
    os.chown(path, NOBODY_UID, NOGROUP_GID)
    return path


def as_nobody(code: str) -> subprocess.CompletedProcess[str]:
    """Run Python `code` as the service user would: nobody, no supplementary groups."""
    return subprocess.run(
        [*AS_NOBODY, sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=Path(__file__).resolve().parents[2],
    )


def as_root(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reflector", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def service_has_run(state: Path) -> None:
    """What the deployed service leaves behind: its key, its audit file and its ledger."""
    done = as_nobody(
        "from pathlib import Path\n"
        "from reflector.audit import open_audit_log\n"
        "from reflector.identity import load_or_create_identity\n"
        "from reflector.sessions import clock\n"
        "from reflector.sessions.accounting import UsageStore\n"
        f"state = Path({str(state)!r})\n"
        "identity, _ = load_or_create_identity(state / 'identity.ed25519')\n"
        "log = open_audit_log(state, identity.endpoint_id, 'off', True)\n"
        "log.emit('service_start')\n"
        "log.close()\n"
        "with UsageStore.open(state) as ledger:\n"
        f"    ledger.record_start(session_id='s1', peer_id={APPLIANCE!r},"
        " test_type='udp_echo', started=clock.now())\n"
    )
    assert done.returncode == 0, done.stderr


def owners(state: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_uid, p.stat().st_gid) for p in sorted(state.iterdir())}


def test_root_commands_leave_every_state_file_to_the_service_user(state: Path) -> None:
    service_has_run(state)
    config = state.parent / "reflector.toml"
    config.write_text('[access]\npairing_enabled = true\n[audit]\njournald = "off"\n')
    common = ("--config", str(config), "--state-dir", str(state))
    for command in (
        ("peers", "add", APPLIANCE),
        ("pair", "--ttl", "10m"),
        ("rotate-identity", "--yes"),
        ("status", "--json"),
    ):
        done = as_root(*command, *common)
        assert done.returncode == 0, (command, done.stderr)
    names = set(owners(state))
    assert {"peers.jsonl", "pairing.json", "identity-history.jsonl", "audit.jsonl"} <= names
    assert any(name.startswith("identity.ed25519.") for name in names)  # the key backup
    assert {n: o for n, o in owners(state).items() if o != (NOBODY_UID, NOGROUP_GID)} == {}


def test_the_service_user_can_read_what_root_wrote(state: Path) -> None:
    service_has_run(state)
    config = state.parent / "reflector.toml"
    config.write_text('[access]\npairing_enabled = true\n[audit]\njournald = "off"\n')
    common = ("--config", str(config), "--state-dir", str(state))
    assert as_root("peers", "add", APPLIANCE, *common).returncode == 0
    assert as_root("rotate-identity", "--yes", *common).returncode == 0
    assert as_root("pair", "--ttl", "10m", *common).returncode == 0
    new_id = as_root("id", *common).stdout.strip()
    done = as_nobody(
        "import json\n"
        "from pathlib import Path\n"
        "from reflector.access import pairing\n"
        "from reflector.access.peers import PeerStore\n"
        "from reflector.audit import verify_chain\n"
        "from reflector.identity import load_identity\n"
        f"state = Path({str(state)!r})\n"
        "print(json.dumps({\n"
        "    'peers': sorted(PeerStore(state).current()),\n"
        "    'pairing_open': pairing.read_window(state) is not None,\n"
        "    'identity': load_identity(state / 'identity.ed25519').endpoint_id,\n"
        "    'audit_ok': verify_chain(state / 'audit.jsonl').ok,\n"
        "}))\n"
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {
        "peers": [APPLIANCE],
        "pairing_open": True,
        "identity": new_id,
        "audit_ok": True,
    }


def test_the_service_starts_after_root_ran_the_first_command_ever(state: Path) -> None:
    """Root's `peers add` on a state dir the service has never used (so root creates the key,
    the audit file and all); the service user then opens everything it needs."""
    config = state.parent / "reflector.toml"
    config.write_text('[audit]\njournald = "off"\n')
    done = as_root("peers", "add", APPLIANCE, "--config", str(config), "--state-dir", str(state))
    assert done.returncode == 0, done.stderr
    assert {n: o for n, o in owners(state).items() if o != (NOBODY_UID, NOGROUP_GID)} == {}
    service_has_run(state)  # as nobody: the key, the audit file, the ledger
