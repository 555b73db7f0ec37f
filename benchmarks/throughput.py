"""Tunneled TCP throughput: Reflector's tunnel vs a pair of stunnel relays vs direct iperf3.

Three paths to the same kind of iperf3 server, measured in turn within each run so that a noisy
neighbour hits all three alike:
- direct: iperf3 client → iperf3 server (no TLS): the machine's ceiling;
- stunnel: iperf3 client → stunnel (client mode) → TLS 1.3 mTLS → stunnel (server) → iperf3;
- Reflector: iperf3 client → the appliance's tunnel (`TunnelClient`, through the client's
  `measure.throughput`) → TLS 1.3 mTLS → the endpoint's relay → the session's iperf3 server.
Both TLS paths use Ed25519 certificates both ways and AES-256-GCM, so they do the same crypto.
The serving side's CPU (the `reflector serve` process; stunnel's server process) is read from
/proc before and after each test and divided by the bytes it relayed.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks.context import Context
from benchmarks.core import Figure, Summary, at_most, ratio_at_least
from benchmarks.procs import cpu_seconds, free_port, progress, wait_tcp_port
from reflector.client import measure
from reflector.client.link_client import LinkClient

# (streams, reverse): 1 and 4 streams, upload and download, as the issue lists them.
CONFIGS: Final = ((1, False), (4, False), (1, True), (4, True))
# The targets: ≥ 1.1x the stunnel pair, ≤ 0.9 CPU-s per GB on the endpoint side.
THROUGHPUT_RATIO_TARGET: Final = 1.1
CPU_PER_GB_TARGET: Final = 0.9
# An iperf3 client that has not finished well after its duration is stuck: give up on it.
IPERF_GRACE_S: Final = 20
# TLS 1.3 suite both TLS paths use (Python's and OpenSSL's first choice with AES-NI).
CIPHERSUITE: Final = "TLS_AES_256_GCM_SHA384"

STUNNEL_CONF: Final = """\
foreground = yes
pid =
debug = 3
[bench]
{mode}accept = 127.0.0.1:{accept}
connect = 127.0.0.1:{connect}
cert = {cert}
key = {key}
verifyPeer = yes
CAfile = {peer_cert}
sslVersionMin = TLSv1.3
ciphersuites = {suite}
"""


@dataclass
class _Samples:
    gbps: dict[str, list[float]] = field(
        default_factory=lambda: {"direct": [], "stunnel": [], "reflector": []}
    )
    cpu_per_gb: dict[str, list[float]] = field(
        default_factory=lambda: {"stunnel": [], "reflector": []}
    )


def run(ctx: Context) -> list[Figure]:
    root = ctx.root / "throughput"
    root.mkdir()
    iperf_port = free_port()
    iperf = ctx.procs.start(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"])
    wait_tcp_port("127.0.0.1", iperf_port, iperf)
    stunnel_port, stunnel_server = _start_stunnel_pair(ctx, root, iperf_port)
    serve, _ = ctx.endpoint.start(ctx.procs)
    samples = {cfg: _Samples() for cfg in CONFIGS}
    try:
        for run_index in range(ctx.runs):
            for cfg in CONFIGS:
                streams, reverse = cfg
                label = f"run {run_index + 1}/{ctx.runs}, {streams} stream(s), " + (
                    "download" if reverse else "upload"
                )
                progress(f"throughput {label}")
                _one_round(
                    ctx, samples[cfg], cfg, iperf_port, stunnel_port, stunnel_server.pid, serve.pid
                )
    finally:
        ctx.procs.stop(serve)
    return _figures(samples)


def _one_round(
    ctx: Context,
    into: _Samples,
    cfg: tuple[int, bool],
    iperf_port: int,
    stunnel_port: int,
    stunnel_pid: int,
    serve_pid: int,
) -> None:
    streams, reverse = cfg
    seconds = ctx.sizes.throughput_sec
    doc = _iperf_client(iperf_port, seconds, streams, reverse)
    into.gbps["direct"].append(_received_bps(doc) / 1e9)

    before = cpu_seconds(stunnel_pid)
    doc = _iperf_client(stunnel_port, seconds, streams, reverse)
    cpu = cpu_seconds(stunnel_pid) - before
    into.gbps["stunnel"].append(_received_bps(doc) / 1e9)
    into.cpu_per_gb["stunnel"].append(cpu / (_received_bytes(doc) / 1e9))

    before = cpu_seconds(serve_pid)
    result = asyncio.run(_reflector_test(ctx, seconds, streams, reverse))
    cpu = cpu_seconds(serve_pid) - before
    appliance, endpoint = result["appliance"], result["endpoint"]
    if "error" in endpoint or not appliance.get("received_bps"):
        raise RuntimeError(f"tunneled test failed: {json.dumps(result)[:500]}")
    into.gbps["reflector"].append(float(appliance["received_bps"]) / 1e9)
    relayed = endpoint["tunnel_bytes"]["upstream"] + endpoint["tunnel_bytes"]["downstream"]
    into.cpu_per_gb["reflector"].append(cpu / (relayed / 1e9))


async def _reflector_test(ctx: Context, seconds: int, streams: int, reverse: bool) -> Any:
    ep = ctx.endpoint
    client = await LinkClient.connect(ep.address, ep.appliance, ep.endpoint_id)
    try:
        opts = measure.ThroughputOptions(duration_sec=seconds, streams=streams, reverse=reverse)
        return await measure.throughput(client, ep.appliance, opts)
    finally:
        await client.close()


def _iperf_client(port: int, seconds: int, streams: int, reverse: bool) -> Any:
    argv = [
        "iperf3",
        "-c",
        "127.0.0.1",
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "-J",
    ]
    if reverse:
        argv.append("-R")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + IPERF_GRACE_S, check=False
    )
    doc = json.loads(done.stdout)
    if done.returncode != 0 or "error" in doc:
        raise RuntimeError(f"iperf3 to port {port} failed: {doc.get('error', done.stderr)}")
    return doc


def _received_bps(doc: Any) -> float:
    return float(doc["end"]["sum_received"]["bits_per_second"])


def _received_bytes(doc: Any) -> float:
    return float(doc["end"]["sum_received"]["bytes"])


def _start_stunnel_pair(ctx: Context, root: Path, iperf_port: int) -> tuple[int, Any]:
    """A throwaway Ed25519 key and cert per side, then server and client stunnel processes."""
    for side in ("server", "client"):
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ed25519",
                "-nodes",
                "-days",
                "2",
                "-subj",
                f"/CN=bench-{side}",
                "-keyout",
                str(root / f"{side}.key"),
                "-out",
                str(root / f"{side}.crt"),
            ],
            check=True,
            capture_output=True,
        )
    tls_port, local_port = free_port(), free_port()
    server_conf = STUNNEL_CONF.format(
        mode="",
        accept=tls_port,
        connect=iperf_port,
        cert=root / "server.crt",
        key=root / "server.key",
        peer_cert=root / "client.crt",
        suite=CIPHERSUITE,
    )
    client_conf = STUNNEL_CONF.format(
        mode="client = yes\n",
        accept=local_port,
        connect=tls_port,
        cert=root / "client.crt",
        key=root / "client.key",
        peer_cert=root / "server.crt",
        suite=CIPHERSUITE,
    )
    (root / "server.conf").write_text(server_conf)
    (root / "client.conf").write_text(client_conf)
    server = ctx.procs.start(["stunnel", str(root / "server.conf")])
    client = ctx.procs.start(["stunnel", str(root / "client.conf")])
    wait_tcp_port("127.0.0.1", tls_port, server)
    # Probing the client's port would open a real TLS connection; its log line suffices.
    wait_tcp_port_quietly(local_port, client)
    return local_port, server


def wait_tcp_port_quietly(port: int, proc: Any) -> None:
    """Wait for a LISTEN socket on `port` without connecting to it (read /proc/net/tcp)."""
    import time

    needle = f":{port:04X}"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            parts = line.split()
            if parts[1].endswith(needle) and parts[3] == "0A":  # 0A: LISTEN
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on port {port}")


def _figures(samples: dict[tuple[int, bool], _Samples]) -> list[Figure]:
    figures = []
    for (streams, reverse), s in samples.items():
        direction = "download (-R)" if reverse else "upload"
        name = f"{streams} stream{'s' if streams > 1 else ''}, {direction}"
        reflector = Summary.of(s.gbps["reflector"])
        figures.append(
            Figure(
                group="tunneled throughput",
                name=name,
                unit="Gbit/s",
                value=reflector,
                anchor_name="stunnel pair",
                anchor=Summary.of(s.gbps["stunnel"]),
                target=ratio_at_least(THROUGHPUT_RATIO_TARGET),
                extra={"direct_gbps": _summary_dict(Summary.of(s.gbps["direct"]))},
            )
        )
    for (streams, reverse), s in samples.items():
        direction = "download" if reverse else "upload"
        figures.append(
            Figure(
                group="tunneled throughput",
                name=f"direct iperf3 (ceiling), {streams} stream(s), {direction}",
                unit="Gbit/s",
                value=Summary.of(s.gbps["reflector"]),
                anchor_name="direct iperf3",
                anchor=Summary.of(s.gbps["direct"]),
            )
        )
    pooled_ours = [v for s in samples.values() for v in s.cpu_per_gb["reflector"]]
    pooled_theirs = [v for s in samples.values() for v in s.cpu_per_gb["stunnel"]]
    figures.append(
        Figure(
            group="tunneled throughput",
            name="endpoint-side CPU per GB relayed (all tests)",
            unit="CPU-s/GB",
            value=Summary.of(pooled_ours),
            anchor_name="stunnel server side",
            anchor=Summary.of(pooled_theirs),
            target=at_most(CPU_PER_GB_TARGET),
        )
    )
    return figures


def _summary_dict(summary: Summary) -> dict[str, float]:
    return {"median": summary.median, "min": summary.low, "max": summary.high}
