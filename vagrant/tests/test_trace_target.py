"""The endpoint as a trace target, seen from the appliance machine (issue 10, spec §7.3, §9.2,
§10.2).

The endpoint runs the base ruleset the role installed (nft/reflector-base.nft): closed, but
traceable. From the appliance, over IPv4 and IPv6, with Debian's own tools (in the box):

- `ping` is answered; `traceroute -I`, its default UDP, `traceroute -U` and `traceroute -T -p 443`
  all show the endpoint as the last hop, every probe answered; so does `mtr --report` in its ICMP,
  UDP and TCP modes;
- a TCP connect to a closed port is refused (RST) at once, not left to time out, and a UDP
  datagram to a closed port draws ICMP port unreachable, even with a service listening behind
  the port (so the answer is the firewall's, not an empty port's);
- the control port answers only authenticated peers: the paired appliance's hello is answered,
  the same appliance under a second, unpaired identity is refused with `unknown_peer` (the key
  decides, not the address), and the outsider, with no key at all, gets TLS alert
  "certificate required".

Every probe that draws an error answer (port unreachable, RST) or an echo reply is rate-limited
per source by the ruleset, and port unreachables also by the endpoint's kernel. The tests pace
themselves (`Pacer`) so that each one starts with full buckets: a `*` then means the firewall
dropped a probe, never that an earlier test spent the budget.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest
from machines import (
    CONTROL_PORT,
    FAMILIES,
    REFLECTOR,
    Machine,
    transient_unit,
    unit_output,
    wait_service_ready,
    wait_until,
)

from reflector.tls import ALPN_LINK

# Ports no service of the role listens on: traceroute's classic UDP range (its first and last),
# the two TCP ports traceroutes aim at, and one high port, where the tests run a listener.
# (22 and the control port are open; 5201-5299 is Reflector's data range, closed by its own
# table, silently while it runs.)
TRACEROUTE_FIRST_PORT, TRACEROUTE_LAST_PORT = 33434, 33534
CLOSED_TCP_PORTS = (80, 443)
CLOSED_UDP_PORTS = (TRACEROUTE_FIRST_PORT, TRACEROUTE_LAST_PORT)
GUARDED_PORT = 47613
# An RST or a port unreachable on one bridge arrives within milliseconds; a dropped probe would
# run into PROBE_TIMEOUT_S (past TCP's 1 s SYN retransmission). "At once" is well below both.
REFUSED_WITHIN_S = 1.0
PROBE_TIMEOUT_S = 3.0
# The ruleset's per-source buckets (nft/README.md, the role's defaults): the slowest to refill
# from empty is a burst of 30 at 10/s.
RULESET_REFILL_S = 3.0
# The kernel's own per-destination ICMP error limit: a burst of 6 tokens, one per
# `icmp_ratelimit` (IPv4) or `icmp.ratelimit` (IPv6) milliseconds (XRLIM_BURST_FACTOR).
KERNEL_ICMP_BURST = 6
KERNEL_RATELIMIT_SYSCTL = {
    "ipv4": "/proc/sys/net/ipv4/icmp_ratelimit",
    "ipv6": "/proc/sys/net/ipv6/icmp/ratelimit",
}

# traceroute's methods: ICMP echo; UDP to 33434 and up (its default); UDP to one port (53); TCP
# SYN to 443. The endpoint is one hop away on the private network.
TRACEROUTE_METHODS = {
    "icmp": ["-I"],
    "udp-rising-ports": [],
    "udp-one-port": ["-U"],
    "tcp-443": ["-T", "-p", "443"],
}
TRACEROUTE_OPTIONS = ["-n", "-q", "3", "-w", "1", "-m", "5"]
# mtr's modes, two rounds 0.1 s apart, then 1 s for late answers.
MTR_MODES = {"icmp": [], "udp": ["-u"], "tcp-443": ["-T", "-P", "443"]}
MTR_OPTIONS = ["--report", "-n", "-c", "2", "-i", "0.1", "--gracetime", "1"]
PING_COUNT = 3


# --- Scripts run on the machines (Debian's python3, standard library only) ------------------

# `proto address timeout port...`: one probe per port, in turn; per port the outcome
# ("connected", "reply", "refused": RST or port unreachable, "silent") and how long it took.
ANSWER = r"""
import json, socket, sys, time
proto, address, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
family = socket.AF_INET6 if ":" in address else socket.AF_INET
kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
answers = {}
for port in sys.argv[4:]:
    start = time.monotonic()
    with socket.socket(family, kind) as sock:
        sock.settimeout(timeout)
        try:
            sock.connect((address, int(port)))
            if proto == "udp":
                sock.send(b"reflector-trace-target")
                sock.recv(64)
            outcome = "connected" if proto == "tcp" else "reply"
        except ConnectionRefusedError:
            outcome = "refused"
        except TimeoutError:
            outcome = "silent"
    answers[port] = {"outcome": outcome, "seconds": time.monotonic() - start}
print(json.dumps(answers))
"""

# `port`: a service on both families, TCP (accept, close) and UDP (echo), until stopped.
LISTENER = r"""
import select, socket, sys
port = int(sys.argv[1])
tcp = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
udp = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
for sock in (tcp, udp):
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
tcp.listen(16)
print("ready", flush=True)
while True:
    for sock in select.select([tcp, udp], [], [])[0]:
        if sock is tcp:
            sock.accept()[0].close()
        else:
            data, peer = sock.recvfrom(2048)
            sock.sendto(data, peer)
"""

# `address port alpn`: a TLS 1.3 client with no certificate at all (a host that was never given
# a key). Prints how the endpoint ended it: the TLS alert's reason, "eof", "data" or "timeout".
KEYLESS_CLIENT = r"""
import socket, ssl, sys
address, port, alpn = sys.argv[1], int(sys.argv[2]), sys.argv[3]
context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
context.check_hostname = False
context.verify_mode = ssl.CERT_NONE
context.minimum_version = ssl.TLSVersion.TLSv1_3
context.set_alpn_protocols([alpn])
try:
    with socket.create_connection((address, port), timeout=10) as raw:
        with context.wrap_socket(raw) as tls:
            # TLS 1.3: the client finishes its side first; the verdict arrives on read.
            print("data" if tls.recv(1) else "eof")
except ssl.SSLError as exc:
    print(exc.reason)
except TimeoutError:
    print("timeout")
"""


# --- Pacing ---------------------------------------------------------------------------------


@dataclass
class Pacer:
    """Starts each probing block with full rate-limit buckets, per family.

    The endpoint answers a source within per-source budgets (the ruleset's, and the kernel's for
    ICMP errors), and this suite is one source probing again and again. A block waits until the
    budgets spent by the previous block of the same family have refilled.
    """

    refill_s: dict[str, float]
    last_end: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def probing(self, family: str) -> Iterator[None]:
        ready_at = self.last_end.get(family, 0.0) + self.refill_s[family]
        time.sleep(max(0.0, ready_at - time.monotonic()))
        try:
            yield
        finally:
            self.last_end[family] = time.monotonic()


@pytest.fixture(scope="module")
def pacer(endpoint: Machine) -> Pacer:
    def refill_s(family: str) -> float:
        ratelimit_ms = int(endpoint.check("cat %s", KERNEL_RATELIMIT_SYSCTL[family]))
        return max(RULESET_REFILL_S, KERNEL_ICMP_BURST * ratelimit_ms / 1000)

    return Pacer(refill_s={family: refill_s(family) for family in FAMILIES})


# --- Fixtures -------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def base_ruleset(endpoint: Machine) -> None:
    """The precondition of every test here: the role loaded the base ruleset on the endpoint."""
    table = endpoint.check("sudo nft list table inet reflector_base")
    assert "policy drop;" in table, table


@pytest.fixture
def guarded_port(endpoint: Machine) -> Iterator[int]:
    """GUARDED_PORT with a TCP and UDP service behind it on the endpoint for the test, shown to
    answer the endpoint itself (over loopback): a refusal from outside is the firewall's."""
    argv = ["python3", "-c", LISTENER, str(GUARDED_PORT)]
    with transient_unit(endpoint, argv, "rfl-svc") as unit:
        wait_until(lambda: "ready" in unit_output(endpoint, unit), 15, "the service listens")
        for family in FAMILIES:
            own = endpoint.address_in(family)
            assert (
                answers(endpoint, "tcp", own, [GUARDED_PORT])[GUARDED_PORT].outcome == "connected"
            )
            assert answers(endpoint, "udp", own, [GUARDED_PORT])[GUARDED_PORT].outcome == "reply"
        yield GUARDED_PORT


@pytest.fixture(scope="module")
def service_ready(endpoint: Machine) -> None:
    wait_service_ready(endpoint)


@pytest.fixture
def stranger_dir(appliance: Machine) -> Iterator[str]:
    """A second appliance identity on the appliance machine, never paired with the endpoint."""
    state_dir = appliance.check("sudo mktemp -d /tmp/rfl-stranger.XXXXXX").strip()
    try:
        yield state_dir
    finally:
        appliance.run("sudo rm -rf %s", state_dir)


# --- Helpers --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    outcome: str
    seconds: float


def answers(source: Machine, proto: str, address: str, ports: list[int]) -> dict[int, Answer]:
    """Probe `ports` of `address` from `source`, one at a time: how each was answered."""
    out = source.check(
        "python3 -c %s %s %s %s " + " ".join(str(int(p)) for p in ports),
        ANSWER,
        proto,
        address,
        str(PROBE_TIMEOUT_S),
    )
    return {int(port): Answer(**answer) for port, answer in json.loads(out).items()}


def as_root(machine: Machine, argv: list[str]) -> str:
    """Run a tool as root on `machine` (raw sockets, sub-second intervals); its stdout."""
    return machine.check("sudo " + shlex.join(argv))


def control_endpoint(endpoint: Machine, family: str) -> str:
    address = endpoint.address_in(family)
    return f"[{address}]:{CONTROL_PORT}" if family == "ipv6" else f"{address}:{CONTROL_PORT}"


# --- ping, traceroute, mtr ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ping_is_answered(appliance: Machine, endpoint: Machine, pacer: Pacer, family: str) -> None:
    with pacer.probing(family):
        out = as_root(appliance, ["ping", "-n", "-c", str(PING_COUNT), "-i", "0.2", "-W", "2",
                                  endpoint.address_in(family)])  # fmt: skip
    sent_received = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert sent_received is not None, out
    assert sent_received.groups() == (str(PING_COUNT), str(PING_COUNT)), out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", list(TRACEROUTE_METHODS))
def test_traceroute_reaches_the_endpoint_as_the_last_hop(
    appliance: Machine, endpoint: Machine, pacer: Pacer, method: str, family: str
) -> None:
    target = endpoint.address_in(family)
    with pacer.probing(family):
        out = as_root(
            appliance, ["traceroute", *TRACEROUTE_OPTIONS, *TRACEROUTE_METHODS[method], target]
        )
    last_hop = out.strip().splitlines()[-1].split()
    assert last_hop[:2] == ["1", target], out
    assert "*" not in last_hop, out  # all three probes answered
    assert not any(mark in last_hop for mark in ("!H", "!N", "!P", "!X", "!A")), out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", list(MTR_MODES))
def test_mtr_reports_the_endpoint_as_the_last_hop_without_loss(
    appliance: Machine, endpoint: Machine, pacer: Pacer, mode: str, family: str
) -> None:
    target = endpoint.address_in(family)
    with pacer.probing(family):
        out = as_root(appliance, ["mtr", *MTR_OPTIONS, *MTR_MODES[mode], target])
    last_hop = out.strip().splitlines()[-1].split()
    assert last_hop[:4] == ["1.|--", target, "0.0%", "2"], out


# --- closed ports ---------------------------------------------------------------------------


# The ports each protocol probes (besides the guarded one): what closed means for that protocol
# is an RST for TCP and ICMP port unreachable for UDP; `answers` reports both as "refused".
CLOSED_PORTS = {"tcp": CLOSED_TCP_PORTS, "udp": CLOSED_UDP_PORTS}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("proto", list(CLOSED_PORTS))
def test_a_closed_port_is_refused_at_once(
    appliance: Machine,
    endpoint: Machine,
    pacer: Pacer,
    guarded_port: int,
    proto: str,
    family: str,
) -> None:
    """TCP gets an RST, UDP ICMP port unreachable, within a second (not after retransmits)."""
    ports = [*CLOSED_PORTS[proto], guarded_port]
    with pacer.probing(family):
        seen = answers(appliance, proto, endpoint.address_in(family), ports)
    assert {port: seen[port].outcome for port in ports} == dict.fromkeys(ports, "refused")
    slow = {port: a.seconds for port, a in seen.items() if a.seconds >= REFUSED_WITHIN_S}
    assert slow == {}, f"refused, but only after the retransmissions: {slow}"


# --- the control port answers only authenticated peers --------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_the_paired_appliance_is_answered_on_the_control_port(
    appliance: Machine, endpoint: Machine, endpoint_id: str, service_ready: None, family: str
) -> None:
    out = appliance.check(
        "sudo %s client hello -e %s --expect-id %s --json",
        REFLECTOR,
        control_endpoint(endpoint, family),
        endpoint_id,
    )
    hello = json.loads(out)
    assert hello["endpoint_id"] == endpoint_id
    # The policy of a paired peer: the one the Vagrantfile gave the role.
    assert hello["policy"]["max_tests_per_hour_per_peer"] == 1000


@pytest.mark.parametrize("family", FAMILIES)
def test_an_unpaired_identity_is_refused_with_unknown_peer(
    appliance: Machine,
    endpoint: Machine,
    endpoint_id: str,
    service_ready: None,
    stranger_dir: str,
    family: str,
) -> None:
    paired_id = appliance.check("sudo %s client id", REFLECTOR).strip()
    stranger_id = appliance.check("sudo %s client id --state-dir %s", REFLECTOR, stranger_dir)
    assert stranger_id.strip() not in ("", paired_id)

    refused = appliance.run(
        "sudo %s client hello -e %s --expect-id %s --state-dir %s --json",
        REFLECTOR,
        control_endpoint(endpoint, family),
        endpoint_id,
        stranger_dir,
    )
    assert refused.rc == 1, refused.stdout
    assert refused.stdout == ""
    assert "reflector: error: unknown_peer:" in refused.stderr, refused.stderr


@pytest.mark.parametrize("family", FAMILIES)
def test_the_outsider_without_a_key_gets_no_tls_session(
    outsider: Machine, endpoint: Machine, service_ready: None, family: str
) -> None:
    out = outsider.check(
        "python3 -c %s %s %s %s",
        KEYLESS_CLIENT,
        endpoint.address_in(family),
        str(CONTROL_PORT),
        ALPN_LINK,
    )
    assert out.strip() == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
