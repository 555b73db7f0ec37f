"""Provisioning a host the way an operator does: a wheelhouse, the Ansible role, testinfra.

Why this exists: the role is only proven by running it on a real systemd host, and its result is
only proven by looking at the host as an operator would. The booted container of the harness is
that host; Ansible runs inside it with the local connection (the container has the machine's
ansible-core through the overlay of /), exactly as it would on a VPS it had been copied to. The
controller's files (the role, the units, the wheelhouse) are paths inside the container.

testinfra has no backend for "a process tree entered with nsenter", so `ContainerBackend` adds
one: every command testinfra runs goes through `SystemdHost`'s nsenter prefix, with the same
clean environment the harness uses for its own commands.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import testinfra
from testinfra.backend import base

from .harness import REPO_ROOT, SystemdHost

__all__ = [
    "ANSIBLE_DIR",
    "ContainerBackend",
    "PlayRecap",
    "build_wheelhouse",
    "container_infra",
    "run_playbook",
]

ANSIBLE_DIR = REPO_ROOT / "ansible"
# Building the wheelhouse (the package plus every dependency's wheel, from pip's cache and the
# configured package index) takes about 15 s; five minutes means pip is stuck.
WHEELHOUSE_TIMEOUT_S = 300.0
# A first run (venv, ensurepip, installing ~20 wheels, starting the service) takes about 40 s
# on the 2-core machines; a second, idempotent run about 10 s.
PLAYBOOK_TIMEOUT_S = 240.0
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
        raise AssertionError(f"ansible-playbook exited with {result.returncode}:\n{output}")
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
