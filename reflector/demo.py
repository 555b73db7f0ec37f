"""`make demo`: the main job end to end on loopback, with temporary state and an embedded config.

1. start `reflector serve` (a real child process) with the embedded config on a free loopback
   port, in tunneled mode;
2. open a pairing window with `reflector pair` and enroll a fresh appliance identity with it;
3. run latency, throughput and bufferbloat through the tunnel and print the results;
4. stop the endpoint with SIGTERM, verify the audit chain, and remove everything it made.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from reflector.client import measure
from reflector.client.link_client import ApplianceIdentity, LinkClient
from reflector.client.report import bufferbloat_table, latency_table, throughput_table
from reflector.link.messages import Pair, PairOk

EMBEDDED_CONFIG = """\
# The demo's embedded config: loopback only, tunneled mode, pairing allowed.
[network]
listen_address = "127.0.0.1:{port}"
mode = "tunneled"

[access]
pairing_enabled = true

[quotas]
max_test_duration_sec = 30

[audit]
journald = "off"
jsonl = true
"""
# Bounds on the demo's own waiting.
START_TIMEOUT_SEC = 10.0
STOP_TIMEOUT_SEC = 10.0


def say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def reflector_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "reflector", *args]


def main() -> int:
    root = Path(tempfile.mkdtemp(prefix="reflector-demo-"))
    server: subprocess.Popen[str] | None = None
    try:
        port = free_port()
        config = root / "reflector.toml"
        config.write_text(EMBEDDED_CONFIG.format(port=port))
        state = root / "endpoint"
        common = ("--config", str(config), "--state-dir", str(state))
        say(f"starting `reflector serve` on 127.0.0.1:{port} (state in {state})")
        server = subprocess.Popen(
            reflector_cmd("serve", *common),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        endpoint_id = wait_for_banner(server)
        say(f"endpoint is up: {endpoint_id}")
        token = open_pairing_window(common)
        say("pairing window open; enrolling a fresh appliance identity")
        asyncio.run(run_tests(("127.0.0.1", port), endpoint_id, root / "appliance", token))
        stop(server)
        server = None
        verify = subprocess.run(
            reflector_cmd("audit", "verify", *common), capture_output=True, text=True, check=False
        )
        say(f"audit trail: {verify.stdout.strip() or verify.stderr.strip()}")
        say("done; removing the demo's temporary state")
        return 0 if verify.returncode == 0 else 1
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(root, ignore_errors=True)


def wait_for_banner(server: subprocess.Popen[str]) -> str:
    assert server.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT_SEC
    while time.monotonic() < deadline:
        line = server.stdout.readline()
        if not line:
            raise SystemExit(f"[demo] the endpoint exited early (code {server.wait()})")
        print(f"    | {line.rstrip()}", flush=True)
        if line.startswith("Endpoint ID:"):
            endpoint_id = line.split(":", 1)[1].strip()
            # The banner is printed once every listener is bound.
            for _ in range(2):
                print(f"    | {server.stdout.readline().rstrip()}", flush=True)
            return endpoint_id
    raise SystemExit("[demo] the endpoint did not start in time")


def open_pairing_window(common: tuple[str, ...]) -> str:
    out = subprocess.run(
        reflector_cmd("pair", "--ttl", "2m", *common), capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if line.startswith("Pairing token:"):
            return line.split(":", 1)[1].strip()
    raise SystemExit("[demo] `reflector pair` printed no token")


async def run_tests(
    endpoint: tuple[str, int], endpoint_id: str, appliance_dir: Path, token: str
) -> None:
    appliance = ApplianceIdentity.open(appliance_dir)
    client = await LinkClient.connect(endpoint, appliance, endpoint_id)
    await client.call(Pair(token=token), PairOk)
    await client.close()
    say(f"appliance {appliance.identity.endpoint_id} paired")
    client = await LinkClient.connect(endpoint, appliance, endpoint_id)
    try:
        say("latency: 3 s of authenticated STAMP probes")
        doc = await measure.latency(client, duration_sec=3, progress=progress)
        print(latency_table(doc), flush=True)
        say("throughput: 3 s of iperf3 through the mTLS tunnel, 2 streams")
        opts = measure.ThroughputOptions(duration_sec=3, streams=2)
        doc = await measure.throughput(client, appliance, opts, progress)
        print(throughput_table(doc), flush=True)
        say("bufferbloat: 2 s idle, then 4 s under load, in one grant")
        opts = measure.ThroughputOptions(duration_sec=4, streams=2)
        doc = await measure.bufferbloat(client, appliance, opts, idle_sec=2, progress=progress)
        print(bufferbloat_table(doc), flush=True)
    finally:
        await client.close()


def progress(text: str) -> None:
    print(f"    … {text}", file=sys.stderr, flush=True)


def stop(server: subprocess.Popen[str]) -> None:
    if server.poll() is None:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(STOP_TIMEOUT_SEC)
        except subprocess.TimeoutExpired:
            os.kill(server.pid, signal.SIGKILL)
            server.wait()
    say(f"endpoint stopped (exit code {server.returncode})")


if __name__ == "__main__":
    raise SystemExit(main())
