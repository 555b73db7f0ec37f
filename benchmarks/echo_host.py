"""Host Reflector's UDP echo engine in a process of its own, for the benchmark's C client.

    python benchmarks/echo_host.py --sources 127.0.0.2,127.0.0.3 --headers FILE --duration S

Opens `UdpEchoReflector` on 127.0.0.1 (a free port), adds one session per source address, each
with its own random key and the engine's highest per-session rate (`MAX_PPS`), and writes one
signed 112-octet STAMP Session-Sender packet per source to FILE for the client to send. Prints
`{"port": N}` once serving, and the reflector's counters as JSON when SIGTERM arrives or the
duration ends. The engine is exactly the endpoint's: only the granting around it is left out.
"""

from __future__ import annotations

import argparse
import json
import secrets
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from reflector.engines.stamp import SenderPacket, encode_sender, unix_ns_to_ntp
from reflector.engines.udp_echo import (
    MAX_PPS,
    UdpEchoReflector,
    read_clock_error_estimate,
)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sources", required=True)
    parser.add_argument("--headers", required=True, type=Path)
    parser.add_argument("--duration", required=True, type=float)
    args = parser.parse_args()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    error_estimate = read_clock_error_estimate()
    headers = b""
    with UdpEchoReflector(("127.0.0.1", 0)) as reflector:
        deadline = time.monotonic() + args.duration
        for index, source in enumerate(args.sources.split(",")):
            key = secrets.token_bytes(32)
            reflector.add_session(f"bench-{index}", source, key, deadline, MAX_PPS)
            probe = SenderPacket(
                seq=0,
                timestamp=unix_ns_to_ntp(time.time_ns()),
                error_estimate=error_estimate,
                ssid=index + 1,
            )
            headers += encode_sender(probe, key)
        args.headers.write_bytes(headers)
        print(json.dumps({"port": reflector.address[1]}), flush=True)
        signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, args.duration)
        reflector.close()
        stats = reflector.stats()
    print(json.dumps(stats.to_dict()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
