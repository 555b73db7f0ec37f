"""A real `reflector serve` on loopback for the benchmark, and an appliance paired with it.

Everything goes through the project's public pieces: the config file, `reflector init`,
`reflector peers add`, `reflector serve` with systemd's readiness protocol (NOTIFY_SOCKET
pointing at a datagram socket bound here), and on the appliance side `ApplianceIdentity`.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks.procs import Processes, free_port
from reflector.client.link_client import ApplianceIdentity

# READY normally comes within a second; a loaded shared machine gets ten times that.
READY_TIMEOUT_S: Final = 10.0
REFLECTOR: Final = str(Path(sys.executable).with_name("reflector"))

# The benchmark's endpoint: limits opened up so that the benchmark itself (many handshakes from
# one address, dozens of tests in an hour) is not what gets measured; everything else default.
CONFIG_TEMPLATE: Final = """\
[network]
listen_address = ["127.0.0.1:{port}"]
data_port_range_start = {data_start}
data_port_range_end = {data_end}
max_connections = 4096
max_connections_per_source = 4096
max_handshakes_per_sec_per_source = 10000

[quotas]
max_tests_per_hour_per_peer = 10000
max_bytes_per_day_per_peer = 1000000000000000
max_test_duration_sec = 120

[iperf3]
max_streams = 8

[audit]
journald = "off"
"""
# A data-port range of its own, away from iperf3's default 5201 that other tests may use.
DATA_PORT_SPAN: Final = 50


@dataclass
class Endpoint:
    """A configured endpoint (state dir, config, identity) that can be started many times."""

    root: Path
    port: int
    endpoint_id: str
    appliance: ApplianceIdentity

    @property
    def config(self) -> Path:
        return self.root / "reflector.toml"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    @classmethod
    def create(cls, root: Path) -> Endpoint:
        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        data_start = random.randrange(30000, 40000)
        text = CONFIG_TEMPLATE.format(
            port=port, data_start=data_start, data_end=data_start + DATA_PORT_SPAN - 1
        )
        (root / "reflector.toml").write_text(text)
        state = root / "state"
        out = _cli("init", "--config", str(root / "reflector.toml"), "--state-dir", str(state))
        endpoint_id = out.rsplit("Endpoint ID:", 1)[1].split()[0]
        appliance = ApplianceIdentity.open(root / "appliance")
        _cli(
            "peers",
            "add",
            appliance.identity.endpoint_id,
            "--config",
            str(root / "reflector.toml"),
            "--state-dir",
            str(state),
        )
        return cls(root=root, port=port, endpoint_id=endpoint_id, appliance=appliance)

    def start(self, procs: Processes) -> tuple[subprocess.Popen[bytes], float]:
        """Run `reflector serve`; return it and the seconds from spawn to READY=1."""
        sock_path = self.root / f"notify-{time.monotonic_ns()}.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(sock_path))
            env = {**os.environ, "NOTIFY_SOCKET": str(sock_path)}
            started = time.monotonic()
            proc = procs.start(
                [
                    REFLECTOR,
                    "serve",
                    "--config",
                    str(self.config),
                    "--state-dir",
                    str(self.state_dir),
                ],
                env=env,
            )
            ready = _wait_ready(notify, proc, started)
        sock_path.unlink(missing_ok=True)
        return proc, ready - started


def _wait_ready(notify: socket.socket, proc: subprocess.Popen[bytes], started: float) -> float:
    while True:
        left = started + READY_TIMEOUT_S - time.monotonic()
        if left <= 0:
            raise RuntimeError(f"reflector serve sent no READY=1 within {READY_TIMEOUT_S:g} s")
        if proc.poll() is not None:
            raise RuntimeError(f"reflector serve exited with {proc.returncode} before READY=1")
        notify.settimeout(min(left, 0.5))
        try:
            data = notify.recv(4096)
        except TimeoutError:
            continue
        if b"READY=1" in data.split(b"\n"):
            return time.monotonic()


def _cli(*args: str) -> str:
    done = subprocess.run([REFLECTOR, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"reflector {' '.join(args)}: {done.stderr.strip()}")
    return done.stdout
