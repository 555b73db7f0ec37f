"""Readable tables for the measurement results (the JSON form is the dict itself)."""

from __future__ import annotations

from typing import Any


def _mbps(bps: object) -> str:
    return f"{float(bps) / 1e6:10.1f} Mbit/s" if isinstance(bps, int | float) else "         -"


def _ms(value: object) -> str:
    return f"{float(value):8.3f} ms" if isinstance(value, int | float) else "       - "


def throughput_table(doc: dict[str, Any]) -> str:
    app = doc["appliance"]
    end = doc.get("endpoint") or {}
    lines = [
        f"throughput  endpoint {doc['endpoint_id']}  session {doc['session_id']}"
        f"  mode {doc['mode']}",
        f"  protocol {app.get('protocol')}  streams {app.get('streams')}"
        f"  {'download (endpoint sends)' if app.get('reverse') else 'upload (appliance sends)'}",
        f"  sent      {_mbps(app.get('sent_bps'))}   retransmits {app.get('retransmits')}",
        f"  received  {_mbps(app.get('received_bps'))}",
    ]
    if "error" in end:
        lines.append(f"  endpoint reported an error: {end['error']}")
    tunnel = end.get("tunnel_bytes")
    if tunnel:
        lines.append(
            f"  tunnel bytes counted by the endpoint: up {tunnel['upstream']}"
            f"  down {tunnel['downstream']}"
        )
    return "\n".join(lines)


def _rtt_rows(title: str, lat: dict[str, Any]) -> list[str]:
    rtt = lat.get("rtt") or {}
    proc = lat.get("reflector_processing") or {}
    return [
        f"  {title}: sent {lat.get('sent')}  received {lat.get('received')}"
        f"  loss {100 * float(lat.get('loss_ratio') or 0):.2f}%"
        f"  reordered {lat.get('reordered')}  duplicates {lat.get('duplicates')}",
        "    RTT   min "
        + _ms(rtt.get("min_ms"))
        + "  mean "
        + _ms(rtt.get("mean_ms"))
        + "  p50 "
        + _ms(rtt.get("p50_ms")),
        "          p90 "
        + _ms(rtt.get("p90_ms"))
        + "  p99  "
        + _ms(rtt.get("p99_ms"))
        + "  max "
        + _ms(rtt.get("max_ms")),
        f"    jitter {_ms(lat.get('jitter_ms'))}   reflector processing p50"
        f" {_ms(proc.get('p50_ms'))}",
    ]


def latency_table(doc: dict[str, Any]) -> str:
    head = f"latency  endpoint {doc['endpoint_id']}  session {doc['session_id']}"
    return "\n".join([head, *_rtt_rows("probes", doc["latency"])])


def bufferbloat_table(doc: dict[str, Any]) -> str:
    inc = doc["increase_ms"]
    lines = [
        f"bufferbloat  endpoint {doc['endpoint_id']}  session {doc['session_id']}",
        *_rtt_rows("idle", doc["idle"]),
        *_rtt_rows("loaded", doc["loaded"]),
        f"  latency increase under load: p50 {_ms(inc.get('p50_ms'))}"
        f"  p90 {_ms(inc.get('p90_ms'))}  p99 {_ms(inc.get('p99_ms'))}",
        f"  load: sent {_mbps(doc['throughput'].get('sent_bps'))}",
    ]
    return "\n".join(lines)
