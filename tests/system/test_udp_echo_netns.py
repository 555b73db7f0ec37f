"""The UDP echo reflector between real hosts: it answers the granted address and no one else.

Three network namespaces on one LAN segment (the `netns_pair` fixture, documentation addresses):
the endpoint 198.51.100.1 runs the standalone reflector process, 198.51.100.2 is the granted
peer, 198.51.100.3 a different host that knows the session key. Loopback cannot show this: all
of 127/8 is one host, and a spoofed source there is delivered to the spoofer itself.

The spoofing test is real spoofing: the third host writes a whole IPv4 packet through a raw
socket with the peer's address as its source, as an attacker on the segment can. The reflector
must accept it (address and HMAC are right), and the reply must then go where IP sends it: to the
address's owner, the real peer, never back to the spoofer. This is why the source check plus the
HMAC is enough: a spoofer can make the reflector answer only the granted peer, at the clamped
rate, with no more octets than it sent.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest

from .harness import Netns, NetnsPair, stop_process

pytestmark = pytest.mark.system

KEY = bytes.fromhex("c3" * 32)
PEER_IP = "198.51.100.2"
# Long enough for every test below; the reflector is stopped early by SIGTERM anyway.
SESSION_S = 30
# Processes in namespaces start in about 0.1 s; 10 s only trips on a hung start.
PROCESS_TIMEOUT_S = 10.0
# The port the spoofer claims as its source; the real peer listens on it.
SPOOFED_PORT = 40000
# The reflector's reply rate clamp (--max-pps).
MAX_PPS = 1000

_MEASURE = r"""
import json, sys
from reflector.engines.latency import measure_latency
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
key = bytes.fromhex(sys.stdin.readline().strip())
result = measure_latency((host, port), key, 7, count * 0.01, 0.01, 112, None)
print(json.dumps(result.to_dict()))
"""

# Listens where a reply to the spoofed packet would arrive if it went to the address's owner.
_LISTEN = r"""
import json, socket, sys
from reflector.engines import stamp
address, port = sys.argv[1], int(sys.argv[2])
key = bytes.fromhex(sys.stdin.readline().strip())
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.bind((address, port))
sock.settimeout(5)
print("ready", flush=True)
try:
    data, source = sock.recvfrom(2048)
    reply = stamp.decode_reflector(data, key)
    print(json.dumps({"from": source[0], "sender_seq": reply.sender_seq, "length": len(data)}))
except TimeoutError:
    print(json.dumps({"from": None}))
"""

# Sends one valid probe with a forged IPv4 source address, then waits for any reply.
_SPOOF = r"""
import json, socket, struct, sys, time
from reflector.engines import stamp
forged, target = sys.argv[1], sys.argv[2]
target_port, source_port = int(sys.argv[3]), int(sys.argv[4])
key = bytes.fromhex(sys.stdin.readline().strip())
now = stamp.unix_ns_to_ntp(time.time_ns())
packet = stamp.SenderPacket(seq=77, timestamp=now, error_estimate=1, ssid=7)
probe = stamp.encode_sender(packet, key)
# Listen on the claimed port first, on every address this host has.
listener = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
listener.bind(("0.0.0.0", source_port))
listener.settimeout(1.5)
udp = struct.pack("!HHHH", source_port, target_port, 8 + len(probe), 0) + probe  # no checksum
header = struct.pack(
    "!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
    socket.inet_aton(forged), socket.inet_aton(target),
)  # the kernel fills in the header checksum and the ID
raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
raw.sendto(header + udp, (target, 0))
try:
    received = len(listener.recv(2048))
except TimeoutError:
    received = 0
print(json.dumps({"received": received}))
"""


@dataclass
class _Reflector:
    port: int
    proc: subprocess.Popen[str]


def _spawn(pair: NetnsPair, ns: Netns, args: list[str]) -> subprocess.Popen[str]:
    """Start the venv's Python in `ns` with the session key on its stdin."""
    proc = subprocess.Popen(
        pair.argv_in(ns, [sys.executable, *args]),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # stop_process signals the whole group
    )
    assert proc.stdin is not None
    proc.stdin.write(KEY.hex() + "\n")
    proc.stdin.close()
    return proc


def _first_line(proc: subprocess.Popen[str]) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        assert proc.stderr is not None
        proc.wait(timeout=PROCESS_TIMEOUT_S)
        pytest.fail(f"process exited with {proc.returncode}: {proc.stderr.read()}")
    return line


@contextmanager
def _reflector(pair: NetnsPair, final: dict[str, object]) -> Iterator[_Reflector]:
    """The standalone reflector in the endpoint namespace, granted to PEER_IP.

    On exit it is stopped with SIGTERM and its final stats line is put into `final`.
    """
    args = ["-m", "reflector.engines.udp_echo", "--bind", f"{pair.endpoint.ipv4}:0"]
    args += ["--peer", PEER_IP, "--duration", str(SESSION_S), "--max-pps", str(MAX_PPS)]
    proc = _spawn(pair, pair.endpoint, args)
    try:
        listening = json.loads(_first_line(proc))
        assert listening["event"] == "listening"
        yield _Reflector(port=int(listening["port"]), proc=proc)
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=PROCESS_TIMEOUT_S)
        assert proc.stdout is not None
        assert proc.stderr is not None
        out, err = proc.stdout.read(), proc.stderr.read()
        assert proc.returncode == 0, err
        final.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        if proc.poll() is None:
            stop_process(proc)


def _measure(pair: NetnsPair, ns: Netns, port: int, count: int) -> dict[str, object]:
    result = pair.run_in(
        ns,
        [sys.executable, "-c", _MEASURE, pair.endpoint.ipv4, str(port), str(count)],
        input_text=KEY.hex() + "\n",
        timeout=PROCESS_TIMEOUT_S + count * 0.01,
    )
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


@pytest.fixture
def lab(netns_pair: NetnsPair) -> NetnsPair:
    """Endpoint 198.51.100.1, granted peer 198.51.100.2 and another host 198.51.100.3."""
    assert netns_pair.peer.ipv4 == PEER_IP
    netns_pair.add_peer()
    return netns_pair


def test_the_granted_peer_gets_replies(lab: NetnsPair) -> None:
    final: dict[str, object] = {}
    with _reflector(lab, final) as echo:
        result = _measure(lab, lab.peer, echo.port, 20)
    assert (result["sent"], result["received"], result["invalid"]) == (20, 20, 0)
    assert result["received_ttl_min"] == 64  # same segment: no router decremented it
    assert final["tx_packets"] == 20
    assert final["tx_bytes"] == final["rx_bytes"] == 20 * 112


def test_another_host_with_the_right_key_gets_nothing(lab: NetnsPair) -> None:
    other = lab.peers[1]
    final: dict[str, object] = {}
    with _reflector(lab, final) as echo:
        result = _measure(lab, other, echo.port, 10)
    assert (result["sent"], result["received"]) == (10, 0)
    assert final["tx_packets"] == 0
    assert final["rx_packets"] == 0  # nothing was attributed to the session
    assert final["event"] == "stopped"


def test_a_spoofed_source_gets_its_reply_sent_to_the_real_peer_not_the_spoofer(
    lab: NetnsPair,
) -> None:
    spoofer = lab.peers[1]
    final: dict[str, object] = {}
    with _reflector(lab, final) as echo:
        listener = _spawn(lab, lab.peer, ["-c", _LISTEN, PEER_IP, str(SPOOFED_PORT)])
        try:
            assert _first_line(listener).strip() == "ready"
            spoof_args = [PEER_IP, lab.endpoint.ipv4, str(echo.port), str(SPOOFED_PORT)]
            spoof = lab.run_in(
                spoofer,
                [sys.executable, "-c", _SPOOF, *spoof_args],
                input_text=KEY.hex() + "\n",
                timeout=PROCESS_TIMEOUT_S,
            )
            at_owner = json.loads(_first_line(listener))
        finally:
            stop_process(listener)
    assert json.loads(spoof.stdout) == {"received": 0}
    # The reflector did answer (address and HMAC were right), at the address's real owner.
    assert at_owner == {"from": lab.endpoint.ipv4, "sender_seq": 77, "length": 112}
    assert (final["rx_packets"], final["tx_packets"]) == (1, 1)


# From the granted peer's own address: packets with a wrong HMAC, unauthenticated STAMP (44
# octets), oversized ones, then a burst of valid probes far above the rate clamp. Counts what
# comes back, and the sizes, for a second after the last packet.
_HOSTILE = r"""
import json, socket, sys, time
from reflector.engines import stamp
target, port, burst = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
key = bytes.fromhex(sys.stdin.readline().strip())
sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
sock.connect((target, port))
def probe(seq, k=key):
    now = stamp.unix_ns_to_ntp(time.time_ns())
    packet = stamp.SenderPacket(seq=seq, timestamp=now, error_estimate=1, ssid=7)
    return stamp.encode_sender(packet, k)
bad = [probe(1, bytes(32))] * 20                    # right shape, wrong key
bad += [probe(2)[:44]] * 20                         # RFC 8762 unauthenticated size
bad += [probe(3) + bytes(1473 - 112)] * 20          # larger than any probe we answer
for packet in bad:
    sock.send(packet)
sock.settimeout(1.0)
def drain():
    sizes = []
    try:
        while True:
            sizes.append(len(sock.recv(4096)))
    except TimeoutError:
        return sizes
after_bad = drain()
started = time.monotonic()
for seq in range(burst):
    sock.send(probe(100 + seq))
elapsed = time.monotonic() - started
after_burst = drain()
print(json.dumps({"after_bad": after_bad, "after_burst": after_burst, "burst_s": elapsed}))
"""
# A burst of this many valid probes is sent at once (3 s worth at the clamp).
BURST = 3000


def test_the_peer_itself_gets_nothing_for_bad_packets_and_at_most_the_rate_for_a_flood(
    lab: NetnsPair,
) -> None:
    final: dict[str, object] = {}
    with _reflector(lab, final) as echo:
        done = lab.run_in(
            lab.peer,
            [sys.executable, "-c", _HOSTILE, lab.endpoint.ipv4, str(echo.port), str(BURST)],
            input_text=KEY.hex() + "\n",
            timeout=PROCESS_TIMEOUT_S + 5,
        )
    seen = json.loads(done.stdout)
    assert seen["after_bad"] == []  # wrong key, no HMAC, oversized: all silently dropped
    replies = seen["after_burst"]
    assert replies and set(replies) == {112}  # never longer than the probe
    # The clamp: at most max_pps a second over the burst (plus its bucket), far below BURST.
    assert len(replies) <= MAX_PPS * (seen["burst_s"] + 1.0) + MAX_PPS
    assert len(replies) < BURST
    dropped = final["dropped"]
    assert isinstance(dropped, dict)
    assert dropped["hmac"] >= 20 and dropped["length"] >= 40 and dropped["rate"] > 0
