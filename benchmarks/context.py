"""What every figure module gets: the temp dir, the built C tools, the endpoint, run sizes."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Final

from benchmarks.endpoint import Endpoint
from benchmarks.procs import Processes

# Full mode sizes the measurements for stable medians; --quick keeps `make bench` to a few
# minutes at the cost of wider spreads. Both stay bounded (full mode < 15 min in total).
RUNS: Final = 3


@dataclass(frozen=True, kw_only=True)
class Sizes:
    throughput_sec: int  # one iperf3 test
    echo_sec: float  # one 1,000 pps RTT run
    rate_step_sec: float  # one step of the highest-rate search
    handshakes: int  # full mTLS handshakes per run
    rpcs: int  # health round trips per run
    grants: int  # session grants per run
    idle_window_sec: float  # the idle footprint window (split into RUNS parts)
    ready_runs: int  # starts timed to READY=1


FULL: Final = Sizes(
    throughput_sec=5,
    echo_sec=10.0,
    rate_step_sec=2.0,
    handshakes=1000,
    rpcs=1000,
    grants=100,
    idle_window_sec=60.0,
    ready_runs=5,
)
QUICK: Final = Sizes(
    throughput_sec=2,
    echo_sec=3.0,
    rate_step_sec=1.0,
    handshakes=500,
    rpcs=300,
    grants=30,
    idle_window_sec=10.0,
    ready_runs=3,
)


@dataclass(frozen=True, kw_only=True)
class Context:
    root: Path  # a private temp dir, removed at the end
    echo_bin: Path  # benchmarks/echo.c, compiled
    client_bin: Path  # benchmarks/udp_client.c, compiled
    endpoint: Endpoint
    procs: Processes
    sizes: Sizes
    runs: int = RUNS
