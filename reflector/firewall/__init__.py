"""Reflector's own nftables table and the per-session holes of direct-ephemeral mode (§3.2, §9).

`ruleset` is the pure part (the table and elements as libnftables JSON, validation, reading
counters back); `nft` applies it. Callers use `Firewall` (`NftFirewall` on a real host): open a
hole after a direct-mode grant, close it at session end and account its bytes, and refuse the
session on `FirewallError` (fail closed).
"""

from reflector.firewall.nft import Firewall, FirewallError, NftFirewall
from reflector.firewall.ruleset import (
    HOLE_GRACE_S,
    MAX_HOLE_TTL_S,
    MIN_HOLE_TTL_S,
    REFLECTOR_HOLE_MARK,
    TABLE_NAME,
    HoleCounters,
    hole_ttl_s,
)

__all__ = [
    "HOLE_GRACE_S",
    "MAX_HOLE_TTL_S",
    "MIN_HOLE_TTL_S",
    "REFLECTOR_HOLE_MARK",
    "TABLE_NAME",
    "Firewall",
    "FirewallError",
    "HoleCounters",
    "NftFirewall",
    "hole_ttl_s",
]
