"""The appliance's measurements: throughput, latency and bufferbloat against one endpoint.

Each runs inside one granted session: ask, use what the grant says (tunnel or data port, echo
key), close the session, and fetch the endpoint's own view of the result. The endpoint counts
bytes and enforces time; the appliance only reports. Results are plain JSON-able dicts, the
normalized form PacketParamedic consumes (`--json`).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from reflector.client.link_client import ApplianceIdentity, LinkClient
from reflector.engines.iperf import run_client
from reflector.engines.latency import LatencyProgress, measure_latency
from reflector.errors import ReflectorError
from reflector.link.messages import (
    GetResult,
    Ok,
    Result,
    SessionClose,
    SessionGrant,
    SessionRequest,
    ThroughputParams,
    UdpEchoParams,
)
from reflector.tls import ALPN_TUNNEL
from reflector.tunnel.client_end import TunnelClient

Progress = Callable[[str], None]

# STAMP probe defaults: 20 ms spacing (50 probes/s) stays far below any rate clamp and gives
# enough samples for p99 in a 10 s test; 112 bytes is the authenticated STAMP packet size.
DEFAULT_INTERVAL_MS = 20
DEFAULT_PACKET_SIZE = 112
# Bufferbloat: idle baseline first, then the same probes while iperf3 loads the link.
BUFFERBLOAT_IDLE_SEC = 5
# The iperf3 client needs a moment after the grant before its data flows.
LOAD_SETTLE_SEC = 1.0


@dataclass(frozen=True, kw_only=True)
class ThroughputOptions:
    duration_sec: int = 10
    streams: int = 1
    reverse: bool = False
    udp: bool = False
    bitrate_bps: int | None = None
    iperf3_path: str = "/usr/bin/iperf3"


async def throughput(
    client: LinkClient,
    appliance: ApplianceIdentity,
    opts: ThroughputOptions,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """One iperf3 test through the grant's tunnel (or data port in direct mode)."""
    grant = await _request_throughput(client, opts.duration_sec, opts)
    try:
        client_json = await _run_iperf(client, appliance, grant, opts, opts.duration_sec, progress)
    finally:
        await _close(client, grant)
    server = await _result(client, grant)
    return {
        "test": "throughput",
        "endpoint_id": client.endpoint_id,
        "session_id": grant.session_id,
        "mode": grant.mode,
        "appliance": summarize_iperf_client(client_json),
        "endpoint": server,
    }


async def latency(
    client: LinkClient,
    *,
    duration_sec: int = 10,
    interval_ms: int = DEFAULT_INTERVAL_MS,
    packet_size: int = DEFAULT_PACKET_SIZE,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """A STAMP echo test: RTT distribution, jitter, loss, reordering, reflector time."""
    params = UdpEchoParams(
        duration_sec=duration_sec, interval_ms=interval_ms, packet_size=packet_size
    )
    grant = await client.call(SessionRequest(test_type="udp_echo", params=params), SessionGrant)
    try:
        probe = await _probe(client, grant, duration_sec, interval_ms, packet_size, progress)
    finally:
        await _close(client, grant)
    server = await _result(client, grant)
    return {
        "test": "latency",
        "endpoint_id": client.endpoint_id,
        "session_id": grant.session_id,
        "mode": grant.mode,
        "latency": probe,
        "endpoint": server,
    }


# Seconds of the bufferbloat grant beyond the idle and load phases (iperf3 start and finish).
BUFFERBLOAT_SLACK_SEC = 2


def _fit_load_to_policy(
    client: LinkClient, opts: ThroughputOptions, overhead: int
) -> ThroughputOptions:
    """`opts` with the load shortened so that overhead + load fits the endpoint's maximum."""
    hello = client.server_hello
    limit = hello.policy_summary.get("max_test_duration_sec") if hello is not None else None
    if not isinstance(limit, int) or overhead + opts.duration_sec <= limit:
        return opts
    load = limit - overhead
    if load < 1:
        raise ReflectorError(
            f"the endpoint allows tests of at most {limit} s, too short for {overhead} s of"
            " idle measurement plus a load phase"
        )
    return dataclasses.replace(opts, duration_sec=load)


async def bufferbloat(
    client: LinkClient,
    appliance: ApplianceIdentity,
    opts: ThroughputOptions,
    *,
    idle_sec: int = BUFFERBLOAT_IDLE_SEC,
    interval_ms: int = DEFAULT_INTERVAL_MS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Latency idle, then latency while iperf3 loads the path, in one throughput grant.

    The grant must cover the idle phase, the load and a little slack; when that would exceed
    the endpoint's maximum test duration (from its hello), the load phase is shortened to fit
    rather than the request being refused as `duration_exceeded`.
    """
    opts = _fit_load_to_policy(client, opts, idle_sec + BUFFERBLOAT_SLACK_SEC)
    grant = await _request_throughput(
        client, idle_sec + opts.duration_sec + BUFFERBLOAT_SLACK_SEC, opts
    )
    try:
        _say(progress, f"idle latency for {idle_sec} s")
        idle = await _probe(client, grant, idle_sec, interval_ms, DEFAULT_PACKET_SIZE, progress)
        _say(progress, f"latency under load for {opts.duration_sec} s")
        load_task = asyncio.create_task(
            _run_iperf(client, appliance, grant, opts, opts.duration_sec, None)
        )
        await asyncio.sleep(LOAD_SETTLE_SEC)
        loaded_sec = max(1, opts.duration_sec - int(LOAD_SETTLE_SEC) - 1)
        loaded = await _probe(client, grant, loaded_sec, interval_ms, DEFAULT_PACKET_SIZE, progress)
        client_json = await load_task
    finally:
        await _close(client, grant)
    server = await _result(client, grant)
    return {
        "test": "bufferbloat",
        "endpoint_id": client.endpoint_id,
        "session_id": grant.session_id,
        "mode": grant.mode,
        "idle": idle,
        "loaded": loaded,
        "increase_ms": _increase(idle, loaded),
        "throughput": summarize_iperf_client(client_json),
        "endpoint": server,
    }


# --- pieces


async def _request_throughput(
    client: LinkClient, session_sec: int, opts: ThroughputOptions
) -> SessionGrant:
    params = ThroughputParams(
        duration_sec=session_sec,
        protocol="udp" if opts.udp else "tcp",
        streams=opts.streams,
        reverse=opts.reverse,
        bitrate_bps=opts.bitrate_bps,
    )
    return await client.call(SessionRequest(test_type="throughput", params=params), SessionGrant)


async def _run_iperf(
    client: LinkClient,
    appliance: ApplianceIdentity,
    grant: SessionGrant,
    opts: ThroughputOptions,
    duration_sec: int,
    progress: Progress | None,
) -> dict[str, Any]:
    tunnel: TunnelClient | None = None
    if grant.mode == "tunneled":
        tunnel = TunnelClient(
            client.endpoint,
            appliance.context(ALPN_TUNNEL),
            client.endpoint_id,
            grant.session_id,
            grant.token,
        )
        host, port = await tunnel.start()
    else:
        host, port = client.endpoint[0], grant.ports["data"]
    try:
        return await run_client(
            host,
            port,
            duration_s=duration_sec,
            streams=opts.streams,
            reverse=opts.reverse,
            udp=opts.udp,
            bitrate_bps=opts.bitrate_bps,
            iperf3_path=opts.iperf3_path,
            progress=progress,
        )
    except ReflectorError as exc:
        if tunnel is not None and tunnel.failures:
            first = tunnel.failures[0]
            raise ReflectorError(f"{exc} (tunnel: {first.code}: {first.message})") from None
        raise
    finally:
        if tunnel is not None:
            await tunnel.close()


async def _probe(
    client: LinkClient,
    grant: SessionGrant,
    duration_sec: int,
    interval_ms: int,
    packet_size: int,
    progress: Progress | None,
) -> dict[str, Any]:
    key = base64.urlsafe_b64decode(str(grant.extra["hmac_key"]))
    target = (client.endpoint[0], grant.ports["udp"])

    def tick(p: LatencyProgress) -> None:
        _say(progress, f"{p.elapsed_s:5.1f} s  sent {p.sent}  answered {p.received}")

    result = await asyncio.to_thread(
        measure_latency,
        target,
        key,
        secrets.randbelow(0xFFFF) + 1,
        float(duration_sec),
        interval_ms / 1000.0,
        packet_size,
        tick if progress else None,
    )
    return result.to_dict()


async def _close(client: LinkClient, grant: SessionGrant) -> None:
    with contextlib.suppress(ReflectorError):
        await client.call(SessionClose(session_id=grant.session_id), Ok)


async def _result(client: LinkClient, grant: SessionGrant) -> dict[str, Any]:
    return (await client.call(GetResult(session_id=grant.session_id), Result)).result


def summarize_iperf_client(doc: dict[str, Any]) -> dict[str, Any]:
    """The appliance's own view from iperf3's client JSON: rates each way, retransmits."""
    end = doc.get("end") or {}
    sent = end.get("sum_sent") or end.get("sum") or {}
    received = end.get("sum_received") or end.get("sum") or {}
    start = doc.get("start") or {}
    test = start.get("test_start") or {}
    return {
        "protocol": test.get("protocol"),
        "streams": test.get("num_streams"),
        "reverse": bool(test.get("reverse")),
        "duration_sec": test.get("duration"),
        "sent_bps": sent.get("bits_per_second"),
        "received_bps": received.get("bits_per_second"),
        "retransmits": sent.get("retransmits"),
        "jitter_ms": received.get("jitter_ms"),
        "lost_percent": received.get("lost_percent"),
    }


def _increase(idle: dict[str, Any], loaded: dict[str, Any]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        a = (idle.get("rtt") or {}).get(key)
        b = (loaded.get("rtt") or {}).get(key)
        if isinstance(a, int | float) and isinstance(b, int | float):
            out[key] = round(b - a, 3)
        else:
            out[key] = None
    return out


def _say(progress: Progress | None, text: str) -> None:
    if progress is not None:
        progress(text)
