#!/bin/bash
# Re-captures the iperf3 -J fixtures in this folder from the installed iperf3, on loopback only.
# Each case runs a real one-off server and a real client; nothing here is hand-written.
# Usage: tests/unit/data/iperf3/capture.sh   (takes about 10 s)
set -euo pipefail
out=$(cd "$(dirname "$0")" && pwd)
iperf3=${IPERF3:-/usr/bin/iperf3}
port=${PORT:-5951}

# run_case NAME CLIENT_ARGS...: server_NAME.json and client_NAME.json from one test.
run_case() {
    local name=$1; shift
    "$iperf3" -s -p "$port" --one-off -J -B 127.0.0.1 >"$out/server_$name.json" &
    local server=$!
    sleep 0.3
    "$iperf3" -c 127.0.0.1 -p "$port" -J "$@" >"$out/client_$name.json" || true
    wait "$server" || true
}

run_case tcp_1stream -t 1
run_case tcp_2streams -t 1 -P 2
run_case tcp_reverse -t 1 -R
run_case udp -t 1 -u -b 10M
run_case udp_reverse_2streams -t 1 -u -b 10M -R -P 2
run_case tcp_bidir -t 1 --bidir

# A server interrupted (SIGTERM) before any client came.
"$iperf3" -s -p "$port" --one-off -J -B 127.0.0.1 >"$out/server_interrupted.json" &
server=$!
sleep 0.3
kill -TERM "$server"
wait "$server" || true

# A second server on a port that is already taken.
"$iperf3" -s -p "$port" --one-off -J -B 127.0.0.1 >/dev/null &
server=$!
sleep 0.3
"$iperf3" -s -p "$port" --one-off -J -B 127.0.0.1 >"$out/server_port_in_use.json" 2>/dev/null || true
kill -TERM "$server"
wait "$server" || true

# A client with no server to talk to (iperf3 3.12 still exits 0 here).
"$iperf3" -c 127.0.0.1 -p "$port" -t 1 -J >"$out/client_refused.json" || true
