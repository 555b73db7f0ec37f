"""Control plane: full mTLS handshakes per second, RPC round trip, session grant latency.

The anchor is `openssl s_server -rev` (C, one thread like Reflector's event loop) with the
same TLS 1.3 and Ed25519 client certificates, driven by the same client (tls_load.py):
- handshakes: several client processes at once, a bounded count; wall rate and the server's
  CPU per handshake (its capacity per core, which is what a 2-core machine shared with the
  client load can show best);
- RPC round trip: `health` on an open connection vs a reversed line from s_server;
- session grant: `session_request` (udp_echo) to `session_grant`, against the health round
  trip of the same run (what deciding, recording and starting an engine costs over an RPC).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Final

from benchmarks.context import Context
from benchmarks.core import Figure, Summary, at_least, percentile
from benchmarks.procs import cpu_seconds, free_port, progress, wait_tcp_port
from benchmarks.tls_load import LinkSession, RevSession, client_context
from reflector.link.messages import (
    Health,
    HealthStatus,
    Ok,
    SessionClose,
    SessionGrant,
    SessionRequest,
    UdpEchoParams,
)

# Two client processes of eight threads: enough concurrency to keep a one-thread server busy.
LOAD_PROCESSES: Final = 2
LOAD_THREADS: Final = 8
HANDSHAKES_TARGET: Final = 500
# Round trips before timing starts: first-use costs (imports, caches) are not steady state.
WARMUP: Final = 20
LOAD_TIMEOUT_S: Final = 300


def run(ctx: Context) -> list[Figure]:
    root = ctx.root / "control"
    root.mkdir()
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
    rev_port = free_port()
    rev = ctx.procs.start(
        [
            "openssl",
            "s_server",
            "-accept",
            f"127.0.0.1:{rev_port}",
            "-cert",
            str(root / "server.crt"),
            "-key",
            str(root / "server.key"),
            "-Verify",
            "1",
            "-CAfile",
            str(root / "client.crt"),
            "-rev",
            "-tls1_3",
            "-quiet",
            "-num_tickets",
            "0",
        ],
    )
    wait_tcp_port("127.0.0.1", rev_port, rev)
    serve, _ = ctx.endpoint.start(ctx.procs)
    ep = ctx.endpoint
    ours = (ep.appliance.cert_path, ep.appliance.identity.key_path)
    theirs = (root / "client.crt", root / "client.key")
    rates: dict[str, list[float]] = {"link": [], "rev": []}
    cpu_ms: dict[str, list[float]] = {"link": [], "rev": []}
    rtt: dict[str, list[float]] = {"link50": [], "link99": [], "rev50": [], "rev99": []}
    grants: list[float] = []
    errors: list[str] = []
    try:
        for index in range(ctx.runs):
            progress(f"control plane run {index + 1}/{ctx.runs}: handshakes")
            for mode, port, pid, (cert, key) in (
                ("link", ep.port, serve.pid, ours),
                ("rev", rev_port, rev.pid, theirs),
            ):
                rate, per_hs, error = _handshakes(ctx, mode, port, pid, cert, key)
                rates[mode].append(rate)
                cpu_ms[mode].append(per_hs * 1000)
                if error:
                    errors.append(f"{mode}: {error}")
            progress(f"control plane run {index + 1}/{ctx.runs}: round trips and grants")
            link50, link99, grant50 = _link_round_trips(ctx, ep.port, *ours)
            rev50, rev99 = _rev_round_trips(ctx, rev_port, *theirs)
            rtt["link50"].append(link50)
            rtt["link99"].append(link99)
            rtt["rev50"].append(rev50)
            rtt["rev99"].append(rev99)
            grants.append(grant50)
    finally:
        ctx.procs.stop(serve)
        ctx.procs.stop(rev)
    capacity = {m: [1000 / v for v in cpu_ms[m] if v > 0] for m in cpu_ms}
    group = "control plane"
    return [
        Figure(
            group=group,
            name="full mTLS handshakes/s per server CPU-second",
            unit="1/s",
            value=Summary.of(capacity["link"]),
            anchor_name="openssl s_server -rev",
            anchor=Summary.of(capacity["rev"]),
            target=at_least(HANDSHAKES_TARGET),
            note="handshake + hello/server_hello (s_server: + one reversed line), close;"
            " the server's capacity on one core (handshakes / its CPU seconds)"
            + (f"; errors: {'; '.join(errors)}" if errors else ""),
        ),
        Figure(
            group=group,
            name="full mTLS handshakes/s, wall clock",
            unit="1/s",
            value=Summary.of(rates["link"]),
            anchor_name="openssl s_server -rev",
            anchor=Summary.of(rates["rev"]),
            note=f"{LOAD_PROCESSES} client processes x {LOAD_THREADS} threads on the same"
            " cores: the client load's own handshake work shares the machine",
        ),
        Figure(
            group=group,
            name="server CPU per full handshake",
            unit="ms",
            value=Summary.of(cpu_ms["link"]),
            anchor_name="openssl s_server -rev",
            anchor=Summary.of(cpu_ms["rev"]),
        ),
        Figure(
            group=group,
            name="RPC round trip (health) p50",
            unit="ms",
            value=Summary.of(rtt["link50"]),
            anchor_name="s_server -rev line",
            anchor=Summary.of(rtt["rev50"]),
        ),
        Figure(
            group=group,
            name="RPC round trip (health) p99",
            unit="ms",
            value=Summary.of(rtt["link99"]),
            anchor_name="s_server -rev line",
            anchor=Summary.of(rtt["rev99"]),
        ),
        Figure(
            group=group,
            name="session grant latency (udp_echo) p50",
            unit="ms",
            value=Summary.of(grants),
            anchor_name="health RPC p50",
            anchor=Summary.of(rtt["link50"]),
        ),
    ]


def _handshakes(
    ctx: Context, mode: str, port: int, server_pid: int, cert: Path, key: Path
) -> tuple[float, float, str]:
    script = str(Path(__file__).with_name("tls_load.py"))
    per_process = ctx.sizes.handshakes // LOAD_PROCESSES
    before = cpu_seconds(server_pid)
    loads = [
        ctx.procs.start(
            [
                sys.executable,
                script,
                "--mode",
                mode,
                "--port",
                str(port),
                "--cert",
                str(cert),
                "--key",
                str(key),
                "--count",
                str(per_process),
                "--threads",
                str(LOAD_THREADS),
            ],
            stdout=subprocess.PIPE,
        )
        for _ in range(LOAD_PROCESSES)
    ]
    docs: list[Any] = []
    for proc in loads:
        out, _ = proc.communicate(timeout=LOAD_TIMEOUT_S)
        docs.append(json.loads(out))
        ctx.procs.stop(proc)
    cpu = cpu_seconds(server_pid) - before
    ok = sum(d["ok"] for d in docs)
    wall = max(d["end"] for d in docs) - min(d["start"] for d in docs)
    error = next((d["first_error"] for d in docs if d["first_error"]), "")
    if error:
        error = f"{sum(d['errors'] for d in docs)} failed, first: {error}"
    return ok / wall, cpu / max(ok, 1), error


def _link_round_trips(ctx: Context, port: int, cert: Path, key: Path) -> tuple[float, ...]:
    session = LinkSession(client_context(cert, key), port)
    try:
        for _ in range(WARMUP):
            session.call(Health())
        times = []
        for _ in range(ctx.sizes.rpcs):
            start = time.perf_counter()
            reply = session.call(Health())
            times.append((time.perf_counter() - start) * 1000)
            if not isinstance(reply, HealthStatus):
                raise RuntimeError(f"health answered with {reply}")
        grants = []
        for _ in range(ctx.sizes.grants):
            request = SessionRequest(test_type="udp_echo", params=UdpEchoParams(duration_sec=5))
            start = time.perf_counter()
            grant = session.call(request)
            grants.append((time.perf_counter() - start) * 1000)
            if not isinstance(grant, SessionGrant):
                raise RuntimeError(f"session_request answered with {grant}")
            closed = session.call(SessionClose(session_id=grant.session_id))
            if not isinstance(closed, Ok):
                raise RuntimeError(f"session_close answered with {closed}")
    finally:
        session.close()
    times.sort()
    grants.sort()
    return percentile(times, 0.5), percentile(times, 0.99), percentile(grants, 0.5)


def _rev_round_trips(ctx: Context, port: int, cert: Path, key: Path) -> tuple[float, float]:
    session = RevSession(client_context(cert, key), port)
    try:
        for _ in range(WARMUP):
            session.ping()
        times = []
        for _ in range(ctx.sizes.rpcs):
            start = time.perf_counter()
            session.ping()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        session.close()
    times.sort()
    return percentile(times, 0.5), percentile(times, 0.99)
