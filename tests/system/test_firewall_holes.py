"""Direct-mode holes in a real kernel: the data port range is closed to all but the granted peer.

Three network namespaces on one LAN segment (`netns_pair`, documentation addresses): the
endpoint 198.51.100.1 / 2001:db8:1::1 runs echo listeners and the firewall code, the peer .2/::2
is the one granted a hole, the other host .3/::3 is not. The firewall runs in a child process
inside the endpoint namespace (an "agent" driven one JSON request per line), so it can be killed
with SIGKILL like a crashed Reflector and restarted. Connects are probed with a short timeout:
on the bridge an answer takes well under a millisecond, so silence for PROBE_TIMEOUT_S is a drop.
"""

from __future__ import annotations

import json
import select
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from reflector.firewall.ruleset import ElementState, parse_set_elements

from .harness import REPO_ROOT, Netns, NetnsPair, stop_process

pytestmark = pytest.mark.system

FIRST, LAST = 5201, 5299
PORT = 5201
# Listening but never granted: a hole is for one port, not the range.
OTHER_DATA_PORT = 5202
# Stands in for the control port: outside the data range, so this table leaves it alone.
OUTSIDE_PORT = 4000
PEER4, PEER6 = "198.51.100.2", "2001:db8:1::2"
EP4, EP6 = "198.51.100.1", "2001:db8:1::1"
# A reply on the bridge takes < 1 ms; 1 s of silence is a drop (room for a loaded CI machine),
# and probes run in parallel.
PROBE_TIMEOUT_S = 1.0
# Python and libnftables start in about 0.2 s; 10 s only trips on a hung process.
PROCESS_TIMEOUT_S = 10.0
# The kernel's set garbage collection runs about once a second after an element's timeout.
EXPIRY_SLACK_S = 2.0
# Each probe sends this much and waits for its echo, so counters see both directions.
PAYLOAD_BYTES = 1000

_AGENT = r"""
import dataclasses, json, sys
from reflector.firewall import NftFirewall
firewall = NftFirewall((int(sys.argv[1]), int(sys.argv[2])))
print(json.dumps({"ok": "ready"}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    args = request["args"]
    if request["op"] == "ensure_table":
        args = [tuple(args[0])]
    try:
        result = getattr(firewall, request["op"])(*args)
        reply = {"ok": dataclasses.asdict(result) if result is not None else None}
    except Exception as exc:
        reply = {"error": type(exc).__name__, "message": str(exc)}
    print(json.dumps(reply), flush=True)
"""

# TCP and UDP echo on every given port, IPv4 and IPv6 (one dual-stack socket each).
_LISTEN = r"""
import selectors, socket, sys
selector = selectors.DefaultSelector()
for port in map(int, sys.argv[1:]):
    for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
        sock = socket.socket(socket.AF_INET6, kind)
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("::", port))
        if kind == socket.SOCK_STREAM:
            sock.listen(64)
        selector.register(sock, selectors.EVENT_READ, kind)
print("ready", flush=True)
while True:
    for key, _ in selector.select():
        sock = key.fileobj
        if key.data == socket.SOCK_DGRAM:
            data, source = sock.recvfrom(65535)
            sock.sendto(data, source)
        elif key.data == socket.SOCK_STREAM:
            conn, _ = sock.accept()
            selector.register(conn, selectors.EVENT_READ, "conn")
        else:
            try:
                data = sock.recv(65535)
            except OSError:
                data = b""
            if data:
                sock.sendall(data)
            else:
                selector.unregister(sock)
                sock.close()
"""

# Probes targets in parallel: "open" (echo came back), "closed" (silence), "refused".
_PROBE = r"""
import json, socket, sys
from concurrent.futures import ThreadPoolExecutor
timeout, size, targets = float(sys.argv[1]), int(sys.argv[2]), json.loads(sys.argv[3])
def probe(target):
    proto, address, port = target
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, port))
            sock.sendall(b"x" * size)
            received = 0
            while received < size:
                chunk = sock.recv(65535)
                if not chunk:
                    return "reset"
                received += len(chunk)
            return "open"
        except TimeoutError:
            return "closed"
        except ConnectionRefusedError:
            return "refused"
with ThreadPoolExecutor(len(targets)) as pool:
    print(json.dumps(list(pool.map(probe, targets))))
"""

Target = tuple[str, str, int]
TCP4, UDP4 = ("tcp", EP4, PORT), ("udp", EP4, PORT)
TCP6, UDP6 = ("tcp", EP6, PORT), ("udp", EP6, PORT)
ALL_HOLES = [TCP4, UDP4, TCP6, UDP6]


class Agent:
    """The firewall code in a child process inside the endpoint namespace."""

    def __init__(self, pair: NetnsPair, *, wrapper: tuple[str, ...] = ()) -> None:
        argv = [*wrapper, sys.executable, "-c", _AGENT, str(FIRST), str(LAST)]
        self.proc = subprocess.Popen(
            pair.argv_in(pair.endpoint, argv),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO_ROOT,
            start_new_session=True,  # stop_process signals the whole group
        )
        assert self._reply() == {"ok": "ready"}

    def _reply(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], PROCESS_TIMEOUT_S)
        line = self.proc.stdout.readline() if ready else ""
        if not line:
            self.proc.kill()
            _, stderr = self.proc.communicate(timeout=PROCESS_TIMEOUT_S)
            stop_process(self.proc)
            raise AssertionError(f"firewall agent did not answer; its stderr: {stderr}")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def request(self, op: str, *args: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"op": op, "args": list(args)}) + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def call(self, op: str, *args: Any) -> Any:
        reply = self.request(op, *args)
        assert "ok" in reply, reply
        return reply["ok"]

    def stop(self) -> None:
        stop_process(self.proc)


@pytest.fixture
def lab(netns_pair: NetnsPair) -> Iterator[tuple[NetnsPair, Netns]]:
    """The pair with a third host and echo listeners on the endpoint; yields (pair, third)."""
    third = netns_pair.add_peer()
    ports = [str(PORT), str(OTHER_DATA_PORT), str(OUTSIDE_PORT)]
    listener = netns_pair.popen_in(netns_pair.endpoint, [sys.executable, "-c", _LISTEN, *ports])
    try:
        assert listener.stdout is not None
        ready, _, _ = select.select([listener.stdout], [], [], PROCESS_TIMEOUT_S)
        assert ready and listener.stdout.readline().strip() == "ready"
        yield netns_pair, third
    finally:
        stop_process(listener)


def probe(pair: NetnsPair, source: Netns, *targets: Target) -> list[str]:
    cmd = [
        sys.executable,
        "-c",
        _PROBE,
        str(PROBE_TIMEOUT_S),
        str(PAYLOAD_BYTES),
        json.dumps(targets),
    ]
    result = pair.run_in(source, cmd, timeout=PROCESS_TIMEOUT_S)
    statuses: list[str] = json.loads(result.stdout)
    return statuses


def elements(pair: NetnsPair, set_name: str) -> dict[tuple[str, str, int], ElementState]:
    """The hole set as the kernel lists it, read with the nft CLI (not the code under test)."""
    result = pair.run_in(pair.endpoint, ["nft", "-j", "list", "set", "inet", "reflector", set_name])
    return parse_set_elements(json.loads(result.stdout))


def tables(pair: NetnsPair) -> list[str]:
    result = pair.run_in(pair.endpoint, ["nft", "-j", "list", "tables"])
    items = json.loads(result.stdout)["nftables"]
    return sorted(f"{i['table']['family']} {i['table']['name']}" for i in items if "table" in i)


def wait_gone(pair: NetnsPair, set_name: str, key: tuple[str, str, int], limit_s: float) -> float:
    """Poll the set until `key` is gone; return how long that took."""
    start = time.monotonic()
    while key in elements(pair, set_name):
        assert time.monotonic() - start < limit_s, f"{key} still in {set_name} after {limit_s} s"
        time.sleep(0.1)
    return time.monotonic() - start


def test_holes_open_the_data_range_only_to_the_granted_peer(
    lab: tuple[NetnsPair, Netns],
) -> None:
    pair, third = lab
    agent = Agent(pair)
    try:
        agent.call("ensure_table", [FIRST, LAST])
        outside = ("tcp", EP4, OUTSIDE_PORT)
        # No hole: the data range is closed (silently dropped) to everyone, both families and
        # protocols; a port outside the range is this table's business no more.
        assert probe(pair, pair.peer, *ALL_HOLES, outside) == ["closed"] * 4 + ["open"]

        for proto in ("tcp", "udp"):
            agent.call("open_hole", "t-v4", PEER4, proto, PORT, 30)
            agent.call("open_hole", "t-v6", PEER6, proto, PORT, 30)
        assert probe(pair, pair.peer, *ALL_HOLES) == ["open"] * 4
        assert probe(pair, pair.peer, ("tcp", EP4, OTHER_DATA_PORT)) == ["closed"]
        assert probe(pair, third, *ALL_HOLES) == ["closed"] * 4
        assert set(elements(pair, "holes4")) == {(PEER4, "tcp", PORT), (PEER4, "udp", PORT)}

        # TCP and UDP each moved PAYLOAD_BYTES each way: only counting the engine's replies
        # too (the output chain) brings the total to 4 payloads.
        counted = agent.call("hole_counters", "t-v4")
        assert counted["bytes"] >= 4 * PAYLOAD_BYTES and counted["expired"] == 0
        final = agent.call("close_hole", "t-v4")
        assert final["bytes"] >= counted["bytes"] and final["expired"] == 0
        assert probe(pair, pair.peer, TCP4, UDP4, TCP6, UDP6) == ["closed"] * 2 + ["open"] * 2
        assert elements(pair, "holes4") == {}

        assert agent.call("close_hole", "t-v6")["bytes"] >= 4 * PAYLOAD_BYTES
        assert probe(pair, pair.peer, *ALL_HOLES) == ["closed"] * 4
        assert agent.call("close_hole", "t-v4") is None  # already closed: nothing to report
    finally:
        agent.stop()


def test_a_hole_expires_by_itself_at_its_timeout(lab: tuple[NetnsPair, Netns]) -> None:
    pair, _ = lab
    agent = Agent(pair)
    try:
        agent.call("ensure_table", [FIRST, LAST])
        agent.call("open_hole", "t-exp", PEER4, "tcp", PORT, 5)
        assert probe(pair, pair.peer, TCP4) == ["open"]  # a probe takes 0.2-2 s to start
        took = wait_gone(pair, "holes4", (PEER4, "tcp", PORT), 5 + EXPIRY_SLACK_S)
        assert took > 2.0  # it lived for (most of) its timeout, then went by itself
        assert probe(pair, pair.peer, TCP4) == ["closed"]
        assert agent.call("close_hole", "t-exp")["expired"] == 1
    finally:
        agent.stop()


def test_a_killed_process_leaves_holes_to_their_timeout_and_a_restart_clears_them(
    lab: tuple[NetnsPair, Netns],
) -> None:
    pair, _ = lab
    crashed = Agent(pair)
    try:
        crashed.call("ensure_table", [FIRST, LAST])
        crashed.call("open_hole", "t-short", PEER4, "tcp", PORT, 3)
        crashed.call("open_hole", "t-long", PEER6, "udp", PORT, 600)
    finally:
        crashed.proc.kill()  # SIGKILL: no cleanup of any kind
        crashed.stop()
    # The kernel keeps enforcing both holes, and ends the short one on time with no process.
    assert probe(pair, pair.peer, TCP4, UDP6) == ["open", "open"]
    wait_gone(pair, "holes4", (PEER4, "tcp", PORT), 3 + EXPIRY_SLACK_S)
    assert probe(pair, pair.peer, TCP4) == ["closed"]
    assert set(elements(pair, "holes6")) == {(PEER6, "udp", PORT)}

    restarted = Agent(pair)
    try:
        restarted.call("ensure_table", [FIRST, LAST])
        assert elements(pair, "holes6") == {}
        assert probe(pair, pair.peer, UDP6) == ["closed"]
    finally:
        restarted.stop()


OTHER_TABLE = """
table inet other {
    set friends { type ipv4_addr; elements = { 192.0.2.1 } }
    chain input {
        type filter hook input priority 0; policy accept;
        ip saddr @friends tcp dport 9 counter accept
    }
}
"""


def test_every_operation_leaves_other_tables_alone_and_a_clean_stop_leaves_nothing(
    lab: tuple[NetnsPair, Netns],
) -> None:
    pair, _ = lab
    pair.run_in(pair.endpoint, ["nft", "-f", "-"], input_text=OTHER_TABLE)

    def other() -> str:
        return pair.run_in(pair.endpoint, ["nft", "-j", "list", "table", "inet", "other"]).stdout

    before = other()
    agent = Agent(pair)
    try:
        steps: list[tuple[str, tuple[Any, ...]]] = [
            ("ensure_table", ([FIRST, LAST],)),
            ("open_hole", ("t-1", PEER4, "tcp", PORT, 30)),
            ("close_hole", ("t-1",)),
            ("open_hole", ("t-2", PEER6, "udp", PORT, 30)),
            ("ensure_table", ([FIRST, LAST],)),  # a restart's re-install
            ("open_hole", ("t-3", PEER4, "udp", PORT, 30)),
            ("close_all", ()),
        ]
        for op, args in steps:
            agent.call(op, *args)
            assert other() == before, f"{op} changed table inet other"
        assert tables(pair) == ["inet other", "inet reflector"]
        assert elements(pair, "holes4") == {} and elements(pair, "holes6") == {}
        assert probe(pair, pair.peer, UDP4) == ["closed"]  # close_all kept the drop rule

        agent.call("remove_table")
        assert other() == before
        assert tables(pair) == ["inet other"]
        agent.call("remove_table")  # stopping twice is harmless
    finally:
        agent.stop()


def test_failures_are_firewall_errors_and_bad_requests_touch_nothing(
    lab: tuple[NetnsPair, Netns],
) -> None:
    pair, _ = lab
    # Root without CAP_NET_ADMIN: nftables refuses, and the caller is told so.
    unprivileged = Agent(pair, wrapper=("setpriv", "--bounding-set", "-net_admin", "--"))
    try:
        reply = unprivileged.request("ensure_table", [FIRST, LAST])
        assert reply["error"] == "FirewallError", reply
        assert "install table inet reflector" in reply["message"]
    finally:
        unprivileged.stop()
    assert tables(pair) == []

    agent = Agent(pair)
    try:
        agent.call("ensure_table", [FIRST, LAST])
        for args in [
            ("t-1", PEER4, "tcp", LAST + 1, 30),  # outside the data range
            ("t-1", "224.0.0.1", "udp", PORT, 30),  # multicast "peer"
            ("t-1", PEER4, "icmp", PORT, 30),
            ("t-1", PEER4, "tcp", PORT, 3601),
            ("t 1", PEER4, "tcp", PORT, 30),
        ]:
            assert agent.request("open_hole", *args)["error"] == "ValueError", args
        assert elements(pair, "holes4") == {} and elements(pair, "holes6") == {}

        # The same port for a second live test is refused: closing one must not close both.
        agent.call("open_hole", "t-1", PEER4, "tcp", PORT, 30)
        assert agent.request("open_hole", "t-2", PEER4, "tcp", PORT, 30)["error"] == "ValueError"

        # Someone deleted our table under us: the next hole fails instead of silently not
        # existing, and the session is refused.
        pair.run_in(pair.endpoint, ["nft", "delete", "table", "inet", "reflector"])
        reply = agent.request("open_hole", "t-3", PEER4, "udp", PORT, 30)
        assert reply["error"] == "FirewallError", reply
        assert agent.request("close_hole", "t-1")["error"] == "FirewallError"
    finally:
        agent.stop()
