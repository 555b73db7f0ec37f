"""Admission before authentication: connection caps and a handshake rate per source (pure).

A stranger on the Internet can open TCP connections for free; TLS handshakes cost us ~1.6 ms
of CPU each. So before any TLS work the listener asks this gate: is there room overall, is
this source under its connection cap, and under its handshake rate? Time is passed in.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

# Sources are grouped by /64 for IPv6: one host usually owns a whole /64, and per-address caps
# would be trivially sidestepped inside it.
IPV6_SOURCE_PREFIX = 64
# Forget a source's handshake bucket after this long without handshakes (bounds memory).
BUCKET_IDLE_SEC = 60.0
# Upper bound on tracked sources; beyond it the oldest idle buckets are dropped first.
MAX_TRACKED_SOURCES = 65536


def source_key(addr: str) -> str:
    """The rate-limit key for a peer address: the address, or its /64 for IPv6."""
    ip = ipaddress.ip_address(addr.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.ip_network(f"{ip}/{IPV6_SOURCE_PREFIX}", strict=False))
    return str(ip)


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class AdmissionGate:
    """Counts live connections and meters new handshakes per source."""

    max_connections: int
    max_per_source: int
    handshakes_per_sec: int
    _open: dict[str, int] = field(default_factory=dict)
    _total: int = 0
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, addr: str, now: float) -> str | None:
        """Reserve a slot for a new connection from `addr`; None if admitted, else a reason."""
        key = source_key(addr)
        if self._total >= self.max_connections:
            return "too_many_connections"
        if self._open.get(key, 0) >= self.max_per_source:
            return "too_many_connections_from_source"
        if not self._take_token(key, now):
            return "rate_limited"
        self._open[key] = self._open.get(key, 0) + 1
        self._total += 1
        return None

    def release(self, addr: str) -> None:
        """Give back the slot reserved by a successful `admit`."""
        key = source_key(addr)
        count = self._open.get(key, 0)
        if count <= 1:
            self._open.pop(key, None)
        else:
            self._open[key] = count - 1
        self._total = max(0, self._total - 1)

    @property
    def open_connections(self) -> int:
        return self._total

    def _take_token(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        rate = float(self.handshakes_per_sec)
        if bucket is None:
            self._evict_idle(now)
            bucket = self._buckets[key] = _Bucket(tokens=rate, updated=now)
        elapsed = max(0.0, now - bucket.updated)
        bucket.tokens = min(rate, bucket.tokens + elapsed * rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True

    def _evict_idle(self, now: float) -> None:
        if len(self._buckets) < MAX_TRACKED_SOURCES:
            return
        stale = [k for k, b in self._buckets.items() if now - b.updated > BUCKET_IDLE_SEC]
        for key in stale or sorted(self._buckets, key=lambda k: self._buckets[k].updated)[:1024]:
            del self._buckets[key]
