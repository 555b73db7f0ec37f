"""Probes for the base firewall, run inside a network namespace, and the template renderer.

Run as a program inside a namespace (`python3 nft_probe.py MODE ...`), it sends what a
traceroute, a ping or a port scanner sends and prints, as one JSON line, how each probe was
answered. Standard library only, so it runs with whatever `python3` the namespace sees.

Why sockets rather than `ping`/`traceroute`: the build machines have neither, and a socket tells
precisely what came back. A connected UDP socket reports ICMP port unreachable as ECONNREFUSED;
a TCP connect reports an RST as ECONNREFUSED and a silent drop as still pending. One socket per
probe, so every answer is counted, none coalesced.

Modes:
  echo ADDRESS COUNT            ICMP/ICMPv6 echo requests, one id (as ping), counted replies
  echo-group SOURCE GROUP IFACE COUNT
                                echo requests from SOURCE to a broadcast or multicast GROUP out
                                of IFACE; replies from any other host are counted
  udp ADDRESS PORT COUNT        datagrams: "reply" (echoed), "refused" (port unreachable), "silent"
  tcp ADDRESS PORT COUNT        SYNs: "connected", "refused" (RST), "silent"
  too-big ENDPOINT PEER MTU     an unsolicited "packet too big" / "fragmentation needed" telling
                                ENDPOINT that its packets to PEER must be at most MTU octets
  listen PORT                   (endpoint side) TCP accept and UDP echo on PORT, both families
"""

from __future__ import annotations

import errno
import ipaddress
import json
import os
import select
import socket
import struct
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

# How long to wait for answers after the last probe. On a veth link answers take well under a
# millisecond; 0.5 s absorbs a loaded machine and stays under the 1 s initial TCP
# retransmission timeout, so a silent port is never probed twice.
ANSWER_WAIT_S = 0.5
# Debian's interpreter, which has python3-jinja2 (a dependency of ansible-core, which the role
# needs anyway): the same engine, version and options as Ansible's `template` module.
DEBIAN_PYTHON = "/usr/bin/python3"
TEMPLATE = Path(__file__).resolve().parents[2] / "nft" / "reflector-base.nft.j2"
RENDERED = TEMPLATE.with_suffix("")  # nft/reflector-base.nft

_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY = 8, 0
_ICMP6_ECHO_REQUEST, _ICMP6_ECHO_REPLY = 128, 129
_ICMP_DEST_UNREACH, _ICMP_FRAG_NEEDED = 3, 4
_ICMP6_PACKET_TOO_BIG = 2
_PAYLOAD = b"reflector-nft-probe"
# How much larger than the path MTU the quoted (never sent) packet claims to have been.
_TOO_BIG_EXCESS = 100

# Ansible's `template` module: trim_blocks on, lstrip_blocks off, trailing newline kept.
_RENDER = """
import jinja2, json, sys
variables = json.load(sys.stdin)
env = jinja2.Environment(trim_blocks=True, keep_trailing_newline=True,
                         undefined=jinja2.StrictUndefined)
with open(sys.argv[1]) as f:
    sys.stdout.write(env.from_string(f.read()).render(**variables))
"""


def render_template(variables: Mapping[str, object] | None = None) -> str:
    """The base ruleset as the Ansible role would install it with these variables."""
    result = subprocess.run(
        [DEBIAN_PYTHON, "-c", _RENDER, str(TEMPLATE)],
        input=json.dumps(dict(variables or {})),
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise RuntimeError(f"rendering {TEMPLATE} failed: {result.stderr.strip()}")
    return result.stdout


def _family(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def _checksum(data: bytes) -> int:
    data += b"\0" * (len(data) % 2)
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total >> 16) + (total & 0xFFFF)
    return ~total & 0xFFFF


def _icmp(kind: int, code: int, rest: bytes, body: bytes, *, v6: bool) -> bytes:
    """An ICMP message; for ICMPv6 the kernel fills in the checksum (it needs the pseudo-header)."""
    unsummed = struct.pack("!BBH", kind, code, 0) + rest + body
    if v6:
        return unsummed
    return struct.pack("!BBH", kind, code, _checksum(unsummed)) + rest + body


def probe_echo(address: str, count: int) -> tuple[dict[str, int], float]:
    """Echo requests with one id and rising sequence numbers, as ping sends them."""
    v6 = _family(address) == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (
        (_ICMP6_ECHO_REQUEST, _ICMP6_ECHO_REPLY) if v6 else (_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY)
    )
    ident = os.getpid() & 0xFFFF
    with socket.socket(_family(address), socket.SOCK_RAW, proto) as sock:
        start = time.monotonic()
        for seq in range(count):
            header = struct.pack("!HH", ident, seq)
            sock.sendto(_icmp(request, 0, header, _PAYLOAD, v6=v6), (address, 0))
        sending_s = time.monotonic() - start
        answered: set[int] = set()
        deadline = time.monotonic() + ANSWER_WAIT_S
        while len(answered) < count and (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, source = sock.recvfrom(4096)
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            kind, _, _, got_ident, seq = struct.unpack("!BBHHH", icmp[:8])
            if kind == reply and got_ident == ident and source[0] == address:
                answered.add(seq)
    return {"reply": len(answered), "silent": count - len(answered)}, sending_s


def probe_echo_group(
    source: str, group: str, interface: str, count: int
) -> tuple[dict[str, int], float]:
    """Echo requests to a broadcast or multicast address, as `ping -b 198.51.100.255` or
    `ping ff02::1%eth0` sends them; a request counts as answered when any host but the sender
    replied to it.

    Bound to `source` (a global address, never still in duplicate address detection) so a reply
    comes back to it. The sender's own copies are not looped back, and a reply from `source`
    itself is ignored, so only another host can make a request count.
    """
    v6 = _family(source) == socket.AF_INET6
    proto = socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP
    request, reply = (
        (_ICMP6_ECHO_REQUEST, _ICMP6_ECHO_REPLY) if v6 else (_ICMP_ECHO_REQUEST, _ICMP_ECHO_REPLY)
    )
    ident = os.getpid() & 0xFFFF
    index = socket.if_nametoindex(interface)
    with socket.socket(_family(source), socket.SOCK_RAW, proto) as sock:
        sock.bind((source, 0))
        _send_to_the_link_only(sock, index, v6=v6)
        destination = (group, 0, 0, index) if v6 else (group, 0)
        start = time.monotonic()
        for seq in range(count):
            header = struct.pack("!HH", ident, seq)
            sock.sendto(_icmp(request, 0, header, _PAYLOAD, v6=v6), destination)
        sending_s = time.monotonic() - start
        answered: set[int] = set()
        deadline = time.monotonic() + ANSWER_WAIT_S
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([sock], [], [], left)[0]:
                break
            data, sender = sock.recvfrom(4096)
            icmp = data if v6 else data[(data[0] & 0x0F) * 4 :]
            kind, _, _, got_ident, seq = struct.unpack("!BBHHH", icmp[:8])
            if kind == reply and got_ident == ident and sender[0] != source:
                answered.add(seq)
    return {"reply": len(answered), "silent": count - len(answered)}, sending_s


def _send_to_the_link_only(sock: socket.socket, index: int, *, v6: bool) -> None:
    """Multicast out of interface `index`, without a copy to this host; broadcast allowed."""
    if v6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
        return
    # struct ip_mreqn: no group, no local address, the interface's index.
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, struct.pack("=8si", b"", index))
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)


def probe_udp(address: str, port: int, count: int) -> tuple[dict[str, int], float]:
    """One datagram from each of `count` connected sockets, then read what each got back."""
    socks = [socket.socket(_family(address), socket.SOCK_DGRAM) for _ in range(count)]
    try:
        start = time.monotonic()
        for sock in socks:
            sock.setblocking(False)
            sock.connect((address, port))
            sock.send(_PAYLOAD)
        sending_s = time.monotonic() - start
        outcomes: Counter[str] = Counter()
        pending = set(socks)  # a socket becomes readable with an echo or a pending error
        deadline = time.monotonic() + ANSWER_WAIT_S
        while pending and (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select(list(pending), [], [], left)
            outcomes.update(_udp_outcome(sock) for sock in readable)
            pending.difference_update(readable)
        outcomes["silent"] += len(pending)
        return dict(+outcomes), sending_s
    finally:
        for sock in socks:
            sock.close()


def _udp_outcome(sock: socket.socket) -> str:
    try:
        sock.recv(2048)
    except ConnectionRefusedError:
        return "refused"
    return "reply"


def probe_tcp(address: str, port: int, count: int) -> tuple[dict[str, int], float]:
    """`count` SYNs (non-blocking connects), then the state of each connection."""
    socks = [socket.socket(_family(address), socket.SOCK_STREAM) for _ in range(count)]
    try:
        start = time.monotonic()
        for sock in socks:
            sock.setblocking(False)
            sock.connect_ex((address, port))
        sending_s = time.monotonic() - start
        pending = set(socks)
        deadline = time.monotonic() + ANSWER_WAIT_S
        while pending and (left := deadline - time.monotonic()) > 0:
            _, done, _ = select.select([], list(pending), [], left)
            pending.difference_update(done)
        outcomes = Counter("silent" if sock in pending else _tcp_outcome(sock) for sock in socks)
        return dict(outcomes), sending_s
    finally:
        for sock in socks:
            sock.close()


def _tcp_outcome(sock: socket.socket) -> str:
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error == 0:
        return "connected"
    if error == errno.ECONNREFUSED:
        return "refused"
    return errno.errorcode.get(error, str(error))


def send_too_big(endpoint: str, peer: str, mtu: int) -> None:
    """Tell `endpoint` that a router could not forward its echo reply to `peer` (larger than MTU).

    The quoted packet is an echo reply, because the kernel updates the path MTU for a quoted
    ICMP packet without needing a socket to belong to it.
    """
    v6 = _family(endpoint) == socket.AF_INET6
    echo_reply = _icmp(
        _ICMP6_ECHO_REPLY if v6 else _ICMP_ECHO_REPLY, 0, struct.pack("!HH", 1, 1), b"", v6=v6
    )
    if v6:
        inner = struct.pack(
            "!IHBB16s16s",
            6 << 28,
            len(echo_reply),
            socket.IPPROTO_ICMPV6,
            64,
            socket.inet_pton(socket.AF_INET6, endpoint),
            socket.inet_pton(socket.AF_INET6, peer),
        )
        message = _icmp(
            _ICMP6_PACKET_TOO_BIG, 0, struct.pack("!I", mtu), inner + echo_reply, v6=True
        )
        proto = socket.IPPROTO_ICMPV6
    else:
        header = struct.pack(
            "!BBHHHBBH4s4s",
            0x45, 0, mtu + _TOO_BIG_EXCESS, 1, 0, 64, socket.IPPROTO_ICMP, 0,
            socket.inet_aton(endpoint), socket.inet_aton(peer),
        )  # fmt: skip
        inner = header[:10] + struct.pack("!H", _checksum(header)) + header[12:]
        rest = struct.pack("!HH", 0, mtu)
        message = _icmp(_ICMP_DEST_UNREACH, _ICMP_FRAG_NEEDED, rest, inner + echo_reply, v6=False)
        proto = socket.IPPROTO_ICMP
    with socket.socket(_family(endpoint), socket.SOCK_RAW, proto) as sock:
        sock.sendto(message, (endpoint, 0))


def listen(port: int) -> None:
    """Accept TCP and echo UDP on `port` over both families until killed."""
    tcp = socket.create_server(("::", port), family=socket.AF_INET6, dualstack_ipv6=True)
    udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    udp.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    udp.bind(("::", port))
    print("ready", flush=True)
    while True:
        for ready in select.select([tcp, udp], [], [])[0]:
            if ready is tcp:
                tcp.accept()[0].close()
            else:
                data, source = udp.recvfrom(2048)
                udp.sendto(data, source)


def main(argv: list[str]) -> int:
    mode, args = argv[0], argv[1:]
    if mode == "listen":
        listen(int(args[0]))
        return 0
    if mode == "too-big":
        send_too_big(args[0], args[1], int(args[2]))
        return 0
    if mode == "echo":
        answers, sending_s = probe_echo(args[0], int(args[1]))
    elif mode == "echo-group":
        answers, sending_s = probe_echo_group(args[0], args[1], args[2], int(args[3]))
    elif mode == "udp":
        answers, sending_s = probe_udp(args[0], int(args[1]), int(args[2]))
    elif mode == "tcp":
        answers, sending_s = probe_tcp(args[0], int(args[1]), int(args[2]))
    else:
        print(f"unknown mode {mode!r}", file=sys.stderr)
        return 2
    # sending_s: how long the probes took to send, the window in which the limiter refilled.
    print(json.dumps({"answers": answers, "sending_s": sending_s}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
