"""Facts about this endpoint that let a peer tell "the path was bad" from "the endpoint was busy".

`GetPathMeta` (spec §7.5) answers with CPU, load, memory, the interface and MTU toward the peer,
that interface's current byte rates, the clock's synchronisation state and the build. A result
that blames the network while the reflector was CPU-bound, swapping, on a 1280-byte route MTU or
with an unsynchronised clock would be wrong; these facts let the appliance see that.

Every fact is collected on its own and may fail on its own: an unavailable fact is `null` with a
line in `errors`, never an exception, so one missing /sys file or an unroutable peer costs one
field, not the answer. Nothing here sleeps: CPU percent and byte rates are measured *between
calls* (see `NetSampler` and `_cpu_facts`), so the first call reports them as null.

`health(build)` is the small public subset served by `GET /health` (spec §7.4).
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import psutil

from reflector import __version__
from reflector.clocksync import (
    TIMESYNCD_FLAG,
    clock_synchronized,
    read_kernel_clock,
)

_T = TypeVar("_T")

# A netlink route lookup answers in about a millisecond; two seconds means the kernel or the
# netlink socket is stuck, and the caller (an RPC handler) must not wait longer than that.
ROUTE_LOOKUP_TIMEOUT_SEC = 2.0

# /sys/class/net/IF/speed holds one decimal integer (Mb/s); anything longer is not that.
SPEED_FILE_MAX_BYTES = 32

# Where the kernel publishes link facts; a parameter of the reader so tests can point elsewhere.
SYS_CLASS_NET = Path("/sys/class/net")


# --- network byte rates: a sampler that remembers the previous sample --------------------------


@dataclass(frozen=True, kw_only=True)
class NetSample:
    """Cumulative byte counters of every interface at one monotonic instant."""

    at: float
    """`time.monotonic()` when the counters were read."""
    counters: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    """Interface name → (bytes received, bytes sent) since the interface came up."""


@dataclass(frozen=True, kw_only=True)
class NetRates:
    """Bytes per second on one interface over the interval between two samples."""

    rx_bytes_per_sec: float | None
    tx_bytes_per_sec: float | None
    interval_sec: float | None


def take_net_sample() -> NetSample:
    """Read the kernel's per-interface counters now (cheap: one /proc/net/dev read)."""
    per_nic = psutil.net_io_counters(pernic=True)
    return NetSample(
        at=time.monotonic(),
        counters={name: (c.bytes_recv, c.bytes_sent) for name, c in per_nic.items()},
    )


def net_rates(previous: NetSample | None, current: NetSample, iface: str) -> NetRates:
    """Byte rates on `iface` between two samples; null where they cannot be known.

    Null when there is no previous sample, no time has passed, the interface is missing from
    either sample, or a counter went backwards (the interface was recreated or the counter
    wrapped): a made-up number would be worse than none.
    """
    none = NetRates(rx_bytes_per_sec=None, tx_bytes_per_sec=None, interval_sec=None)
    if previous is None:
        return none
    interval = current.at - previous.at
    before, after = previous.counters.get(iface), current.counters.get(iface)
    if interval <= 0 or before is None or after is None:
        return none
    rx, tx = after[0] - before[0], after[1] - before[1]
    if rx < 0 or tx < 0:
        return none
    return NetRates(
        rx_bytes_per_sec=rx / interval, tx_bytes_per_sec=tx / interval, interval_sec=interval
    )


class NetSampler:
    """Keeps the previous `NetSample` so each call measures the rate since the last call.

    The appliance calls `GetPathMeta` before and after a test, and the second answer covers
    exactly the test. A first call, or one long after the last (MAX_RATE_INTERVAL_SEC),
    measures over a fresh FRESH_SAMPLE_SEC instead, so the rate is always a recent one.
    Thread-safe, because RPC handlers may call `path_meta` from worker threads.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._previous: NetSample | None = None

    def advance(self, sample: NetSample) -> NetSample | None:
        """Store `sample` as the latest and return the one it replaces (None the first time)."""
        with self._lock:
            previous, self._previous = self._previous, sample
        return previous


_NET_SAMPLER = NetSampler()


# --- route and interface toward the peer -------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class RouteFacts:
    """What the kernel would use to send to the peer."""

    iface: str
    link_mtu: int | None
    route_mtu: int | None
    """RTAX_MTU of the route (a configured or PMTU-learned MTU), None if the route has none."""


def normalise_peer(peer_addr: str) -> str:
    """The address to route toward: IPv4-mapped IPv6 becomes IPv4, brackets and zone dropped.

    A dual-stack listener reports IPv4 peers as ::ffff:a.b.c.d; looking that up in the IPv6
    table would name the wrong interface. Raises ValueError for anything that is not an IP.
    """
    text = peer_addr.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


def _route_via_netlink(dst: str) -> RouteFacts:
    """Ask the kernel (`ip route get`) which interface and MTU it would use toward `dst`."""
    # Deferred: importing pyroute2 costs ~100 ms, paid only by processes that answer GetPathMeta.
    from pyroute2 import IPRoute
    from pyroute2.netlink.exceptions import NetlinkError

    with IPRoute() as ipr:
        try:
            routes = list(ipr.route("get", dst=dst))
        except NetlinkError as exc:
            raise LookupError(f"no route to {dst}: {os.strerror(exc.code)}") from None
        if not routes:
            raise LookupError(f"the kernel returned no route to {dst}")
        route = routes[0]
        oif = route.get("RTA_OIF")
        if oif is None:
            raise LookupError(f"the route to {dst} has no outgoing interface")
        links = list(ipr.link("get", index=oif))
    if not links:
        raise LookupError(f"interface index {oif} vanished during the lookup")
    metrics = route.get("RTA_METRICS")
    route_mtu = metrics.get("RTAX_MTU") if metrics is not None else None
    return RouteFacts(
        iface=str(links[0].get("IFLA_IFNAME")),
        link_mtu=_opt_int(links[0].get("IFLA_MTU")),
        route_mtu=_opt_int(route_mtu),
    )


def lookup_route(dst: str, timeout: float = ROUTE_LOOKUP_TIMEOUT_SEC) -> RouteFacts:
    """`_route_via_netlink` in a short-lived thread, bounded by `timeout`.

    The thread is needed, not only the bound: pyroute2's synchronous IPRoute drives its own
    asyncio loop and refuses to run in a thread whose loop is already running (our server).
    """
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["result"] = _route_via_netlink(dst)
        except Exception as exc:  # handed to the caller's thread below
            box["error"] = exc

    worker = threading.Thread(target=run, name="meta-route-lookup", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise TimeoutError(f"route lookup toward {dst} took over {timeout:g} s")
    if "error" in box:
        raise box["error"]
    result: RouteFacts = box["result"]
    return result


def read_link_speed(iface: str, sys_class_net: Path = SYS_CLASS_NET) -> int:
    """Link speed in Mb/s from sysfs; raises OSError/ValueError when the kernel does not know.

    Virtual and loopback interfaces refuse the read (EINVAL) or report -1; both mean unknown.
    """
    if not iface or "/" in iface or iface in {".", ".."}:
        raise ValueError(f"not an interface name: {iface!r}")
    try:
        with open(sys_class_net / iface / "speed", "rb") as f:
            text = f.read(SPEED_FILE_MAX_BYTES)
    except OSError as exc:
        raise OSError(f"{iface} does not report a link speed ({exc.strerror})") from None
    speed = int(text.strip())
    if speed <= 0:
        raise ValueError(f"{iface} reports no link speed ({speed})")
    return speed


# --- clock synchronisation ---------------------------------------------------------------------


def time_sync_facts(errors: list[str], flag_file: Path = TIMESYNCD_FLAG) -> dict[str, object]:
    facts: dict[str, object] = {
        "synchronized": None,
        "source": None,
        "maxerror_us": None,
        "esterror_us": None,
        # True when timesyncd's flag file exists; null otherwise, because its absence proves
        # nothing when chrony or ntpd keeps the time instead.
        "timesyncd_flag": True if flag_file.exists() else None,
        "unix_time": time.time(),
    }
    clock = _collect("time_sync.adjtimex", read_kernel_clock, errors)
    if clock is not None:
        facts.update(
            synchronized=clock_synchronized(clock),
            source="adjtimex",
            maxerror_us=clock.maxerror_us,
            esterror_us=clock.esterror_us,
        )
    elif facts["timesyncd_flag"]:
        facts.update(synchronized=True, source="timesyncd")
    return facts


# --- CPU, load, memory -------------------------------------------------------------------------


class _CpuPercent:
    """psutil.cpu_percent(interval=None): CPU use since the previous call, without sleeping.

    psutil answers a meaningless 0.0 to the very first call in a process, so that call is
    reported as unknown. Like the byte rates, the value spans the time since the last call.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._primed = False

    def read(self) -> float:
        """Percent since the previous call; raises LookupError on the first call."""
        with self._lock:
            percent = float(psutil.cpu_percent(interval=None))
            primed, self._primed = self._primed, True
        if not primed:
            raise LookupError("first call; measured from the next call on")
        return percent


_CPU_PERCENT = _CpuPercent()


def _cpu_facts(errors: list[str]) -> dict[str, object]:
    return {
        "count": _collect("cpu.count", psutil.cpu_count, errors),
        "percent": _collect("cpu.percent", _CPU_PERCENT.read, errors),
    }


def _load_facts() -> dict[str, float]:
    one, five, fifteen = os.getloadavg()
    return {"1m": one, "5m": five, "15m": fifteen}


def _mem_facts() -> dict[str, object]:
    mem = psutil.virtual_memory()
    return {
        "total_bytes": int(mem.total),
        "available_bytes": int(mem.available),
        "percent": float(mem.percent),
    }


# --- assembly ----------------------------------------------------------------------------------


def _collect(name: str, read: Callable[[], _T], errors: list[str]) -> _T | None:
    """Run one fact reader; on any failure record `name: reason` and return None."""
    try:
        return read()
    except Exception as exc:  # one failing fact must not cost the others
        errors.append(f"{name}: {exc or type(exc).__name__}")
        return None


def _opt_int(value: object) -> int | None:
    return int(value) if isinstance(value, int) else None


def _iface_facts(peer_addr: str, errors: list[str]) -> dict[str, object] | None:
    dst = _collect("iface", lambda: normalise_peer(peer_addr), errors)
    if dst is None:
        return None
    route = _collect("iface", lambda: lookup_route(dst), errors)
    if route is None:
        return None
    return {
        "name": route.iface,
        "mtu": route.link_mtu,
        # The MTU a packet to the peer is held to: the route's own (configured, or learned by
        # path-MTU discovery and cached) when it has one, else the interface's.
        "route_mtu": route.route_mtu if route.route_mtu is not None else route.link_mtu,
        "speed_mbps": _collect("iface.speed", lambda: read_link_speed(route.iface), errors),
    }


# A rate over a longer interval than this is old news (an hour-long average says nothing about
# the link now): the call measures afresh over FRESH_SAMPLE_SEC instead.
MAX_RATE_INTERVAL_SEC = 10.0
FRESH_SAMPLE_SEC = 0.25


def _fresh_pair(errors: list[str]) -> NetSample | None:
    """A sample FRESH_SAMPLE_SEC after the sampler's latest (runs in a worker thread)."""
    time.sleep(FRESH_SAMPLE_SEC)
    return _collect("net", take_net_sample, errors)


def _net_facts(iface: str | None, sample: NetSample | None, errors: list[str]) -> dict[str, object]:
    current = sample if sample is not None else _collect("net", take_net_sample, errors)
    rates = NetRates(rx_bytes_per_sec=None, tx_bytes_per_sec=None, interval_sec=None)
    if current is not None:
        # Advance even without an interface, so the next caller's interval stays short.
        previous = _NET_SAMPLER.advance(current)
        stale = previous is None or current.at - previous.at > MAX_RATE_INTERVAL_SEC
        if sample is None and stale and iface is not None:
            later = _fresh_pair(errors)
            if later is not None:
                previous, current = _NET_SAMPLER.advance(later), later
        if iface is None:
            errors.append("net: no interface toward the peer")
        elif previous is None:
            errors.append("net: first call; measured from the next call on")
        else:
            rates = net_rates(previous, current, iface)
            if rates.interval_sec is None:
                errors.append(f"net: no comparable counters for {iface} since the last call")
    return {
        "rx_bytes_per_sec": rates.rx_bytes_per_sec,
        "tx_bytes_per_sec": rates.tx_bytes_per_sec,
        "interval_sec": rates.interval_sec,
    }


def path_meta(
    peer_addr: str, build: Mapping[str, str], sample: NetSample | None = None
) -> dict[str, object]:
    """The `GetPathMeta` answer for a peer at `peer_addr` (spec §7.5), JSON-serialisable.

    `sample` is the current network counter sample; by default it is read now. CPU percent and
    byte rates cover the time since the previous call (process-wide), not a fresh interval:
    the call never sleeps. Blocks for at most about `ROUTE_LOOKUP_TIMEOUT_SEC`; async callers
    may prefer `asyncio.to_thread(path_meta, ...)`.
    """
    errors: list[str] = []
    iface = _iface_facts(peer_addr, errors)
    iface_name = iface["name"] if iface is not None else None
    return {
        "cpu": _cpu_facts(errors),
        "load": _collect("load", _load_facts, errors),
        "mem": _collect("mem", _mem_facts, errors),
        "iface": iface,
        "net": _net_facts(iface_name if isinstance(iface_name, str) else None, sample, errors),
        "time_sync": time_sync_facts(errors),
        "build": dict(build),
        "errors": errors,
    }


def health(build: Mapping[str, str]) -> dict[str, object]:
    """The `GET /health` body (spec §7.4): liveness, version and 1-minute load, nothing else."""
    load = _collect("load", lambda: os.getloadavg()[0], [])
    return {"status": "ok", "version": build.get("version", __version__), "load": load}
