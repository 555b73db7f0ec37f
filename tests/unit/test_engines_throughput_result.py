"""Normalizing iperf3 -J output: every number comes from the right side of the right document.

The fixtures are real iperf3 3.12 runs on loopback (tests/unit/data/iperf3/capture.sh); each
test reads the raw field it expects straight out of them.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from reflector.engines.throughput_result import (
    MAX_INTERVALS,
    EngineError,
    ThroughputResult,
    grant_mismatches,
    normalize_iperf3,
)
from reflector.errors import ReflectorError
from reflector.server.dataplane import engine_reported_bytes

DATA = Path(__file__).parent / "data" / "iperf3"


def load(name: str) -> dict[str, Any]:
    doc = json.loads((DATA / f"{name}.json").read_text())
    assert isinstance(doc, dict)
    return doc


def pair(case: str) -> tuple[dict[str, Any], dict[str, Any]]:
    return load(f"server_{case}"), load(f"client_{case}")


def test_upload_takes_the_endpoint_view_from_the_server_and_the_appliance_view_from_the_client():
    server, client = pair("tcp_1stream")
    result = normalize_iperf3(server, client)

    assert result.direction == "upload"
    assert result.iperf3_version == server["start"]["version"] == "iperf 3.12"
    assert result.endpoint.role == "receiver"
    assert result.endpoint.bits_per_second == server["end"]["sum_received"]["bits_per_second"]
    assert result.endpoint.bytes == server["end"]["sum_received"]["bytes"]
    assert result.endpoint.seconds == server["end"]["sum_received"]["seconds"]
    assert result.appliance is not None
    assert result.appliance.role == "sender"
    assert result.appliance.bits_per_second == client["end"]["sum_sent"]["bits_per_second"]
    assert result.appliance.bytes == client["end"]["sum_sent"]["bytes"]
    # The headline is the receiver's rate, iperf3's own headline; the other way is untested.
    assert result.upload_bps == server["end"]["sum_received"]["bits_per_second"]
    assert result.download_bps is None
    assert result.bytes_transferred == server["end"]["sum_received"]["bytes"]


def test_upload_retransmits_come_from_the_sending_appliance_and_are_unknown_without_it():
    server, client = pair("tcp_1stream")

    with_client = normalize_iperf3(server, client)
    server_only = normalize_iperf3(server)

    assert with_client.retransmits == client["end"]["sum_sent"]["retransmits"]
    assert with_client.appliance is not None
    assert with_client.appliance.retransmits == client["end"]["sum_sent"]["retransmits"]
    assert "retransmits" not in server["end"]["sum_received"]
    assert server_only.retransmits is None
    assert server_only.endpoint.retransmits is None
    assert server_only.appliance is None
    assert server_only.cpu.appliance_percent is None


def test_reverse_is_a_download_sent_by_the_endpoint():
    server, client = pair("tcp_reverse")
    assert server["start"]["test_start"]["reverse"] == 1

    result = normalize_iperf3(server, client)

    assert result.direction == "download"
    assert result.params.reverse is True
    assert result.endpoint.role == "sender"
    assert result.endpoint.bytes == server["end"]["sum_sent"]["bytes"]
    assert result.endpoint.retransmits == server["end"]["sum_sent"]["retransmits"]
    assert result.retransmits == server["end"]["sum_sent"]["retransmits"]
    assert result.appliance is not None
    assert result.appliance.role == "receiver"
    assert result.download_bps == client["end"]["sum_received"]["bits_per_second"]
    assert result.upload_bps is None
    assert result.bytes_transferred == server["end"]["sum_sent"]["bytes"]


def test_reverse_without_the_client_falls_back_to_the_endpoint_sending_rate():
    server, _ = pair("tcp_reverse")

    result = normalize_iperf3(server)

    assert result.download_bps == server["end"]["sum_sent"]["bits_per_second"]
    assert result.retransmits == server["end"]["sum_sent"]["retransmits"]


def test_streams_are_reported_one_by_one_and_add_up_to_the_total():
    server, client = pair("tcp_2streams")

    result = normalize_iperf3(server, client)

    assert result.params.streams == 2
    assert len(result.streams) == 2
    for got, raw in zip(result.streams, server["end"]["streams"], strict=True):
        assert got.stream_id == raw["receiver"]["socket"]
        assert got.bytes == raw["receiver"]["bytes"]
        assert got.bits_per_second == raw["receiver"]["bits_per_second"]
        assert got.retransmits is None
    assert sum(s.bytes for s in result.streams) == result.endpoint.bytes


def test_intervals_are_the_endpoint_sums_in_order():
    server, _ = pair("tcp_2streams")

    result = normalize_iperf3(server)

    assert result.intervals_total == len(server["intervals"])
    assert len(result.intervals) == len(server["intervals"])
    for got, raw in zip(result.intervals, server["intervals"], strict=True):
        assert (got.start_s, got.end_s) == (raw["sum"]["start"], raw["sum"]["end"])
        assert got.bytes == raw["sum"]["bytes"]
        assert got.bits_per_second == raw["sum"]["bits_per_second"]
        assert got.omitted is raw["sum"]["omitted"]


def test_udp_loss_and_jitter_come_from_the_receiving_endpoint():
    server, client = pair("udp")

    result = normalize_iperf3(server, client)

    raw = server["end"]["sum_received"]
    assert result.params.protocol == "udp"
    assert result.params.bitrate_limit_bps == 10_000_000
    assert result.udp is not None
    assert result.udp.jitter_ms == raw["jitter_ms"]
    assert result.udp.lost_packets == raw["lost_packets"]
    assert result.udp.lost_percent == raw["lost_percent"]
    assert result.udp.packets == raw["packets"]
    assert result.retransmits is None
    assert result.upload_bps == raw["bits_per_second"]
    assert result.streams[0].udp is not None
    assert result.streams[0].udp.packets == server["end"]["streams"][0]["udp"]["packets"]
    assert result.intervals[0].udp is not None
    assert result.intervals[0].udp.jitter_ms == server["intervals"][0]["sum"]["jitter_ms"]


def test_udp_download_loss_is_known_only_from_the_receiving_appliance():
    server, client = pair("udp_reverse_2streams")

    with_client = normalize_iperf3(server, client)
    server_only = normalize_iperf3(server)

    assert with_client.udp is not None
    assert with_client.udp.jitter_ms == client["end"]["sum_received"]["jitter_ms"]
    assert with_client.udp.packets == client["end"]["sum_received"]["packets"]
    assert with_client.download_bps == client["end"]["sum_received"]["bits_per_second"]
    assert server_only.udp is None
    assert server_only.endpoint.bytes == server["end"]["sum_sent"]["bytes"]


def test_cpu_utilization_is_each_host_own_total():
    server, client = pair("tcp_1stream")

    result = normalize_iperf3(server, client)

    assert result.cpu.endpoint_percent == server["end"]["cpu_utilization_percent"]["host_total"]
    assert result.cpu.appliance_percent == client["end"]["cpu_utilization_percent"]["host_total"]


@pytest.mark.parametrize(
    "case", ["tcp_1stream", "tcp_2streams", "tcp_reverse", "udp", "udp_reverse_2streams"]
)
def test_to_dict_is_plain_json_that_round_trips(case: str):
    result = normalize_iperf3(*pair(case))

    data = result.to_dict()

    assert json.loads(json.dumps(data)) == data
    assert data["params"]["streams"] == result.params.streams
    assert isinstance(data["streams"], list)


def test_intervals_are_capped_and_the_true_count_kept():
    server, _ = pair("tcp_1stream")
    server["intervals"] = [copy.deepcopy(server["intervals"][0]) for _ in range(MAX_INTERVALS + 30)]

    result = normalize_iperf3(server)

    assert len(result.intervals) == MAX_INTERVALS
    assert result.intervals_total == MAX_INTERVALS + 30


@pytest.mark.parametrize(
    ("name", "text"),
    [
        ("server_interrupted", "interrupt - the server has terminated"),
        ("server_port_in_use", "Address already in use"),
    ],
)
def test_an_iperf3_error_document_is_a_typed_error_carrying_its_text(name: str, text: str):
    with pytest.raises(EngineError) as info:
        normalize_iperf3(load(name))

    assert info.value.code == "iperf3_error"
    assert text in info.value.message
    assert isinstance(info.value, ReflectorError)
    assert info.value.to_dict() == {"code": "iperf3_error", "message": info.value.message}


def test_a_client_error_document_is_a_typed_error_too():
    server, _ = pair("tcp_1stream")

    with pytest.raises(EngineError) as info:
        normalize_iperf3(server, load("client_refused"))

    assert info.value.code == "iperf3_error"
    assert "Connection refused" in info.value.message


def test_error_text_is_one_bounded_printable_line():
    with pytest.raises(EngineError) as info:
        normalize_iperf3({"error": "bad\n\x1b[31mthing" + "x" * 1000})

    assert "\n" not in info.value.message
    assert "\x1b" not in info.value.message
    assert len(info.value.message) < 300


def test_a_bidirectional_run_is_refused_as_never_granted():
    with pytest.raises(EngineError, match="bidir"):
        normalize_iperf3(*pair("tcp_bidir"))


def test_a_client_json_from_another_test_is_refused():
    server, _ = pair("tcp_1stream")
    _, other_client = pair("tcp_2streams")

    with pytest.raises(EngineError, match="different tests"):
        normalize_iperf3(server, other_client)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield (*prefix, key)
            yield from _paths(value, (*prefix, key))
    elif isinstance(doc, list):
        for index, value in enumerate(doc):
            yield (*prefix, index)
            yield from _paths(value, (*prefix, index))


def _mutated(doc: dict[str, Any], path: tuple[Any, ...], value: object) -> dict[str, Any]:
    out = copy.deepcopy(doc)
    node: Any = out
    for step in path[:-1]:
        node = node[step]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return out


_DELETE = object()


@pytest.mark.parametrize("case", ["tcp_reverse", "udp_reverse_2streams"])
def test_any_damaged_field_gives_only_the_typed_error(case: str):
    """Every field deleted or replaced by a wrong type: a result or EngineError, nothing else."""
    server, client = pair(case)
    outcomes: list[str] = []
    for target, which in ((server, "server"), (client, "client")):
        for path in _paths(target):
            for value in (_DELETE, None, "x", -1, True, [], float("nan")):
                damaged = _mutated(target, path, value)
                docs = (damaged, client) if which == "server" else (server, damaged)
                try:
                    result = normalize_iperf3(*docs)
                except EngineError as exc:
                    outcomes.append(exc.code)
                else:
                    outcomes.append("result" if isinstance(result, ThroughputResult) else "?")

    assert set(outcomes) == {"iperf3_error", "result"}


def test_a_run_within_its_grant_has_no_mismatch():
    result = normalize_iperf3(*pair("tcp_2streams"))

    assert (
        grant_mismatches(result.params, protocol="tcp", streams=2, reverse=False, duration_s=1)
        == ()
    )
    assert (
        grant_mismatches(result.params, protocol="tcp", streams=4, reverse=False, duration_s=10)
        == ()
    )


def test_what_the_client_ran_beyond_its_grant_is_listed():
    params = normalize_iperf3(*pair("udp_reverse_2streams")).params

    reasons = grant_mismatches(params, protocol="tcp", streams=1, reverse=False, duration_s=1)

    assert len(reasons) == 3
    assert any("protocol udp" in r for r in reasons)
    assert any("2 streams" in r for r in reasons)
    assert any("reverse=True" in r for r in reasons)


def test_a_byte_count_run_or_a_longer_run_is_a_mismatch():
    params = normalize_iperf3(*pair("tcp_1stream")).params
    by_bytes = dataclasses.replace(params, duration_s=0, bytes_limit=10**9)

    assert grant_mismatches(by_bytes, protocol="tcp", streams=1, reverse=False, duration_s=1)
    assert grant_mismatches(params, protocol="tcp", streams=1, reverse=False, duration_s=0)


# --- what a direct-mode test is charged (reflector/server/dataplane.py)


@pytest.mark.parametrize(("case", "charged"), [("tcp_1stream", "rx"), ("tcp_reverse", "tx")])
def test_a_direct_mode_test_is_charged_the_bytes_iperf3_reports_in_its_direction(
    case: str, charged: str
) -> None:
    server, client = pair(case)
    result = normalize_iperf3(server, client).to_dict()
    rx, tx = engine_reported_bytes(result)
    moved = server["end"]["sum_received" if charged == "rx" else "sum_sent"]["bytes"]
    assert moved > 0
    assert (rx, tx) == ((moved, 0) if charged == "rx" else (0, moved))


def test_a_failed_run_reports_no_bytes() -> None:
    assert engine_reported_bytes({"error": {"code": "iperf3_failed"}}) == (0, 0)
    assert engine_reported_bytes({"bytes_transferred": -1, "direction": "upload"}) == (0, 0)
