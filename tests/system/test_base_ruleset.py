"""The host's base firewall: closed, but traceable, and never a reflector of floods.

The ruleset (nft/reflector-base.nft, rendered from nft/reflector-base.nft.j2) is loaded into the
endpoint namespace of the `netns_pair` lab (198.51.100.1, 2001:db8:1::1); the peer (.2, ::2)
probes it the way ping, the three kinds of traceroute and a port scanner do, over both families.
Each test is one row of the probe -> answer table in nft/README.md.

Probes are tests/system/nft_probe.py run in the peer namespace: one socket per probe, so each
answer (echo reply, ICMP port unreachable as ECONNREFUSED, RST as ECONNREFUSED) is counted.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import nft_probe
from .harness import ALLOW_SKIP_ENV, LAB_IPV4_NETWORK, Netns, NetnsPair, stop_process

pytestmark = pytest.mark.system

PROBE = Path(nft_probe.__file__).resolve()
FAMILIES = ("ipv4", "ipv6")
# The defaults the template must render with (nft/README.md gives the reasons).
CONTROL_PORT = 4000
SSH_PORT = 22
REFLECTOR_HOLE_MARK = 0x00524546
RST_BURST, RST_RATE = 30, 10
UNREACH_BURST, UNREACH_RATE = 30, 10
ECHO_BURST, ECHO_RATE = 20, 10
# Traceroute's classic UDP range, a closed port outside any range, and iperf3's (direct mode).
TRACEROUTE_FIRST_PORT, TRACEROUTE_LAST_PORT = 33434, 33534
CLOSED_HIGH_PORT = 47613
DIRECT_MODE_PORT = 5201
# Extra TCP ports the role may open: the health-http listener's, and another service's.
HEALTH_HTTP_PORT, OTHER_SERVICE_PORT = 8080, 9100
# Well above every per-source burst, few enough to send in a few milliseconds.
FLOOD_PROBES = 200
# The kernel's own ICMP error limits (per destination a burst of 6, then 1/s for IPv4 and 10/s
# for IPv6; 1000/s in all) would cap the port-unreachable flood before the ruleset does. The
# flood tests switch them off in the endpoint namespace, so they measure the ruleset's own limit.
_NO_KERNEL_ICMP_LIMITS = (
    "net.ipv4.icmp_ratelimit=0",
    "net.ipv4.icmp_ratemask=0",
    "net.ipv6.icmp.ratelimit=0",
)


@dataclass(frozen=True, kw_only=True)
class Answers:
    """How a batch of probes was answered, and how long sending them took."""

    counts: Mapping[str, int]
    sending_s: float

    def __getitem__(self, outcome: str) -> int:
        return self.counts.get(outcome, 0)


def address_of(ns: Netns, family: str) -> str:
    return ns.ipv4 if family == "ipv4" else ns.ipv6


def load(pair: NetnsPair, ruleset: str, tmp_path: Path, name: str = "ruleset.nft") -> None:
    """`nft -f` a ruleset in the endpoint namespace, as the nftables service would."""
    path = tmp_path / name
    path.write_text(ruleset)
    pair.run_in(pair.endpoint, ["nft", "-f", str(path)])


def probe(pair: NetnsPair, mode: str, *args: object) -> Answers:
    """Run one batch of nft_probe.py probes from the peer namespace."""
    cmd = [sys.executable, str(PROBE), mode, *(str(arg) for arg in args)]
    result = json.loads(pair.run_in(pair.peer, cmd).stdout)
    return Answers(counts=result["answers"], sending_s=result["sending_s"])


def nft_list(pair: NetnsPair, *what: str, stateless: bool = False) -> str:
    flags = ["-s"] if stateless else []
    return pair.run_in(pair.endpoint, ["nft", *flags, "list", *what]).stdout


@contextmanager
def listener(pair: NetnsPair, port: int) -> Iterator[None]:
    """A TCP accepter and UDP echoer on `port` in the endpoint namespace (a service there)."""
    proc = pair.popen_in(pair.endpoint, [sys.executable, str(PROBE), "listen", str(port)])
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.strip() == "ready", f"listener on {port} did not start: {line!r}"
        yield
    finally:
        stop_process(proc)


@pytest.fixture
def base(netns_pair: NetnsPair, tmp_path: Path) -> NetnsPair:
    """The lab with the default base ruleset loaded in the endpoint namespace."""
    load(netns_pair, nft_probe.RENDERED.read_text(), tmp_path)
    return netns_pair


def _flood_limit(burst: int, rate: int, sending_s: float) -> int:
    """Most answers a token bucket may give to a flood: the burst plus what refilled meanwhile
    (one token of slack for a refill landing between two probes)."""
    return burst + int(rate * sending_s) + 1


# --- the file itself -------------------------------------------------------------------------


def test_committed_ruleset_is_the_template_rendered_with_defaults() -> None:
    assert nft_probe.RENDERED.read_text() == nft_probe.render_template()


def test_ruleset_never_flushes_what_it_does_not_own() -> None:
    text = nft_probe.RENDERED.read_text()
    statements = [line.split("#")[0].strip() for line in text.splitlines()]
    assert "flush ruleset" not in statements
    assert [s for s in statements if s.startswith(("flush", "delete"))] == [
        "delete table inet reflector_base"
    ]


# --- probe -> answer -------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_ping_is_answered(base: NetnsPair, family: str) -> None:
    answers = probe(base, "echo", address_of(base.endpoint, family), 1)
    assert answers["reply"] == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [TRACEROUTE_FIRST_PORT, TRACEROUTE_LAST_PORT, CLOSED_HIGH_PORT])
def test_udp_to_a_closed_port_gets_port_unreachable(
    base: NetnsPair, family: str, port: int
) -> None:
    answers = probe(base, "udp", address_of(base.endpoint, family), port, 1)
    assert answers["refused"] == 1


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("port", [80, 443, CLOSED_HIGH_PORT])
def test_tcp_syn_to_a_closed_port_gets_rst_at_once(base: NetnsPair, family: str, port: int) -> None:
    answers = probe(base, "tcp", address_of(base.endpoint, family), port, 1)
    assert answers["refused"] == 1  # an RST within ANSWER_WAIT_S, not a timeout


@pytest.mark.parametrize("family", FAMILIES)
def test_control_port_is_open_for_tcp_and_udp(base: NetnsPair, family: str) -> None:
    endpoint = address_of(base.endpoint, family)
    with listener(base, CONTROL_PORT):
        assert probe(base, "tcp", endpoint, CONTROL_PORT, 1)["connected"] == 1
        assert probe(base, "udp", endpoint, CONTROL_PORT, 1)["reply"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_service_on_another_port_stays_closed(base: NetnsPair, family: str) -> None:
    endpoint = address_of(base.endpoint, family)
    with listener(base, CLOSED_HIGH_PORT):
        assert probe(base, "tcp", endpoint, CLOSED_HIGH_PORT, 1)["refused"] == 1
        assert probe(base, "udp", endpoint, CLOSED_HIGH_PORT, 1)["refused"] == 1


# Pings to every host on the link: one broadcast and one multicast group for IPv4, all-nodes
# for IPv6. (family, group address)
_GROUP_PINGS = {
    "ipv4-broadcast": ("ipv4", str(LAB_IPV4_NETWORK.broadcast_address)),
    "ipv4-all-hosts": ("ipv4", "224.0.0.1"),
    "ipv6-all-nodes": ("ipv6", "ff02::1"),
}
# Linux ignores broadcast and multicast pings over IPv4 by default, but not over IPv6. The test
# makes the endpoint's kernel answer both, so that silence can come only from the ruleset.
_KERNEL_ANSWERS_GROUP_PINGS = (
    "net.ipv4.icmp_echo_ignore_broadcasts=0",
    "net.ipv6.icmp.echo_ignore_multicast=0",
)


@pytest.mark.parametrize("target", sorted(_GROUP_PINGS))
def test_a_ping_to_a_broadcast_or_multicast_address_is_silently_dropped(
    netns_pair: NetnsPair, tmp_path: Path, target: str
) -> None:
    family, group = _GROUP_PINGS[target]
    source, interface = address_of(netns_pair.peer, family), netns_pair.peer.interface
    netns_pair.run_in(netns_pair.endpoint, ["sysctl", "-q", "-w", *_KERNEL_ANSWERS_GROUP_PINGS])
    # Without the ruleset the endpoint answers: the probe would see a reply if one came.
    assert probe(netns_pair, "echo-group", source, group, interface, 1)["reply"] == 1

    load(netns_pair, nft_probe.RENDERED.read_text(), tmp_path)
    assert probe(netns_pair, "echo-group", source, group, interface, 3)["reply"] == 0
    # The same host, pinged at its own address, is answered.
    assert probe(netns_pair, "echo", address_of(netns_pair.endpoint, family), 1)["reply"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_ssh_is_open_by_default(base: NetnsPair, family: str) -> None:
    with listener(base, SSH_PORT):
        assert probe(base, "tcp", address_of(base.endpoint, family), SSH_PORT, 1)["connected"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_ssh_is_closed_when_the_role_says_so(
    netns_pair: NetnsPair, tmp_path: Path, family: str
) -> None:
    load(netns_pair, nft_probe.render_template({"reflector_nft_ssh_open": False}), tmp_path)
    with listener(netns_pair, SSH_PORT):
        answers = probe(netns_pair, "tcp", address_of(netns_pair.endpoint, family), SSH_PORT, 1)
    assert answers["refused"] == 1


def test_control_port_follows_the_role(netns_pair: NetnsPair, tmp_path: Path) -> None:
    load(netns_pair, nft_probe.render_template({"reflector_nft_control_port": 4433}), tmp_path)
    with listener(netns_pair, 4433), listener(netns_pair, CONTROL_PORT):
        assert probe(netns_pair, "tcp", netns_pair.endpoint.ipv4, 4433, 1)["connected"] == 1
        assert probe(netns_pair, "tcp", netns_pair.endpoint.ipv4, CONTROL_PORT, 1)["refused"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_extra_tcp_ports_from_the_role_are_open_for_tcp_only(
    netns_pair: NetnsPair, tmp_path: Path, family: str
) -> None:
    ports = [OTHER_SERVICE_PORT, HEALTH_HTTP_PORT, HEALTH_HTTP_PORT]  # unsorted, a duplicate
    load(netns_pair, nft_probe.render_template({"reflector_nft_extra_tcp_ports": ports}), tmp_path)
    endpoint = address_of(netns_pair.endpoint, family)
    with listener(netns_pair, HEALTH_HTTP_PORT), listener(netns_pair, OTHER_SERVICE_PORT):
        assert probe(netns_pair, "tcp", endpoint, HEALTH_HTTP_PORT, 1)["connected"] == 1
        assert probe(netns_pair, "tcp", endpoint, OTHER_SERVICE_PORT, 1)["connected"] == 1
        assert probe(netns_pair, "udp", endpoint, HEALTH_HTTP_PORT, 1)["refused"] == 1
    # The control port stays open beside them.
    with listener(netns_pair, CONTROL_PORT):
        assert probe(netns_pair, "tcp", endpoint, CONTROL_PORT, 1)["connected"] == 1


def test_no_extra_tcp_port_is_open_by_default() -> None:
    assert "REFLECTOR_EXTRA_TCP_PORTS" not in nft_probe.RENDERED.read_text()
    ports = [OTHER_SERVICE_PORT, HEALTH_HTTP_PORT, HEALTH_HTTP_PORT]
    rendered = nft_probe.render_template({"reflector_nft_extra_tcp_ports": ports})
    expected = f"{{ {HEALTH_HTTP_PORT}, {OTHER_SERVICE_PORT} }}"  # sorted, once each
    assert f"define REFLECTOR_EXTRA_TCP_PORTS = {expected}\n" in rendered
    assert "\t\ttcp dport $REFLECTOR_EXTRA_TCP_PORTS accept\n" in rendered


# --- the real tools, as an appliance runs them ----------------------------------------------

# traceroute's methods: ICMP echo; UDP to 33434 and up (its default); UDP to one port (53);
# TCP SYN to 443. Each must show the endpoint as hop 1 with all three probes answered.
_TRACEROUTE_METHODS = {
    "icmp": ["-I"],
    "udp-rising-ports": [],
    "udp-one-port": ["-U"],
    "tcp-443": ["-T", "-p", "443"],
}
# mtr's modes; two rounds 0.1 s apart, then 1 s for late answers: about 1.3 s per run.
MTR_TIMEOUT_S = 20.0
_MTR_MODES = {"icmp": [], "udp": ["-u"], "tcp-443": ["-T", "-P", "443"]}


def require_tool(binary: str, package: str) -> None:
    """Fail (skip only where system tests may skip) when a Debian tool the tests drive is absent."""
    if shutil.which(binary):
        return
    message = f"{binary} is not installed: apt-get install {package}"
    if os.environ.get(ALLOW_SKIP_ENV) == "1":
        pytest.skip(message)
    pytest.fail(message, pytrace=False)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", sorted(_TRACEROUTE_METHODS))
def test_traceroute_reaches_the_endpoint_as_the_last_hop(
    base: NetnsPair, family: str, method: str
) -> None:
    require_tool("traceroute", "traceroute")
    endpoint = address_of(base.endpoint, family)
    options = ["-n", "-q", "3", "-w", "1", "-m", "5", *_TRACEROUTE_METHODS[method]]
    output = base.run_in(base.peer, ["traceroute", *options, endpoint]).stdout
    last_hop = output.strip().splitlines()[-1].split()
    assert last_hop[:2] == ["1", endpoint], output
    assert "*" not in last_hop, output


@pytest.mark.parametrize("family", FAMILIES)
def test_mtr_reports_the_endpoint_without_loss_in_every_mode(base: NetnsPair, family: str) -> None:
    require_tool("mtr", "mtr-tiny")
    endpoint = address_of(base.endpoint, family)
    options = ["--report", "-n", "-c", "2", "-i", "0.1", "--gracetime", "1"]
    # The modes run side by side: each waits out its grace time, and nothing they send can
    # come near the per-source limits.
    runs = {
        mode: base.popen_in(base.peer, ["mtr", *options, *extra, endpoint])
        for mode, extra in _MTR_MODES.items()
    }
    for mode, proc in runs.items():
        output, errors = proc.communicate(timeout=MTR_TIMEOUT_S)
        assert proc.returncode == 0, f"mtr ({mode}): {errors}"
        last_hop = output.strip().splitlines()[-1].split()
        assert last_hop[:4] == ["1.|--", endpoint, "0.0%", "2"], f"mtr ({mode}):\n{output}"


# --- floods are answered only up to the limits ----------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("mode", "port", "outcome", "burst", "rate"),
    [
        ("udp", TRACEROUTE_FIRST_PORT, "refused", UNREACH_BURST, UNREACH_RATE),
        ("tcp", 443, "refused", RST_BURST, RST_RATE),
        ("echo", None, "reply", ECHO_BURST, ECHO_RATE),
    ],
)
def test_a_flood_is_answered_only_up_to_the_limit(
    base: NetnsPair,
    family: str,
    mode: str,
    port: int | None,
    outcome: str,
    burst: int,
    rate: int,
) -> None:
    base.run_in(base.endpoint, ["sysctl", "-q", "-w", *_NO_KERNEL_ICMP_LIMITS])
    target = [address_of(base.endpoint, family), *([port] if port else [])]
    answers = probe(base, mode, *target, FLOOD_PROBES)
    assert answers.sending_s < 1.0
    assert burst <= answers[outcome] <= _flood_limit(burst, rate, answers.sending_s)
    assert answers["silent"] == FLOOD_PROBES - answers[outcome]  # beyond the limit: silence


# --- what IPv6 and PMTU discovery need ------------------------------------------------------


def test_ipv6_neighbour_discovery_passes(base: NetnsPair) -> None:
    # A fresh lab has no neighbour entries: this echo needs NS and NA both ways first.
    base.run_in(base.endpoint, ["ip", "neigh", "flush", "all"])
    base.run_in(base.peer, ["ip", "neigh", "flush", "all"])
    assert probe(base, "echo", base.endpoint.ipv6, 1)["reply"] == 1
    neighbours = base.run_in(base.endpoint, ["ip", "-6", "neigh", "show", base.peer.ipv6]).stdout
    assert "lladdr" in neighbours


@pytest.mark.parametrize(("family", "mtu"), [("ipv4", 1300), ("ipv6", 1280)])
def test_packet_too_big_reaches_the_kernel(base: NetnsPair, family: str, mtu: int) -> None:
    endpoint, peer = address_of(base.endpoint, family), address_of(base.peer, family)
    route = ["ip", "route", "get", peer]
    assert f"mtu {mtu}" not in base.run_in(base.endpoint, route).stdout
    base.run_in(base.peer, [sys.executable, str(PROBE), "too-big", endpoint, peer, str(mtu)])
    assert f"mtu {mtu}" in base.run_in(base.endpoint, route).stdout


# --- the contract with Reflector's own table ------------------------------------------------

_REFLECTOR_TABLE = f"""
table inet reflector {{
    chain holes {{
        type filter hook input priority -10; policy accept;
        ip saddr 198.51.100.2 meta l4proto {{ tcp, udp }} th dport {DIRECT_MODE_PORT} \
meta mark set {REFLECTOR_HOLE_MARK:#010x}
        ip6 saddr 2001:db8:1::2 meta l4proto {{ tcp, udp }} th dport {DIRECT_MODE_PORT} \
meta mark set {REFLECTOR_HOLE_MARK:#010x}
    }}
}}
"""


@pytest.mark.parametrize("family", FAMILIES)
def test_a_hole_marked_by_reflectors_table_is_open_and_closed_without_it(
    base: NetnsPair, tmp_path: Path, family: str
) -> None:
    endpoint = address_of(base.endpoint, family)
    with listener(base, DIRECT_MODE_PORT):
        load(base, _REFLECTOR_TABLE, tmp_path, "reflector.nft")
        assert probe(base, "tcp", endpoint, DIRECT_MODE_PORT, 1)["connected"] == 1
        assert probe(base, "udp", endpoint, DIRECT_MODE_PORT, 1)["reply"] == 1
        base.run_in(base.endpoint, ["nft", "delete", "table", "inet", "reflector"])
        assert probe(base, "tcp", endpoint, DIRECT_MODE_PORT, 1)["refused"] == 1
        assert probe(base, "udp", endpoint, DIRECT_MODE_PORT, 1)["refused"] == 1


def test_hole_mark_matches_the_contract() -> None:
    text = nft_probe.RENDERED.read_text()
    assert f"define REFLECTOR_HOLE_MARK = {REFLECTOR_HOLE_MARK:#010x}\n" in text


# --- reloading ------------------------------------------------------------------------------

_OTHER_TABLE = """
table inet other {
    counter seen { }
    chain input {
        type filter hook input priority -100; policy accept;
        counter name "seen"
    }
}
"""


def test_reload_is_idempotent_and_leaves_other_tables_alone(
    base: NetnsPair, tmp_path: Path
) -> None:
    load(base, _OTHER_TABLE, tmp_path, "other.nft")
    assert probe(base, "echo", base.endpoint.ipv4, 3)["reply"] == 3
    other_before = nft_list(base, "table", "inet", "other")
    assert "packets 0 " not in other_before  # it has counted the echo requests
    assert base.peer.ipv4 in nft_list(base, "set", "inet", "reflector_base", "echo_v4")

    load(base, nft_probe.RENDERED.read_text(), tmp_path)
    first = nft_list(base, "table", "inet", "reflector_base", stateless=True)
    load(base, nft_probe.RENDERED.read_text(), tmp_path)
    second = nft_list(base, "table", "inet", "reflector_base", stateless=True)

    assert second == first
    assert nft_list(base, "tables").splitlines().count("table inet reflector_base") == 1
    # Its own table starts afresh (the per-source buckets are gone); the other is untouched,
    # counters included.
    assert base.peer.ipv4 not in nft_list(base, "set", "inet", "reflector_base", "echo_v4")
    assert nft_list(base, "table", "inet", "other") == other_before


def test_a_broken_reload_keeps_the_loaded_ruleset(base: NetnsPair, tmp_path: Path) -> None:
    broken = nft_probe.RENDERED.read_text().replace("policy drop;", "policy sideways;")
    path = tmp_path / "broken.nft"
    path.write_text(broken)
    result = base.run_in(base.endpoint, ["nft", "-f", str(path)], check=False)
    assert result.returncode != 0
    assert "policy drop" in nft_list(base, "table", "inet", "reflector_base")
    assert probe(base, "tcp", base.endpoint.ipv4, CLOSED_HIGH_PORT, 1)["refused"] == 1
