"""GetPathMeta (spec §7.5): facts that let a peer tell a bad path from a busy endpoint.

Routes are looked up by the real kernel: on loopback here, and in a private network namespace
(`unshare -n`) for a peer with no route and for a route that carries its own MTU.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reflector
from reflector import meta
from reflector.clocksync import (
    STA_UNSYNC,
    TIME_ERROR,
    KernelClock,
    clock_synchronized,
    read_kernel_clock,
)
from reflector.meta import (
    NetSample,
    NetSampler,
    health,
    net_rates,
    normalise_peer,
    path_meta,
    read_link_speed,
    time_sync_facts,
)

BUILD = {"version": "1.2.3", "commit": "abc123"}
LOOPBACK_MTU = 65536  # Linux's default MTU for lo


@pytest.fixture
def fresh_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    """As in a freshly started process: no previous network or CPU sample."""
    monkeypatch.setattr(meta, "_NET_SAMPLER", NetSampler())
    monkeypatch.setattr(meta, "_CPU_PERCENT", meta._CpuPercent())


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _can_unshare_net() -> bool:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return False
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


needs_netns = pytest.mark.skipif(not _can_unshare_net(), reason="needs unshare -n (root)")


def _path_meta_in_new_netns(setup: str, peers: list[str]) -> list[dict[str, object]]:
    """Run `setup` (ip commands) then path_meta toward each peer, inside a new netns."""
    script = (
        "import json, sys\n"
        "from reflector.meta import path_meta\n"
        "print(json.dumps([path_meta(p, {}) for p in sys.argv[1:]]))\n"
    )
    command = f'{setup} && exec "$0" -c \'{script}\' "$@"'
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", command, sys.executable, *peers],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    result: list[dict[str, object]] = json.loads(done.stdout)
    return result


# --- the interface and MTU toward the peer -----------------------------------------------------


def test_toward_ipv4_loopback_the_interface_is_lo_with_its_mtu() -> None:
    facts = path_meta("127.0.0.1", BUILD)
    assert facts["iface"] == {
        "name": "lo",
        "mtu": LOOPBACK_MTU,
        "route_mtu": LOOPBACK_MTU,
        "speed_mbps": None,
    }
    # lo has no link speed: an unavailable fact is null *and* explained.
    assert any(e.startswith("iface.speed: lo") for e in facts["errors"])  # type: ignore[attr-defined]


@pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback")
def test_toward_ipv6_loopback_the_interface_is_lo_with_its_mtu() -> None:
    iface = path_meta("::1", BUILD)["iface"]
    assert iface is not None
    assert iface["name"] == "lo"  # type: ignore[index]
    assert iface["mtu"] == LOOPBACK_MTU  # type: ignore[index]


def test_an_ipv4_mapped_peer_is_routed_as_ipv4() -> None:
    # A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; the IPv6 table would be wrong.
    iface = path_meta("::ffff:127.0.0.1", BUILD)["iface"]
    assert iface is not None
    assert iface["name"] == "lo"  # type: ignore[index]


def test_peer_addresses_are_normalised_before_routing() -> None:
    assert normalise_peer("::ffff:192.0.2.7") == "192.0.2.7"
    assert normalise_peer("[2001:db8::1]") == "2001:db8::1"
    assert normalise_peer(" 198.51.100.4 ") == "198.51.100.4"
    with pytest.raises(ValueError):
        normalise_peer("peer.example")


def test_a_peer_that_is_not_an_address_costs_the_interface_fact_only() -> None:
    facts = path_meta("not-an-address", BUILD)
    assert facts["iface"] is None
    assert facts["net"] == {
        "rx_bytes_per_sec": None,
        "tx_bytes_per_sec": None,
        "interval_sec": None,
    }
    errors = facts["errors"]
    assert isinstance(errors, list)
    assert any(e.startswith("iface: ") and "not-an-address" in e for e in errors)
    assert facts["load"] is not None
    assert facts["build"] == BUILD


@needs_netns
def test_a_documentation_address_with_no_route_gives_null_and_an_error() -> None:
    # A fresh namespace has no routes at all (lo is down): the kernel says "unreachable".
    v4, v6 = _path_meta_in_new_netns("true", ["192.0.2.1", "2001:db8::1"])
    for facts, peer in ((v4, "192.0.2.1"), (v6, "2001:db8::1")):
        assert facts["iface"] is None
        errors = facts["errors"]
        assert isinstance(errors, list)
        assert f"iface: no route to {peer}: Network is unreachable" in errors
        assert facts["cpu"] is not None
        assert facts["time_sync"] is not None


@needs_netns
def test_a_route_with_its_own_mtu_reports_it_beside_the_link_mtu() -> None:
    setup = (
        "ip link set lo up"
        " && ip route add 192.0.2.0/24 dev lo mtu 1280"
        " && ip -6 route add 2001:db8::/32 dev lo mtu 1300"
    )
    v4, v6 = _path_meta_in_new_netns(setup, ["192.0.2.7", "2001:db8::7"])
    assert v4["iface"] == {"name": "lo", "mtu": LOOPBACK_MTU, "route_mtu": 1280, "speed_mbps": None}
    assert v6["iface"] == {"name": "lo", "mtu": LOOPBACK_MTU, "route_mtu": 1300, "speed_mbps": None}


def test_the_route_lookup_works_from_inside_a_running_event_loop() -> None:
    # pyroute2's synchronous IPRoute refuses a thread whose asyncio loop is running.
    async def from_a_handler() -> dict[str, object]:
        return path_meta("127.0.0.1", BUILD)

    facts = asyncio.run(from_a_handler())
    assert facts["iface"] is not None


def test_link_speed_comes_from_sysfs_and_unknown_speeds_raise(tmp_path: Path) -> None:
    for name, content in (("eth9", "1000\n"), ("veth0", "-1\n"), ("bad0", "fast\n")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "speed").write_text(content)
    assert read_link_speed("eth9", tmp_path) == 1000
    with pytest.raises(ValueError, match="no link speed"):
        read_link_speed("veth0", tmp_path)
    with pytest.raises(ValueError):
        read_link_speed("bad0", tmp_path)
    with pytest.raises(OSError, match="does not report a link speed"):
        read_link_speed("missing0", tmp_path)
    with pytest.raises(ValueError, match="not an interface name"):
        read_link_speed("../eth9", tmp_path)


# --- byte rates between calls ------------------------------------------------------------------


def test_the_first_call_measures_over_a_fresh_quarter_second(fresh_sampler: None) -> None:
    facts = path_meta("127.0.0.1", BUILD)
    net = facts["net"]
    assert isinstance(net, dict)
    # A quarter second, not an hours-long average (a loaded machine may oversleep a little).
    assert meta.FRESH_SAMPLE_SEC - 0.01 <= net["interval_sec"] < meta.FRESH_SAMPLE_SEC + 2
    assert net["rx_bytes_per_sec"] is not None and net["tx_bytes_per_sec"] is not None
    cpu = facts["cpu"]
    assert isinstance(cpu, dict)
    assert cpu["percent"] is None  # psutil's first answer is a meaningless 0.0
    errors = facts["errors"]
    assert isinstance(errors, list)
    assert "cpu.percent: first call; measured from the next call on" in errors


def test_a_call_long_after_the_last_does_not_average_over_the_gap(fresh_sampler: None) -> None:
    long_ago = time.monotonic() - 3600
    path_meta("127.0.0.1", BUILD, sample=NetSample(at=long_ago, counters={"lo": (0, 0)}))
    net = path_meta("127.0.0.1", BUILD)["net"]
    assert isinstance(net, dict)
    interval = net["interval_sec"]
    assert isinstance(interval, float) and interval <= meta.MAX_RATE_INTERVAL_SEC


def test_explicit_samples_report_null_rates_on_the_first_call(fresh_sampler: None) -> None:
    facts = path_meta("127.0.0.1", BUILD, sample=NetSample(at=100.0, counters={"lo": (1, 2)}))
    assert facts["net"] == {
        "rx_bytes_per_sec": None,
        "tx_bytes_per_sec": None,
        "interval_sec": None,
    }
    errors = facts["errors"]
    assert isinstance(errors, list)
    assert "net: first call; measured from the next call on" in errors


def test_rates_cover_the_time_between_two_calls(fresh_sampler: None) -> None:
    path_meta("127.0.0.1", BUILD, sample=NetSample(at=100.0, counters={"lo": (1_000, 2_000)}))
    facts = path_meta(
        "127.0.0.1", BUILD, sample=NetSample(at=102.0, counters={"lo": (5_000, 2_600)})
    )
    assert facts["net"] == {
        "rx_bytes_per_sec": 2_000.0,
        "tx_bytes_per_sec": 300.0,
        "interval_sec": 2.0,
    }


def test_real_loopback_traffic_between_two_calls_shows_in_the_rates(fresh_sampler: None) -> None:
    payload = 1_000_000
    path_meta("127.0.0.1", BUILD)
    with (
        socket.create_server(("127.0.0.1", 0)) as server,
        socket.create_connection(server.getsockname()) as client,
    ):
        peer, _ = server.accept()
        with peer:
            client.sendall(b"x" * payload)
            received = 0
            while received < payload:
                received += len(peer.recv(65536))
    net = path_meta("127.0.0.1", BUILD)["net"]
    assert isinstance(net, dict)
    interval = net["interval_sec"]
    assert isinstance(interval, float)
    assert interval > 0
    # Every byte sent on lo is also received on lo.
    assert net["rx_bytes_per_sec"] * interval >= payload
    assert net["tx_bytes_per_sec"] * interval >= payload


def test_rates_are_unknown_rather_than_wrong() -> None:
    before = NetSample(at=10.0, counters={"eth0": (500, 500)})
    assert net_rates(None, before, "eth0").interval_sec is None
    # The counter went backwards: the interface was recreated, so no rate.
    reset = NetSample(at=11.0, counters={"eth0": (100, 900)})
    assert net_rates(before, reset, "eth0").rx_bytes_per_sec is None
    # No time passed, or the interface is missing from a sample.
    assert (
        net_rates(before, NetSample(at=10.0, counters={"eth0": (600, 600)}), "eth0").interval_sec
        is None
    )
    assert net_rates(before, NetSample(at=12.0, counters={}), "eth0").interval_sec is None


def test_the_sampler_hands_back_the_sample_it_replaces() -> None:
    sampler = NetSampler()
    first, second = NetSample(at=1.0), NetSample(at=2.0)
    assert sampler.advance(first) is None
    assert sampler.advance(second) is first


# --- CPU, load, memory, clock, build -----------------------------------------------------------


def test_cpu_load_and_memory_are_reported() -> None:
    path_meta("127.0.0.1", BUILD)  # CPU percent is measured from the previous call on
    facts = path_meta("127.0.0.1", BUILD)
    cpu, load, mem = facts["cpu"], facts["load"], facts["mem"]
    assert isinstance(cpu, dict)
    assert isinstance(load, dict)
    assert isinstance(mem, dict)
    assert cpu["count"] == os.cpu_count()
    assert 0.0 <= cpu["percent"] <= 100.0
    assert set(load) == {"1m", "5m", "15m"}
    assert all(value >= 0 for value in load.values())
    assert 0 < mem["available_bytes"] <= mem["total_bytes"]
    assert 0.0 <= mem["percent"] <= 100.0


def test_time_sync_has_a_verdict_its_source_and_the_kernel_error_bounds() -> None:
    sync = path_meta("127.0.0.1", BUILD)["time_sync"]
    assert isinstance(sync, dict)
    assert set(sync) == {
        "synchronized",
        "source",
        "maxerror_us",
        "esterror_us",
        "timesyncd_flag",
        "unix_time",
    }
    # adjtimex needs neither privilege nor systemd, so on Linux it always answers.
    assert sync["source"] == "adjtimex"
    assert sync["synchronized"] is clock_synchronized(read_kernel_clock())
    assert isinstance(sync["maxerror_us"], int)
    assert isinstance(sync["esterror_us"], int)
    assert sync["timesyncd_flag"] in (True, None)


def test_the_kernel_verdict_follows_sta_unsync_and_time_error() -> None:
    good = KernelClock(state=0, status=0x2001, maxerror_us=20_000, esterror_us=100)
    assert clock_synchronized(good)
    assert not clock_synchronized(
        KernelClock(state=0, status=STA_UNSYNC, maxerror_us=0, esterror_us=0)
    )
    assert not clock_synchronized(
        KernelClock(state=TIME_ERROR, status=0, maxerror_us=0, esterror_us=0)
    )


def test_the_timesyncd_flag_file_counts_only_when_present(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    assert time_sync_facts([], flag_file=flag)["timesyncd_flag"] is None
    flag.touch()
    assert time_sync_facts([], flag_file=flag)["timesyncd_flag"] is True


def test_the_answer_is_json_and_carries_the_build_as_given() -> None:
    build = dict(BUILD)
    facts = path_meta("127.0.0.1", build)
    assert json.loads(json.dumps(facts, allow_nan=False)) == facts
    assert facts["build"] == BUILD
    copied = facts["build"]
    assert isinstance(copied, dict)
    copied["version"] = "changed"
    assert build == BUILD  # the caller's mapping is copied, not shared


# --- health (spec §7.4) ------------------------------------------------------------------------


def test_health_is_status_version_and_one_minute_load_only() -> None:
    answer = health({"version": "1.2.3", "commit": "secret-ish"})
    assert set(answer) == {"status", "version", "load"}
    assert answer["status"] == "ok"
    assert answer["version"] == "1.2.3"
    assert answer["load"] == pytest.approx(os.getloadavg()[0], abs=1.0)


def test_health_falls_back_to_the_package_version() -> None:
    assert health({})["version"] == reflector.__version__
