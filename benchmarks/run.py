"""`make bench`: Reflector measured side by side with its anchors, on loopback, in one run.

    .venv/bin/python benchmarks/run.py [--quick] [--json] [--only GROUP ...]

Prints a Markdown table (or, with --json, one JSON document) on stdout and progress on stderr.
Every figure is the median of at least three runs with their range, next to an anchor measured
in the same run (a C program or a well-known tool doing the same job) and the ratio of the two,
and, where the issue sets one, the target with pass/miss. Traffic stays on loopback; every
process started here is stopped by its PID; the temp dir is removed at the end.

Figure groups (in order): throughput, udp_echo, control, footprint.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import control, footprint, throughput, udp_echo
from benchmarks.context import FULL, QUICK, RUNS, Context
from benchmarks.core import Figure, render_table, to_json
from benchmarks.endpoint import Endpoint
from benchmarks.procs import Processes, build_c, progress, require_tools

HERE: Final = Path(__file__).resolve().parent
GROUPS: Final[dict[str, Callable[[Context], list[Figure]]]] = {
    "throughput": throughput.run,
    "udp_echo": udp_echo.run,
    "control": control.run,
    "footprint": footprint.run,
}
TOOLS: Final = ("gcc", "iperf3", "stunnel", "irtt", "openssl")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__.split("\n")[0])
    parser.add_argument("--json", action="store_true", help="print JSON instead of the table")
    parser.add_argument("--quick", action="store_true", help="short runs (a few minutes)")
    parser.add_argument("--only", nargs="+", choices=sorted(GROUPS), help="run only these groups")
    args = parser.parse_args(argv)
    require_tools(TOOLS)
    sizes = QUICK if args.quick else FULL
    started = time.monotonic()
    figures: list[Figure] = []
    root = Path(tempfile.mkdtemp(prefix="reflector-bench-"))
    try:
        with Processes() as procs:
            progress(f"building C tools and an endpoint in {root}")
            ctx = Context(
                root=root,
                echo_bin=build_c(HERE / "echo.c", root),
                client_bin=build_c(HERE / "udp_client.c", root),
                endpoint=Endpoint.create(root / "endpoint"),
                procs=procs,
                sizes=sizes,
                runs=RUNS,
            )
            for name, measure in GROUPS.items():
                if args.only and name not in args.only:
                    continue
                progress(f"--- {name}")
                figures += measure(ctx)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    elapsed = time.monotonic() - started
    progress(f"done in {elapsed:.0f} s")
    command = "benchmarks/run.py" + (" --quick" if args.quick else "")
    context = {
        "command": f".venv/bin/python {command}",
        "mode": "quick" if args.quick else "full",
        "elapsed_sec": round(elapsed, 1),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_at_end": os.getloadavg(),
        },
    }
    if args.json:
        print(json.dumps(to_json(figures, context), indent=2))
    else:
        print(render_table(figures))
        print(
            f"\n{context['command']}: {context['mode']} mode, {elapsed:.0f} s,"
            f" {os.cpu_count()} CPUs, load average at end {os.getloadavg()[0]:.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
