"""UDP echo: Reflector's STAMP echo engine vs a minimal C echo vs `irtt server`.

The same C client (udp_client.c) paces the same 120-octet probes (a signed STAMP header and a
sequence number) at each server, so the difference in round-trip time is the server's:
- RTT p50/p99/p99.9 at 1,000 packets/s, Reflector minus the C echo = the added latency;
- the highest rate with < 0.1% loss, stepping up until the first failure (bounded list), with
  the probes spread over 16 source addresses: Reflector answers each source in its own session,
  and one session is capped at `MAX_PPS` by policy, so this measures the engine, not the cap;
- Reflector's own reported processing time (T3 - T2 in its replies), next to irtt's.
irtt speaks its own protocol, so it is timed with its own client (`irtt client -i 1ms`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from benchmarks.context import Context
from benchmarks.core import Figure, Summary, Target, added_at_most, highest_passing, percentile
from benchmarks.procs import free_port, progress, wait_udp_bound

RTT_RATE: Final = 1000
# The rate search's steps (packets/s). 16 sources x MAX_PPS (10k) = 160k: above the last step.
RATES: Final = (5_000, 10_000, 20_000, 30_000, 45_000, 60_000, 75_000, 90_000, 110_000, 130_000)
SOURCES: Final = tuple(f"127.0.0.{i}" for i in range(2, 18))
# "Under 0.1% loss" (the issue). A step where the client itself could not send at 95% of the
# rate asked for says nothing about the server: it ends the search too (reported in the note).
MAX_LOSS: Final = 0.001
MIN_ACHIEVED: Final = 0.95
# On a shared machine a neighbour's burst can stall any server for milliseconds, enough to
# overflow its socket queue once: a failed step is tried once more before the search ends.
STEP_TRIES: Final = 2
# The echo host lives for the whole group; it exits on its own after this as a backstop.
ECHO_HOST_LIFETIME_S: Final = 1800
# Targets from the issue, in microseconds.
ADDED_P50_US: Final = 10.0
ADDED_P99_US: Final = 50.0
# Generous bound on one client run beyond its own duration (it drains for 0.3 s).
CLIENT_GRACE_S: Final = 15


@dataclass
class _Rtt:
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    p999: list[float] = field(default_factory=list)
    proc50: list[float] = field(default_factory=list)
    proc99: list[float] = field(default_factory=list)

    def add(self, doc: dict[str, Any]) -> None:
        rtt = doc["rtt_ns"]
        self.p50.append(rtt["p50"] / 1000)
        self.p99.append(rtt["p99"] / 1000)
        self.p999.append(rtt["p999"] / 1000)
        if "proc_ns" in doc:
            self.proc50.append(doc["proc_ns"]["p50"] / 1000)
            self.proc99.append(doc["proc_ns"]["p99"] / 1000)


@dataclass
class _Servers:
    c_echo: int
    reflector: int
    irtt: int
    headers: Path


def run(ctx: Context) -> list[Figure]:
    servers = _start_servers(ctx)
    rtt = {"c": _Rtt(), "reflector": _Rtt(), "irtt": _Rtt()}
    rates: dict[str, list[float]] = {"c": [], "reflector": []}
    client_bound: list[str] = []
    for index in range(ctx.runs):
        progress(f"udp echo RTT at {RTT_RATE} pps, run {index + 1}/{ctx.runs}")
        rtt["c"].add(_client(ctx, servers.c_echo, servers.headers, RTT_RATE, ctx.sizes.echo_sec))
        rtt["reflector"].add(
            _client(ctx, servers.reflector, servers.headers, RTT_RATE, ctx.sizes.echo_sec, True)
        )
        rtt["irtt"].add(_irtt(ctx, servers.irtt, ctx.sizes.echo_sec))
        for name, port, stamp in (
            ("c", servers.c_echo, False),
            ("reflector", servers.reflector, True),
        ):
            best, note = _search(ctx, port, servers.headers, stamp, f"{name} run {index + 1}")
            rates[name].append(best)
            if note:
                client_bound.append(note)
    return _figures(rtt, rates, client_bound)


def _start_servers(ctx: Context) -> _Servers:
    c_echo = ctx.procs.start([str(ctx.echo_bin), "127.0.0.1", "0"], stdout=subprocess.PIPE)
    assert c_echo.stdout is not None
    c_port = int(c_echo.stdout.readline())
    headers = ctx.root / "stamp-headers.bin"
    host = ctx.procs.start(
        [
            sys.executable,
            str(Path(__file__).with_name("echo_host.py")),
            "--sources",
            ",".join(SOURCES),
            "--headers",
            str(headers),
            "--duration",
            str(ECHO_HOST_LIFETIME_S),
        ],
        stdout=subprocess.PIPE,
    )
    assert host.stdout is not None
    line = host.stdout.readline()
    if not line:
        raise RuntimeError("the echo host exited before serving")
    reflector_port = int(json.loads(line)["port"])
    irtt_port = free_port(kind=2)  # SOCK_DGRAM
    irtt = ctx.procs.start(["irtt", "server", "-b", f"127.0.0.1:{irtt_port}", "-i", "0"])
    wait_udp_bound(irtt_port, irtt)
    return _Servers(c_echo=c_port, reflector=reflector_port, irtt=irtt_port, headers=headers)


def _client(
    ctx: Context,
    port: int,
    headers: Path,
    rate: int,
    seconds: float,
    stamp: bool = False,
    sources: tuple[str, ...] = SOURCES[:1],
) -> dict[str, Any]:
    argv = [
        str(ctx.client_bin),
        "-s",
        f"127.0.0.1:{port}",
        "-r",
        str(rate),
        "-d",
        str(seconds),
        "-H",
        str(headers),
        "-b",
        ",".join(sources),
    ]
    if stamp:
        argv.append("-t")
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + CLIENT_GRACE_S, check=True
    )
    doc: dict[str, Any] = json.loads(done.stdout)
    if not doc.get("received"):
        raise RuntimeError(f"no echo replies from port {port}: {doc}")
    return doc


def _irtt(ctx: Context, port: int, seconds: float) -> dict[str, Any]:
    out = ctx.root / "irtt.json"
    subprocess.run(
        [
            "irtt",
            "client",
            "-i",
            "1ms",
            "-d",
            f"{seconds:g}s",
            "-l",
            "120",
            "-Q",
            "-o",
            str(out),
            f"127.0.0.1:{port}",
        ],
        check=True,
        capture_output=True,
        timeout=seconds + CLIENT_GRACE_S,
    )
    doc = json.loads(out.read_text())
    rtts = sorted(rt["delay"]["rtt"] for rt in doc["round_trips"] if rt.get("lost") == "false")
    proc = doc["stats"]["server_processing_time"]
    return {
        "rtt_ns": {
            "p50": percentile(rtts, 0.5),
            "p99": percentile(rtts, 0.99),
            "p999": percentile(rtts, 0.999),
        },
        "proc_ns": {
            "p50": proc["median"] if "median" in proc else proc["mean"],
            "p99": proc["max"],
        },
    }


def _search(ctx: Context, port: int, headers: Path, stamp: bool, label: str) -> tuple[float, str]:
    """Step up the rate until loss reaches 0.1% (or the client falls behind)."""
    steps: list[tuple[float, bool]] = []
    note = ""
    for rate in RATES:
        for _ in range(STEP_TRIES):
            doc = _client(ctx, port, headers, rate, ctx.sizes.rate_step_sec, stamp, SOURCES)
            loss = 1 - doc["received"] / doc["sent"]
            achieved = doc["sent"] / max(doc["send_sec"], 1e-9)
            ok = loss < MAX_LOSS and achieved >= MIN_ACHIEVED * rate
            if ok:
                break
        steps.append((rate, ok))
        if not ok:
            if achieved < MIN_ACHIEVED * rate:
                note = f"{label}: the client reached only {achieved:,.0f} of {rate:,} pps"
            break
    best = highest_passing(steps)
    progress(f"udp echo highest rate, {label}: {best:,.0f} pps")
    return best, note


def _figures(
    rtt: dict[str, _Rtt], rates: dict[str, list[float]], client_bound: list[str]
) -> list[Figure]:
    ours, c, irtt = rtt["reflector"], rtt["c"], rtt["irtt"]
    group = "UDP echo"
    figures = [
        Figure(
            group=group,
            name=f"RTT p50 at {RTT_RATE} pps",
            unit="us",
            value=Summary.of(ours.p50),
            anchor_name="C echo",
            anchor=Summary.of(c.p50),
            target=added_at_most(ADDED_P50_US, "us"),
        ),
        Figure(
            group=group,
            name=f"RTT p99 at {RTT_RATE} pps",
            unit="us",
            value=Summary.of(ours.p99),
            anchor_name="C echo",
            anchor=Summary.of(c.p99),
            target=added_at_most(ADDED_P99_US, "us"),
        ),
        Figure(
            group=group,
            name=f"RTT p99.9 at {RTT_RATE} pps",
            unit="us",
            value=Summary.of(ours.p999),
            anchor_name="C echo",
            anchor=Summary.of(c.p999),
        ),
        Figure(
            group=group,
            name=f"RTT p50 at {RTT_RATE} pps vs irtt",
            unit="us",
            value=Summary.of(ours.p50),
            anchor_name="irtt server (irtt client)",
            anchor=Summary.of(irtt.p50),
            note="irtt is timed by its own client (Go, 1 ms interval), ours by udp_client.c",
        ),
        Figure(
            group=group,
            name=f"RTT p99 at {RTT_RATE} pps vs irtt",
            unit="us",
            value=Summary.of(ours.p99),
            anchor_name="irtt server (irtt client)",
            anchor=Summary.of(irtt.p99),
        ),
        Figure(
            group=group,
            name="highest rate with < 0.1% loss",
            unit="pps",
            value=Summary.of(rates["reflector"]),
            anchor_name="C echo",
            anchor=Summary.of(rates["c"]),
            target=_at_least_anchor(),
            note="; ".join(
                [
                    *client_bound,
                    f"{len(SOURCES)} sources, one session each;"
                    f" steps {', '.join(f'{r // 1000}k' for r in RATES)}",
                ]
            ),
        ),
        Figure(
            group=group,
            name="reported processing time p50 (T3 - T2)",
            unit="us",
            value=Summary.of(ours.proc50),
            anchor_name="irtt server's own, median",
            anchor=Summary.of(irtt.proc50),
        ),
        Figure(
            group=group,
            name="reported processing time p99 (T3 - T2)",
            unit="us",
            value=Summary.of(ours.proc99),
            anchor_name="irtt server's own, max",
            anchor=Summary.of(irtt.proc99),
        ),
    ]
    return figures


def _at_least_anchor() -> Target:
    return Target(text=">= the C echo's", check=lambda v, a: v >= a)
