"""Footprint: what a serving endpoint with no session costs, next to `irtt server` and `iperf3 -s`.

All three run at once through one window (60 s, or 10 s with --quick), split into three equal
parts for the median and spread: CPU % (user + system over the part), voluntary context
switches per second summed over threads (each is a wakeup: the process slept and was woken),
and RSS at the end. Then the time from spawning `reflector serve` to the READY=1 it sends on
NOTIFY_SOCKET, against the bare interpreter's start (`python -c pass`) as the anchor.
"""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Final

from benchmarks.context import Context
from benchmarks.core import Figure, Summary, at_most
from benchmarks.procs import Usage, free_port, progress, usage, wait_tcp_port, wait_udp_bound

# Targets from the issue.
IDLE_WAKEUPS_TARGET: Final = 0.0
RSS_TARGET_MIB: Final = 40.0
READY_TARGET_S: Final = 1.0
# Start-up work (imports, the first audit write) is not idleness: let it finish first.
SETTLE_S: Final = 2.0
MIB: Final = 1024 * 1024


def run(ctx: Context) -> list[Figure]:
    serve, _ = ctx.endpoint.start(ctx.procs)
    irtt_port = free_port(kind=2)
    irtt = ctx.procs.start(["irtt", "server", "-b", f"127.0.0.1:{irtt_port}"])
    iperf_port = free_port()
    iperf = ctx.procs.start(["iperf3", "-s", "-p", str(iperf_port), "-B", "127.0.0.1"])
    wait_udp_bound(irtt_port, irtt)
    wait_tcp_port("127.0.0.1", iperf_port, iperf)  # this connect is iperf3's last activity
    time.sleep(SETTLE_S)
    pids = {"reflector": serve.pid, "irtt": irtt.pid, "iperf3": iperf.pid}
    cpu: dict[str, list[float]] = {k: [] for k in pids}
    wakeups: dict[str, list[float]] = {k: [] for k in pids}
    rss: dict[str, list[float]] = {k: [] for k in pids}
    part = ctx.sizes.idle_window_sec / ctx.runs
    try:
        for index in range(ctx.runs):
            progress(f"idle footprint, part {index + 1}/{ctx.runs} ({part:.0f} s)")
            before = {k: usage(p) for k, p in pids.items()}
            start = time.monotonic()
            time.sleep(part)
            elapsed = time.monotonic() - start
            for name, pid in pids.items():
                after = usage(pid)
                cpu[name].append(100 * (after.cpu_s - before[name].cpu_s) / elapsed)
                wakeups[name].append(_switches(after, before[name]) / elapsed)
                rss[name].append(after.rss_bytes / MIB)
        threads = usage(serve.pid).threads
    finally:
        for proc in (iperf, irtt, serve):
            ctx.procs.stop(proc)
    ready, python = _ready_times(ctx)
    group = "footprint"
    figures = []
    for anchor in ("irtt", "iperf3"):
        anchor_name = "irtt server" if anchor == "irtt" else "iperf3 -s"
        first = anchor == "irtt"
        figures += [
            Figure(
                group=group,
                name="idle CPU",
                unit="%",
                value=Summary.of(cpu["reflector"]),
                anchor_name=anchor_name,
                anchor=Summary.of(cpu[anchor]),
            ),
            Figure(
                group=group,
                name="idle wakeups (voluntary context switches)",
                unit="1/s",
                value=Summary.of(wakeups["reflector"]),
                anchor_name=anchor_name,
                anchor=Summary.of(wakeups[anchor]),
                target=at_most(IDLE_WAKEUPS_TARGET) if first else None,
                note=f"window {ctx.sizes.idle_window_sec:.0f} s in {ctx.runs} parts, no"
                " watchdog configured"
                if first
                else "",
            ),
            Figure(
                group=group,
                name="idle RSS",
                unit="MiB",
                value=Summary.of(rss["reflector"]),
                anchor_name=anchor_name,
                anchor=Summary.of(rss[anchor]),
                target=at_most(RSS_TARGET_MIB) if first else None,
                note=f"reflector serve has {threads} threads" if first else "",
            ),
        ]
    figures.append(
        Figure(
            group=group,
            name="start to READY=1",
            unit="s",
            value=Summary.of(ready),
            anchor_name="python -c pass",
            anchor=Summary.of(python),
            target=at_most(READY_TARGET_S),
            note="identity already created; READY=1 read from our NOTIFY_SOCKET",
        ),
    )
    return figures


def _switches(after: Usage, before: Usage) -> float:
    return float(after.voluntary_switches - before.voluntary_switches)


def _ready_times(ctx: Context) -> tuple[list[float], list[float]]:
    ready, python = [], []
    for index in range(ctx.sizes.ready_runs):
        progress(f"start to READY, run {index + 1}/{ctx.sizes.ready_runs}")
        proc, seconds = ctx.endpoint.start(ctx.procs)
        ctx.procs.stop(proc)
        ready.append(seconds)
        start = time.monotonic()
        subprocess.run([sys.executable, "-c", "pass"], check=True)
        python.append(time.monotonic() - start)
    return ready, python
