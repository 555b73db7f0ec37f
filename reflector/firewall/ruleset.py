"""Reflector's own nftables table, as pure data: the libnftables JSON for every change we make.

Nothing here talks to the kernel or reads the clock; `nft.py` is the thin shell that sends
these batches through libnftables. Keeping the ruleset pure means the exact rules and set
elements are unit-tested without root, and the privileged helper that applies them has as
little logic of its own as possible.

The table (`inet reflector`), owned entirely by Reflector:

    table inet reflector {
        set holes4 { type ipv4_addr . inet_proto . inet_service; flags timeout; counter; }
        set holes6 { type ipv6_addr . inet_proto . inet_service; flags timeout; counter; }
        chain input {
            type filter hook input priority -10; policy accept;
            ip saddr . meta l4proto . th dport @holes4 counter meta mark set 0x00524546 accept
            ip6 saddr . meta l4proto . th dport @holes6 counter meta mark set 0x00524546 accept
            iif "lo" accept
            meta l4proto { tcp, udp } th dport 5201-5299 counter drop
        }
        chain output {
            type filter hook output priority -10; policy accept;
            ip daddr . meta l4proto . th sport @holes4 counter
            ip6 daddr . meta l4proto . th sport @holes6 counter
        }
    }

Why it is shaped this way:
- A hole is one set element (peer address . protocol . port) whose kernel timeout is the
  session's remaining life plus a grace: the kernel closes it even if every Reflector process is
  killed (fail closed, spec §9.1). No rule is added or removed per session.
- `accept` in this chain only ends this chain; the host's base ruleset (nft/, a separate chain
  at its own priority) still sees the packet and accepts it by the mark. On a host with no other
  firewall the policy is accept, so the hole is all that is needed.
- Every other TCP/UDP packet to the data port range is dropped here, so the range is closed even
  on a host with no firewall of its own (spec §9.2: default inbound is the control port only).
  Established flows are dropped too once their hole is gone: a test cannot outlive its grant.
- Loopback is exempt: nothing from outside arrives on `lo`, and a local relay (the tunnel's
  server end) or a local health check must reach the engines without a hole.
- Set elements carry counters. The kernel counts every lookup that matches the element, so the
  output chain's lookup (the engine's replies to the peer) adds to the same element: one
  element's counter is the bytes of the test in both directions, for byte accounting.
"""

from __future__ import annotations

import ipaddress
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

__all__ = [
    "CHAIN_INPUT",
    "CHAIN_OUTPUT",
    "CHAIN_PRIORITY",
    "HOLE_GRACE_S",
    "MAX_HOLE_TTL_S",
    "MIN_HOLE_TTL_S",
    "REFLECTOR_HOLE_MARK",
    "SET_V4",
    "SET_V6",
    "TABLE_FAMILY",
    "TABLE_NAME",
    "ElementState",
    "Hole",
    "HoleCounters",
    "NftBatch",
    "Proto",
    "add_holes_batch",
    "delete_holes_batch",
    "flush_holes_batch",
    "hole_ttl_s",
    "list_set_batch",
    "make_hole",
    "owned_holes",
    "parse_set_elements",
    "remove_table_batch",
    "replace_table_batch",
    "sum_counters",
    "validate_port_range",
    "validate_test_id",
    "validate_ttl",
]

TABLE_FAMILY: Final = "inet"
TABLE_NAME: Final = "reflector"
SET_V4: Final = "holes4"
SET_V6: Final = "holes6"
CHAIN_INPUT: Final = "input"
CHAIN_OUTPUT: Final = "output"
# Before the usual filter chains (priority 0, where a distribution's or nft/'s base ruleset
# lives), so the mark is set before the base ruleset looks for it; after conntrack (-200) and
# its defragmentation (-400), so `th dport` sees whole packets.
CHAIN_PRIORITY: Final = -10
# "REF" in ASCII. MUST equal the `REFLECTOR_HOLE_MARK` define in nft/'s base ruleset, which
# accepts packets carrying it; change both together.
REFLECTOR_HOLE_MARK: Final = 0x00524546

# The kernel counts element timeouts in milliseconds, but a hole shorter than a second could
# not carry even a TCP handshake and its retransmission.
MIN_HOLE_TTL_S: Final = 1
# One hour: the largest quotas.max_test_duration_sec the config accepts (3600) is the longest
# session, so no legitimate hole lives longer; a bigger value can only be a bug or an attack.
MAX_HOLE_TTL_S: Final = 3600
# Added to a session's remaining time: iperf3 exchanges its results over the data port after the
# test's duration, and the hole must not close under that exchange.
HOLE_GRACE_S: Final = 5
# Session IDs are UUIDs (36 characters); the ID is stored as the element's comment, which the
# kernel limits to a few hundred bytes, and shown to operators in `nft list`.
MAX_TEST_ID_LEN: Final = 64
_TEST_ID_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")
_MAX_PORT: Final = 65535

Proto = Literal["tcp", "udp"]
_PROTOS: Final[frozenset[str]] = frozenset({"tcp", "udp"})

# libnftables' JSON: {"nftables": [command, ...]}; one batch is one kernel transaction.
NftBatch = dict[str, list[dict[str, Any]]]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True, kw_only=True)
class Hole:
    """One (peer address, protocol, port) the data plane lets in: one set element."""

    peer: IPAddress
    proto: Proto
    port: int

    @property
    def set_name(self) -> str:
        return SET_V4 if self.peer.version == 4 else SET_V6

    def key(self) -> tuple[str, str, int]:
        """The element's value as libnftables lists it, for matching listings to holes."""
        return (str(self.peer), self.proto, self.port)


@dataclass(frozen=True, kw_only=True)
class ElementState:
    """A set element as the kernel lists it: its counters and its test (the comment)."""

    packets: int
    bytes: int
    test_id: str | None


@dataclass(frozen=True, kw_only=True)
class HoleCounters:
    """What a test's holes carried, both directions together, at the moment they were read.

    `expired` counts holes the kernel had already removed by their timeout: their bytes are
    lost, so the totals are a lower bound when it is not zero.
    """

    packets: int
    bytes: int
    expired: int


# --------------------------------------------------------------------------------------------
# Validation: every field is checked here, before anything reaches nftables.
# --------------------------------------------------------------------------------------------


def validate_port_range(port_range: tuple[int, int]) -> tuple[int, int]:
    """The data port range as (first, last), inclusive; ValueError if it is not one."""
    first, last = port_range
    for port in (first, last):
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= _MAX_PORT:
            raise ValueError(f"data port range bound must be an integer 1..{_MAX_PORT}: {port!r}")
    if last < first:
        raise ValueError(f"data port range ends ({last}) before it starts ({first})")
    return (first, last)


def validate_test_id(test_id: str) -> str:
    """A test ID safe to key holes by and to store as an element comment."""
    if (
        not isinstance(test_id, str)
        or len(test_id) > MAX_TEST_ID_LEN
        or not _TEST_ID_RE.fullmatch(test_id)
    ):
        raise ValueError(
            f"test ID must be 1..{MAX_TEST_ID_LEN} of [A-Za-z0-9._:-], not starting with"
            f" punctuation: {test_id!r}"
        )
    return test_id


def validate_ttl(ttl_s: int) -> int:
    """A hole's timeout in whole seconds, within MIN_HOLE_TTL_S..MAX_HOLE_TTL_S."""
    if isinstance(ttl_s, bool) or not isinstance(ttl_s, int):
        raise ValueError(f"hole TTL must be an integer number of seconds: {ttl_s!r}")
    if not MIN_HOLE_TTL_S <= ttl_s <= MAX_HOLE_TTL_S:
        raise ValueError(f"hole TTL must be {MIN_HOLE_TTL_S}..{MAX_HOLE_TTL_S} s: {ttl_s}")
    return ttl_s


def _validate_peer(peer: str) -> IPAddress:
    """The peer as the address its packets carry on the wire.

    Accepted: any unicast address, loopback included (harmless, since loopback is exempt from
    the drop rule anyway, and it lets a direct-mode demo on one machine call this unchanged).
    An IPv4-mapped IPv6 address (what a dual-stack socket reports) becomes the IPv4 address,
    because that is what the packets carry. Refused: unspecified, multicast, broadcast and
    reserved addresses (a "peer" there is a bug or an attack), and scoped IPv6 addresses (the
    set cannot hold a zone, so the hole would be wider than the grant).
    """
    if not isinstance(peer, str):
        raise ValueError(f"peer must be an IP address string: {peer!r}")
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        raise ValueError(f"peer is not an IP address: {peer!r}") from None
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id is not None:
            raise ValueError(f"peer must not carry an IPv6 zone: {peer!r}")
        if address.ipv4_mapped is not None:
            address = address.ipv4_mapped
    # For IPv4, "reserved" is 240.0.0.0/4 and the limited broadcast; Python's IPv6 "reserved"
    # list includes ::/8 and with it ::1, so IPv6 relies on the multicast check instead.
    reserved = isinstance(address, ipaddress.IPv4Address) and address.is_reserved
    if address.is_unspecified or address.is_multicast or reserved:
        raise ValueError(f"peer must be a unicast address: {peer!r}")
    return address


def make_hole(peer: str, proto: str, port: int, port_range: tuple[int, int]) -> Hole:
    """Validate one hole request against the configured data port range."""
    address = _validate_peer(peer)
    if proto not in _PROTOS:
        raise ValueError(f"protocol must be tcp or udp: {proto!r}")
    first, last = port_range
    if isinstance(port, bool) or not isinstance(port, int) or not first <= port <= last:
        raise ValueError(f"port must be an integer in the data port range {first}-{last}: {port!r}")
    return Hole(peer=address, proto="tcp" if proto == "tcp" else "udp", port=port)


def hole_ttl_s(remaining_s: float) -> int:
    """The timeout to give a session's hole: its remaining time, rounded up, plus the grace."""
    if not math.isfinite(remaining_s) or remaining_s < 0:
        raise ValueError(f"remaining session time must be a finite number >= 0: {remaining_s!r}")
    return min(MAX_HOLE_TTL_S, math.ceil(remaining_s) + HOLE_GRACE_S)


# --------------------------------------------------------------------------------------------
# Batches (one kernel transaction each)
# --------------------------------------------------------------------------------------------

_TABLE: Final = {"family": TABLE_FAMILY, "name": TABLE_NAME}
_IN_TABLE: Final = {"family": TABLE_FAMILY, "table": TABLE_NAME}


def _set(name: str, address_type: str) -> dict[str, Any]:
    return {
        "set": {
            **_IN_TABLE,
            "name": name,
            "type": [address_type, "inet_proto", "inet_service"],
            "flags": ["timeout"],
            # Per-element counters: the bytes each hole carried, read back for accounting.
            "stmt": [{"counter": None}],
        }
    }


def _chain(name: str, hook: str) -> dict[str, Any]:
    return {
        "chain": {
            **_IN_TABLE,
            "name": name,
            "type": "filter",
            "hook": hook,
            "prio": CHAIN_PRIORITY,
            "policy": "accept",
        }
    }


def _rule(chain: str, *expr: dict[str, Any]) -> dict[str, Any]:
    return {"rule": {**_IN_TABLE, "chain": chain, "expr": list(expr)}}


def _lookup(family: str, address: str, port: str, set_name: str) -> dict[str, Any]:
    """`<family> <address> . meta l4proto . th <port> @<set>`."""
    key = [
        {"payload": {"protocol": family, "field": address}},
        {"meta": {"key": "l4proto"}},
        {"payload": {"protocol": "th", "field": port}},
    ]
    return {"match": {"op": "==", "left": {"concat": key}, "right": f"@{set_name}"}}


def _hole_rule(family: str, set_name: str) -> dict[str, Any]:
    return _rule(
        CHAIN_INPUT,
        _lookup(family, "saddr", "dport", set_name),
        {"counter": None},
        {"mangle": {"key": {"meta": {"key": "mark"}}, "value": REFLECTOR_HOLE_MARK}},
        {"accept": None},
    )


def _drop_rule(port_range: tuple[int, int]) -> dict[str, Any]:
    first, last = port_range
    ports: int | dict[str, list[int]] = first if first == last else {"range": [first, last]}
    return _rule(
        CHAIN_INPUT,
        {
            "match": {
                "op": "==",
                "left": {"meta": {"key": "l4proto"}},
                "right": {"set": ["tcp", "udp"]},
            }
        },
        {
            "match": {
                "op": "==",
                "left": {"payload": {"protocol": "th", "field": "dport"}},
                "right": ports,
            }
        },
        {"counter": None},
        {"drop": None},
    )


def _delete_table_if_present() -> list[dict[str, Any]]:
    """Adding an existing table is a no-op, so add-then-delete removes it whether it exists or
    not, inside the same transaction (nft 1.0.6 has no `destroy`)."""
    return [{"add": {"table": _TABLE}}, {"delete": {"table": _TABLE}}]


def replace_table_batch(port_range: tuple[int, int]) -> NftBatch:
    """Delete any `inet reflector` table (a crashed run's stale holes with it) and create it
    afresh, atomically: there is no moment without the drop rule once the table exists."""
    first_last = validate_port_range(port_range)
    commands = [
        *_delete_table_if_present(),
        {"add": {"table": _TABLE}},
        {"add": _set(SET_V4, "ipv4_addr")},
        {"add": _set(SET_V6, "ipv6_addr")},
        {"add": _chain(CHAIN_INPUT, "input")},
        {"add": _hole_rule("ip", SET_V4)},
        {"add": _hole_rule("ip6", SET_V6)},
        {
            "add": _rule(
                CHAIN_INPUT,
                {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
                {"accept": None},
            )
        },
        {"add": _drop_rule(first_last)},
        {"add": _chain(CHAIN_OUTPUT, "output")},
        {"add": _rule(CHAIN_OUTPUT, _lookup("ip", "daddr", "sport", SET_V4), {"counter": None})},
        {"add": _rule(CHAIN_OUTPUT, _lookup("ip6", "daddr", "sport", SET_V6), {"counter": None})},
    ]
    return {"nftables": commands}


def remove_table_batch() -> NftBatch:
    """Delete the table if it exists (clean stop)."""
    return {"nftables": _delete_table_if_present()}


def _element(hole: Hole, *, ttl_s: int | None = None, test_id: str | None = None) -> dict[str, Any]:
    value = {"concat": [str(hole.peer), hole.proto, hole.port]}
    if ttl_s is None and test_id is None:
        return {"elem": {"val": value}}
    elem: dict[str, Any] = {"val": value}
    if ttl_s is not None:
        elem["timeout"] = ttl_s
    if test_id is not None:
        elem["comment"] = test_id
    return {"elem": elem}


def _by_set(holes: Iterable[Hole]) -> dict[str, list[Hole]]:
    grouped: dict[str, list[Hole]] = {}
    for hole in holes:
        grouped.setdefault(hole.set_name, []).append(hole)
    return grouped


def add_holes_batch(holes: Iterable[Hole], *, ttl_s: int, test_id: str) -> NftBatch:
    """Add elements with a kernel timeout of `ttl_s` seconds, tagged with the test's ID."""
    validate_ttl(ttl_s)
    validate_test_id(test_id)
    commands = [
        {
            "add": {
                "element": {
                    **_IN_TABLE,
                    "name": set_name,
                    "elem": [_element(h, ttl_s=ttl_s, test_id=test_id) for h in members],
                }
            }
        }
        for set_name, members in sorted(_by_set(holes).items())
    ]
    return {"nftables": commands}


def delete_holes_batch(holes: Iterable[Hole]) -> NftBatch:
    """Delete elements; each must still exist (the kernel refuses the whole batch otherwise)."""
    commands = [
        {
            "delete": {
                "element": {**_IN_TABLE, "name": set_name, "elem": [_element(h) for h in members]}
            }
        }
        for set_name, members in sorted(_by_set(holes).items())
    ]
    return {"nftables": commands}


def flush_holes_batch() -> NftBatch:
    """Remove every hole at once, keeping the table and its drop rule."""
    return {
        "nftables": [{"flush": {"set": {**_IN_TABLE, "name": name}}} for name in (SET_V4, SET_V6)]
    }


def list_set_batch(set_name: str) -> NftBatch:
    """List one hole set with its elements and their counters."""
    if set_name not in (SET_V4, SET_V6):
        raise ValueError(f"not a hole set: {set_name!r}")
    return {"nftables": [{"list": {"set": {**_IN_TABLE, "name": set_name}}}]}


# --------------------------------------------------------------------------------------------
# Reading listings back
# --------------------------------------------------------------------------------------------


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"nft listing has a bad {what}: {value!r}")
    return value


def _parse_element(item: object) -> tuple[tuple[str, str, int], ElementState]:
    if not isinstance(item, Mapping) or not isinstance(item.get("elem"), Mapping):
        raise ValueError(f"nft listing has an element without counters: {item!r}")
    elem = item["elem"]
    value = elem.get("val")
    parts = value.get("concat") if isinstance(value, Mapping) else None
    if not isinstance(parts, list) or len(parts) != 3:
        raise ValueError(
            f"nft listing has an element that is not address . proto . port: {value!r}"
        )
    address, proto, port = parts
    counter = elem.get("counter")
    if not isinstance(counter, Mapping):
        raise ValueError(f"nft listing has an element without a counter: {elem!r}")
    comment = elem.get("comment")
    key = (str(ipaddress.ip_address(str(address))), str(proto), _int(port, "port"))
    state = ElementState(
        packets=_int(counter.get("packets"), "packet count"),
        bytes=_int(counter.get("bytes"), "byte count"),
        test_id=comment if isinstance(comment, str) else None,
    )
    return key, state


def parse_set_elements(output: Mapping[str, Any]) -> dict[tuple[str, str, int], ElementState]:
    """The elements of a listed hole set (libnftables JSON output), keyed like `Hole.key()`.

    Raises ValueError on a listing that does not have the shape this module creates, so a
    surprise in the kernel's answer is never read as "no holes, no bytes".
    """
    items = output.get("nftables")
    if not isinstance(items, list):
        raise ValueError("nft listing has no 'nftables' array")
    sets = [item["set"] for item in items if isinstance(item, Mapping) and "set" in item]
    if len(sets) != 1 or not isinstance(sets[0], Mapping):
        raise ValueError(f"nft listing holds {len(sets)} sets, expected 1")
    elements = sets[0].get("elem", [])
    if not isinstance(elements, list):
        raise ValueError("nft listing has a non-list 'elem'")
    return dict(_parse_element(item) for item in elements)


def owned_holes(
    holes: Iterable[Hole], present: Mapping[tuple[str, str, int], ElementState], test_id: str
) -> list[Hole]:
    """The holes of `test_id` still in the kernel. An element with the same key but another
    test's comment is that test's (the key was granted again after ours expired): never ours
    to count or delete."""
    owned = []
    for hole in holes:
        state = present.get(hole.key())
        if state is not None and state.test_id == test_id:
            owned.append(hole)
    return owned


def sum_counters(
    holes: Iterable[Hole], present: Mapping[tuple[str, str, int], ElementState], test_id: str
) -> HoleCounters:
    """Add up the counters of a test's holes; its holes missing from the listing have expired."""
    holes = list(holes)
    owned = owned_holes(holes, present, test_id)
    return HoleCounters(
        packets=sum(present[h.key()].packets for h in owned),
        bytes=sum(present[h.key()].bytes for h in owned),
        expired=len(holes) - len(owned),
    )
