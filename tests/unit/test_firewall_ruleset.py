"""Reflector's nftables table and holes as pure data: the exact JSON, validation, counters.

The kernel side (packets really dropped and let through, timeouts really expiring) is in
tests/system/test_firewall_holes.py; here is what can be checked without root.
"""

from __future__ import annotations

import ipaddress
from typing import Any

import pytest

from reflector.firewall import NftFirewall
from reflector.firewall.nft import FirewallError
from reflector.firewall.ruleset import (
    CHAIN_PRIORITY,
    HOLE_GRACE_S,
    MAX_HOLE_TTL_S,
    REFLECTOR_HOLE_MARK,
    ElementState,
    Hole,
    HoleCounters,
    add_holes_batch,
    delete_holes_batch,
    flush_holes_batch,
    hole_ttl_s,
    list_set_batch,
    make_hole,
    owned_holes,
    parse_set_elements,
    remove_table_batch,
    replace_table_batch,
    sum_counters,
    validate_port_range,
    validate_test_id,
    validate_ttl,
)

RANGE = (5201, 5299)
IN_TABLE = {"family": "inet", "table": "reflector"}
TABLE = {"family": "inet", "name": "reflector"}


def _hole(peer: str, proto: str = "tcp", port: int = 5201) -> Hole:
    return make_hole(peer, proto, port, RANGE)


def _rules(batch: dict[str, Any], chain: str) -> list[list[dict[str, Any]]]:
    return [
        c["add"]["rule"]["expr"]
        for c in batch["nftables"]
        if "rule" in c.get("add", {}) and c["add"]["rule"]["chain"] == chain
    ]


def _lookup(family: str, address: str, port: str, set_name: str) -> dict[str, Any]:
    key = [
        {"payload": {"protocol": family, "field": address}},
        {"meta": {"key": "l4proto"}},
        {"payload": {"protocol": "th", "field": port}},
    ]
    return {"match": {"op": "==", "left": {"concat": key}, "right": f"@{set_name}"}}


# -- the table ---------------------------------------------------------------------------------


def test_the_mark_spells_ref_and_matches_the_documented_value() -> None:
    assert REFLECTOR_HOLE_MARK == 0x00524546
    assert REFLECTOR_HOLE_MARK.to_bytes(3, "big") == b"REF"


def test_table_install_first_deletes_any_stale_table_in_the_same_transaction() -> None:
    commands = replace_table_batch(RANGE)["nftables"]
    # add + delete removes a table whether or not it exists; then it is built afresh.
    assert commands[:3] == [
        {"add": {"table": TABLE}},
        {"delete": {"table": TABLE}},
        {"add": {"table": TABLE}},
    ]
    # Only our own table is ever named: no flush ruleset, no other table.
    for command in commands:
        (body,) = command.values()
        (obj,) = body.values()
        assert obj.get("table", obj.get("name")) == "reflector"
        assert obj["family"] == "inet"


def test_hole_sets_are_address_proto_port_with_timeouts_and_counters() -> None:
    sets = {
        c["add"]["set"]["name"]: c["add"]["set"]
        for c in replace_table_batch(RANGE)["nftables"]
        if "set" in c.get("add", {})
    }
    assert sets == {
        "holes4": {
            **IN_TABLE,
            "name": "holes4",
            "type": ["ipv4_addr", "inet_proto", "inet_service"],
            "flags": ["timeout"],
            "stmt": [{"counter": None}],
        },
        "holes6": {
            **IN_TABLE,
            "name": "holes6",
            "type": ["ipv6_addr", "inet_proto", "inet_service"],
            "flags": ["timeout"],
            "stmt": [{"counter": None}],
        },
    }


def test_chains_hook_input_and_output_before_the_base_ruleset_and_accept_by_default() -> None:
    chains = [
        c["add"]["chain"]
        for c in replace_table_batch(RANGE)["nftables"]
        if "chain" in c.get("add", {})
    ]
    assert chains == [
        {**IN_TABLE, "name": name, "type": "filter", "hook": name, "prio": -10, "policy": "accept"}
        for name in ("input", "output")
    ]
    assert CHAIN_PRIORITY < 0  # the filter priority where base rulesets live


def test_input_chain_marks_holes_exempts_loopback_then_drops_the_data_range() -> None:
    mark = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0x00524546}}
    tcp_udp = {"set": ["tcp", "udp"]}
    dport = {"payload": {"protocol": "th", "field": "dport"}}
    assert _rules(replace_table_batch(RANGE), "input") == [
        [_lookup("ip", "saddr", "dport", "holes4"), {"counter": None}, mark, {"accept": None}],
        [_lookup("ip6", "saddr", "dport", "holes6"), {"counter": None}, mark, {"accept": None}],
        [
            {"match": {"op": "==", "left": {"meta": {"key": "iif"}}, "right": "lo"}},
            {"accept": None},
        ],
        [
            {"match": {"op": "==", "left": {"meta": {"key": "l4proto"}}, "right": tcp_udp}},
            {"match": {"op": "==", "left": dport, "right": {"range": [5201, 5299]}}},
            {"counter": None},
            {"drop": None},
        ],
    ]


def test_a_one_port_range_drops_that_port() -> None:
    drop = _rules(replace_table_batch((5201, 5201)), "input")[-1]
    assert drop[1]["match"]["right"] == 5201


def test_output_chain_only_counts_replies_to_the_peer_into_the_same_elements() -> None:
    assert _rules(replace_table_batch(RANGE), "output") == [
        [_lookup("ip", "daddr", "sport", "holes4"), {"counter": None}],
        [_lookup("ip6", "daddr", "sport", "holes6"), {"counter": None}],
    ]


def test_remove_table_deletes_only_ours_even_if_absent() -> None:
    assert remove_table_batch() == {
        "nftables": [{"add": {"table": TABLE}}, {"delete": {"table": TABLE}}]
    }


@pytest.mark.parametrize("port_range", [(0, 10), (5201, 65536), (5299, 5201), (True, 5201)])
def test_bad_port_ranges_are_refused(port_range: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="data port range"):
        validate_port_range(port_range)
    with pytest.raises(ValueError, match="data port range"):
        replace_table_batch(port_range)


# -- holes ---------------------------------------------------------------------------------------


def test_holes_become_elements_with_timeout_and_test_id_per_family() -> None:
    holes = [_hole("198.51.100.2", "tcp"), _hole("2001:db8:1::2", "udp", 5299)]
    assert add_holes_batch(holes, ttl_s=65, test_id="t-1") == {
        "nftables": [
            {
                "add": {
                    "element": {
                        **IN_TABLE,
                        "name": "holes4",
                        "elem": [
                            {
                                "elem": {
                                    "val": {"concat": ["198.51.100.2", "tcp", 5201]},
                                    "timeout": 65,
                                    "comment": "t-1",
                                }
                            }
                        ],
                    }
                }
            },
            {
                "add": {
                    "element": {
                        **IN_TABLE,
                        "name": "holes6",
                        "elem": [
                            {
                                "elem": {
                                    "val": {"concat": ["2001:db8:1::2", "udp", 5299]},
                                    "timeout": 65,
                                    "comment": "t-1",
                                }
                            }
                        ],
                    }
                }
            },
        ]
    }


def test_deleting_and_flushing_holes_name_only_our_sets() -> None:
    assert delete_holes_batch([_hole("198.51.100.2")]) == {
        "nftables": [
            {
                "delete": {
                    "element": {
                        **IN_TABLE,
                        "name": "holes4",
                        "elem": [{"elem": {"val": {"concat": ["198.51.100.2", "tcp", 5201]}}}],
                    }
                }
            }
        ]
    }
    assert flush_holes_batch() == {
        "nftables": [
            {"flush": {"set": {**IN_TABLE, "name": "holes4"}}},
            {"flush": {"set": {**IN_TABLE, "name": "holes6"}}},
        ]
    }
    assert list_set_batch("holes6") == {
        "nftables": [{"list": {"set": {**IN_TABLE, "name": "holes6"}}}]
    }
    with pytest.raises(ValueError, match="not a hole set"):
        list_set_batch("other")


def test_an_ipv4_mapped_peer_gets_an_ipv4_hole_because_that_is_what_the_packets_carry() -> None:
    hole = _hole("::ffff:198.51.100.2")
    assert hole.peer == ipaddress.IPv4Address("198.51.100.2")
    assert hole.set_name == "holes4"


def test_loopback_and_link_local_peers_are_allowed() -> None:
    assert _hole("127.0.0.1").set_name == "holes4"
    assert _hole("::1").set_name == "holes6"
    assert _hole("fe80::1").set_name == "holes6"


@pytest.mark.parametrize(
    "peer",
    [
        "0.0.0.0",
        "::",
        "224.0.0.1",
        "ff02::1",
        "255.255.255.255",
        "240.0.0.1",
        "fe80::1%eth0",
        "198.51.100.0/24",
        "example.com",
        "",
        " 198.51.100.2",
    ],
)
def test_peers_that_are_not_one_unicast_address_are_refused(peer: str) -> None:
    with pytest.raises(ValueError, match="peer"):
        _hole(peer)


@pytest.mark.parametrize("proto", ["icmp", "TCP", "sctp", "", "6"])
def test_only_tcp_and_udp_holes_exist(proto: str) -> None:
    with pytest.raises(ValueError, match="protocol"):
        _hole("198.51.100.2", proto)


@pytest.mark.parametrize("port", [5200, 5300, 0, 4000, True, "5201"])
def test_holes_stay_inside_the_data_port_range(port: Any) -> None:
    with pytest.raises(ValueError, match="data port range 5201-5299"):
        _hole("198.51.100.2", "tcp", port)


@pytest.mark.parametrize("ttl", [0, -1, 3601, 2.5, True])
def test_ttl_is_whole_seconds_between_one_second_and_an_hour(ttl: Any) -> None:
    with pytest.raises(ValueError, match="TTL"):
        validate_ttl(ttl)
    with pytest.raises(ValueError, match="TTL"):
        add_holes_batch([_hole("198.51.100.2")], ttl_s=ttl, test_id="t")


def test_ttl_bounds_are_accepted() -> None:
    assert validate_ttl(1) == 1
    assert validate_ttl(MAX_HOLE_TTL_S) == MAX_HOLE_TTL_S


@pytest.mark.parametrize("test_id", ["", "-x", "a b", 'a"b', "x" * 65, "é"])
def test_test_ids_are_short_plain_tokens(test_id: str) -> None:
    with pytest.raises(ValueError, match="test ID"):
        validate_test_id(test_id)


def test_a_uuid_is_a_valid_test_id() -> None:
    uuid = "0b8f4c4e-6a1d-4f7e-9a55-2d6f0c1e9b11"
    assert validate_test_id(uuid) == uuid


def test_hole_ttl_is_the_remaining_time_rounded_up_plus_a_grace_capped_at_an_hour() -> None:
    assert hole_ttl_s(30) == 30 + HOLE_GRACE_S
    assert hole_ttl_s(29.1) == 30 + HOLE_GRACE_S
    assert hole_ttl_s(0) == HOLE_GRACE_S
    assert hole_ttl_s(10_000) == MAX_HOLE_TTL_S
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="remaining"):
            hole_ttl_s(bad)


# -- reading counters back -------------------------------------------------------------------


def _listing(*elements: dict[str, Any]) -> dict[str, Any]:
    """A set as libnftables 1.0.6 lists it (captured from a real kernel)."""
    return {
        "nftables": [
            {"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {
                "set": {
                    **IN_TABLE,
                    "name": "holes4",
                    "type": ["ipv4_addr", "inet_proto", "inet_service"],
                    "handle": 1,
                    "flags": ["timeout"],
                    "elem": list(elements),
                    "stmt": [{"counter": None}],
                }
            },
        ]
    }


def _elem(
    peer: str, proto: str, port: int, test_id: str, packets: int, nbytes: int
) -> dict[str, Any]:
    return {
        "elem": {
            "val": {"concat": [peer, proto, port]},
            "timeout": 10,
            "expires": 9,
            "comment": test_id,
            "counter": {"packets": packets, "bytes": nbytes},
        }
    }


def test_listed_elements_are_read_with_counters_and_owner() -> None:
    present = parse_set_elements(_listing(_elem("198.51.100.2", "tcp", 5201, "t1", 10, 110536)))
    assert present == {
        ("198.51.100.2", "tcp", 5201): ElementState(packets=10, bytes=110536, test_id="t1")
    }


def test_an_empty_set_lists_without_elements() -> None:
    listing = _listing()
    del listing["nftables"][1]["set"]["elem"]
    assert parse_set_elements(listing) == {}


@pytest.mark.parametrize(
    "listing",
    [
        {},
        {"nftables": []},
        _listing({"elem": {"val": {"concat": ["198.51.100.2", "tcp", 5201]}}}),  # no counter
        _listing({"elem": {"val": "198.51.100.2", "counter": {"packets": 0, "bytes": 0}}}),
        _listing(_elem("198.51.100.2", "tcp", 5201, "t1", -1, 0)),
    ],
)
def test_a_listing_of_unexpected_shape_is_an_error_not_zero_bytes(listing: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="nft listing"):
        parse_set_elements(listing)


def test_counters_add_up_a_tests_holes_and_count_expired_ones() -> None:
    tcp, udp, gone = (
        _hole("198.51.100.2", "tcp"),
        _hole("198.51.100.2", "udp"),
        _hole("198.51.100.2", "tcp", 5202),
    )
    present = parse_set_elements(
        _listing(
            _elem("198.51.100.2", "tcp", 5201, "t1", 10, 1000),
            _elem("198.51.100.2", "udp", 5201, "t1", 5, 500),
            _elem("198.51.100.9", "tcp", 5203, "t2", 7, 700),
        )
    )
    assert sum_counters([tcp, udp, gone], present, "t1") == HoleCounters(
        packets=15, bytes=1500, expired=1
    )
    assert owned_holes([tcp, udp, gone], present, "t1") == [tcp, udp]


def test_a_key_granted_again_to_another_test_is_not_counted_or_closed_by_the_first() -> None:
    hole = _hole("198.51.100.2")
    present = parse_set_elements(_listing(_elem("198.51.100.2", "tcp", 5201, "t2", 3, 300)))
    assert owned_holes([hole], present, "t1") == []
    assert sum_counters([hole], present, "t1") == HoleCounters(packets=0, bytes=0, expired=1)


# -- the shell refuses before it touches nftables ---------------------------------------------


def _firewall() -> NftFirewall:
    """Constructing loads libnftables but sends nothing to the kernel: no root needed."""
    try:
        return NftFirewall(RANGE)
    except FirewallError as exc:  # pragma: no cover - libnftables is a dev dependency
        pytest.fail(f"libnftables must be installed for the unit tests: {exc}")


def test_invalid_requests_raise_value_error_before_nftables_is_asked() -> None:
    firewall = _firewall()
    # The table was never installed: a valid request would be a FirewallError, so each
    # ValueError below proves validation came first.
    with pytest.raises(ValueError, match="data port range"):
        firewall.open_hole("t1", "198.51.100.2", "tcp", 4000, 10)
    with pytest.raises(ValueError, match="peer"):
        firewall.open_hole("t1", "224.0.0.1", "tcp", 5201, 10)
    with pytest.raises(ValueError, match="TTL"):
        firewall.open_hole("t1", "198.51.100.2", "tcp", 5201, 0)
    with pytest.raises(ValueError, match="test ID"):
        firewall.open_hole("", "198.51.100.2", "tcp", 5201, 10)
    with pytest.raises(ValueError, match="test ID"):
        firewall.close_hole("a b")
    with pytest.raises(ValueError, match="data port range"):
        NftFirewall((5299, 5201))


def test_a_hole_before_the_table_is_installed_fails_closed() -> None:
    firewall = _firewall()
    with pytest.raises(FirewallError, match="not installed"):
        firewall.open_hole("t1", "198.51.100.2", "tcp", 5201, 10)
    assert firewall.close_hole("t1") is None
    assert firewall.hole_counters("t1") is None
    firewall.close_all()  # nothing installed, nothing to flush
