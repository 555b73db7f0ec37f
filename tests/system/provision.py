"""Provisioning a host the way an operator does: a release, the Ansible role, testinfra.

Why this exists: the role is only proven by running it on a real systemd host, and its result is
only proven by looking at the host as an operator would. The booted container of the harness is
that host; Ansible runs inside it with the local connection (the container has the machine's
ansible-core through the overlay of /), exactly as it would on a VPS it had been copied to. The
controller's files (the role, the units, the wheelhouse) are paths inside the container.

testinfra has no backend for "a process tree entered with nsenter", so `ContainerBackend` adds
one: every command testinfra runs goes through `SystemdHost`'s nsenter prefix, with the same
clean environment the harness uses for its own commands.

The appliance side is shared by the provisioning tests too: an appliance identity, a network
namespace joined to the host by a veth (RFC 5737 TEST-NET-1), and `reflector client` runs from it
against the provisioned endpoint. So is a throwaway minisign release key.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testinfra
from testinfra.backend import base

from .harness import REPO_ROOT, SystemdHost

__all__ = [
    "ANSIBLE_DIR",
    "APPLIANCE_CLI",
    "CLIENT_TIMEOUT_S",
    "CONFIG_FILE",
    "ENDPOINT_ADDR",
    "ContainerBackend",
    "PlayRecap",
    "appliance_id",
    "appliance_namespace",
    "build_wheelhouse",
    "container_infra",
    "endpoint_id",
    "minisign_keypair",
    "run_appliance",
    "run_playbook",
    "unit_properties",
]

ANSIBLE_DIR = REPO_ROOT / "ansible"
# Building the wheelhouse (the package plus every dependency's wheel, from pip's cache and the
# configured package index) takes about 15 s; five minutes means pip is stuck.
WHEELHOUSE_TIMEOUT_S = 300.0
# A first run (venv, ensurepip, installing ~20 wheels, starting the service) takes about 40 s
# on the 2-core machines; a second, idempotent run about 10 s.
PLAYBOOK_TIMEOUT_S = 240.0
# The config the role writes (fixed by the units' ExecStart=).
CONFIG_FILE = "/etc/reflector/reflector.toml"
# The appliance runs the repository's own client, as a separately installed appliance would.
APPLIANCE_CLI = str(REPO_ROOT / ".venv" / "bin" / "reflector")
APPLIANCE_STATE = "/root/appliance"
# The appliance's namespace and the veth between it and the endpoint host (RFC 5737 TEST-NET-1).
APPLIANCE_NS = "appliance"
APPLIANCE_VETH = "rfl-app"
ENDPOINT_ADDR = "192.0.2.1"
APPLIANCE_ADDR = "192.0.2.2"
# One client run: a few seconds of measurement plus the handshake; a minute means it hangs.
CLIENT_TIMEOUT_S = 60.0
# Lines of the units' journal shown with a failed play: a start-up and its error fit.
FAILED_PLAY_JOURNAL_LINES = 60
_UNIT_FILTER = ("-u", "reflector.service", "-u", "reflector-privd.service")
# What pip needs to build the package: nothing else from the repository goes into the wheel.
_SOURCE_ITEMS = ("pyproject.toml", "README.md", "reflector")

_RECAP_RE = re.compile(
    r"^(?P<host>\S+)\s*:\s*ok=(?P<ok>\d+)\s+changed=(?P<changed>\d+)\s+"
    r"unreachable=(?P<unreachable>\d+)\s+failed=(?P<failed>\d+)",
    re.MULTILINE,
)


def build_wheelhouse(dest: Path) -> list[Path]:
    """Build reflector's wheel and a wheel of each dependency into `dest`; return the wheels.

    The package is built from a copy of its sources, so no build/ or egg-info directory lands
    in the working tree while other engineers use it.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="reflector-src-") as tmp:
        source = Path(tmp) / "reflector"
        source.mkdir()
        for item in _SOURCE_ITEMS:
            origin = REPO_ROOT / item
            if origin.is_dir():
                ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
                shutil.copytree(origin, source / item, ignore=ignore)
            else:
                shutil.copy2(origin, source / item)
        cmd = [sys.executable, "-m", "pip", "wheel", "--quiet", "--wheel-dir", str(dest)]
        subprocess.run(
            [*cmd, f"{source}[system]"],
            check=True,
            capture_output=True,
            text=True,
            timeout=WHEELHOUSE_TIMEOUT_S,
        )
    wheels = sorted(dest.glob("*.whl"))
    if not any(w.name.startswith("reflector-") for w in wheels):
        raise RuntimeError(f"pip wheel built no reflector wheel in {dest}")
    return wheels


@dataclass(frozen=True, kw_only=True)
class PlayRecap:
    """The PLAY RECAP line of one host, and the whole output for failure messages."""

    ok: int
    changed: int
    unreachable: int
    failed: int
    output: str


def run_playbook(
    host: SystemdHost, extra_vars: dict[str, Any], *, tag: str, check: bool = True
) -> PlayRecap:
    """Run ansible/playbook.yml inside the container against itself (local connection).

    `extra_vars` go through a JSON file, so lists and booleans keep their types. With `check`,
    raises with the whole output when the play fails, since that output is the only diagnosis
    there is; without, a failed play's recap is returned (for tests of refusals).
    """
    vars_file = f"/root/reflector-vars-{tag}.json"
    inventory = "/root/reflector-inventory.ini"
    host.write_file(vars_file, json.dumps(extra_vars), mode=0o600)
    host.write_file(
        inventory,
        "[reflector]\nlocalhost ansible_connection=local"
        " ansible_python_interpreter=/usr/bin/python3\n",
        mode=0o600,
    )
    script = (
        f"cd {shlex.quote(str(ANSIBLE_DIR))} && "
        "ANSIBLE_CONFIG=ansible.cfg ANSIBLE_NOCOLOR=1 ANSIBLE_FORCE_COLOR=0"
        f" ansible-playbook -i {inventory} -e @{vars_file} playbook.yml"
    )
    result = host.run(script, check=False, timeout=PLAYBOOK_TIMEOUT_S)
    output = result.stdout + result.stderr
    match = _RECAP_RE.search(result.stdout)
    if match is None or (check and result.returncode != 0):
        # The play says only "timeout" or "failed" about a unit; its journal says why.
        units = host.journal("-n", str(FAILED_PLAY_JOURNAL_LINES), *_UNIT_FILTER)
        raise AssertionError(
            f"ansible-playbook exited with {result.returncode}:\n{output}\n"
            f"--- journal of Reflector's units, last lines:\n{units}"
        )
    counts = {key: int(match.group(key)) for key in ("ok", "changed", "unreachable", "failed")}
    return PlayRecap(output=output, **counts)


class ContainerBackend(base.BaseBackend):  # type: ignore[misc]
    """A testinfra backend that runs each command inside a booted harness container."""

    NAME = "nspawn"

    def __init__(self, host: SystemdHost, **kwargs: Any) -> None:
        self.container = host
        super().__init__(host.machine, **kwargs)

    def run(self, command: str, *args: str, **kwargs: Any) -> base.CommandResult:
        shell_command = self.get_command(command, *args)
        # The harness's own nsenter prefix and clean environment (private, so one source).
        argv = self.container._argv(shell_command, None)
        out = self.run_local(" ".join(shlex.quote(a) for a in argv))
        out.command = self.encode(shell_command)
        return out


def container_infra(host: SystemdHost) -> Any:
    """A `testinfra.host.Host` whose modules (file, user, service, socket...) see the container."""
    return testinfra.host.Host(ContainerBackend(host))


def unit_properties(host: SystemdHost, unit: str, *props: str) -> dict[str, str]:
    """`systemctl show` of `props`, as a dict (what systemd really runs, not the unit file)."""
    out = host.run(["systemctl", "show", unit, "-p", ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def endpoint_id(host: SystemdHost) -> str:
    """The provisioned endpoint's ID, read as the service user reads its own identity."""
    return host.run(
        ["/usr/local/bin/reflector", "id", "--config", CONFIG_FILE], user="reflector"
    ).stdout.strip()


def appliance_id(host: SystemdHost) -> str:
    """Create (once) the appliance's identity in the container and return its ID, so the
    operator can put it in the allowlist before provisioning."""
    return host.run([APPLIANCE_CLI, "client", "id", "--state-dir", APPLIANCE_STATE]).stdout.strip()


@contextmanager
def appliance_namespace(host: SystemdHost) -> Iterator[str]:
    """A network namespace for the appliance, joined to the host by a veth (192.0.2.0/24)."""
    host.run(
        [
            "/bin/sh",
            "-ec",
            f"ip netns add {APPLIANCE_NS}\n"
            f"ip link add {APPLIANCE_VETH} type veth peer name eth0 netns {APPLIANCE_NS}\n"
            f"ip addr add {ENDPOINT_ADDR}/24 dev {APPLIANCE_VETH}\n"
            f"ip link set {APPLIANCE_VETH} up\n"
            f"ip -n {APPLIANCE_NS} link set lo up\n"
            f"ip -n {APPLIANCE_NS} addr add {APPLIANCE_ADDR}/24 dev eth0\n"
            f"ip -n {APPLIANCE_NS} link set eth0 up\n",
        ]
    )
    try:
        yield APPLIANCE_NS
    finally:
        host.run(f"ip netns del {APPLIANCE_NS}; ip link del {APPLIANCE_VETH}", check=False)


def run_appliance(
    host: SystemdHost, ns: str, port: int, command: str, *extra: str
) -> dict[str, Any]:
    """Run `reflector client COMMAND --json` from the appliance's namespace against the
    provisioned endpoint (pinned to its Endpoint ID); return the JSON report."""
    argv = [
        "ip",
        "netns",
        "exec",
        ns,
        APPLIANCE_CLI,
        "client",
        command,
        "-e",
        f"{ENDPOINT_ADDR}:{port}",
        "--expect-id",
        endpoint_id(host),
        "--state-dir",
        APPLIANCE_STATE,
        "--json",
        *extra,
    ]
    result = host.run(argv, check=False, timeout=CLIENT_TIMEOUT_S)
    assert result.returncode == 0, (
        f"{shlex.join(argv)} exited with {result.returncode}:\n{result.stdout}\n{result.stderr}"
    )
    doc: dict[str, Any] = json.loads(result.stdout)
    return doc


def minisign_keypair(directory: Path, name: str) -> tuple[Path, str]:
    """A password-less minisign key pair made by the real tool: (secret key file, the public
    key's base64 line, which is what the role's reflector_minisign_public_key takes)."""
    secret, public = directory / f"{name}.key", directory / f"{name}.pub"
    subprocess.run(
        ["minisign", "-G", "-W", "-p", str(public), "-s", str(secret)],
        check=True,
        capture_output=True,
    )
    return secret, public.read_text().splitlines()[1].strip()
