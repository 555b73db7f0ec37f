"""Tunneled data plane (spec §3.2, "Tunneled" mode): iperf3 over the mTLS control port.

Only the control port is reachable, so each iperf3 TCP connection of the appliance travels as
its own mTLS connection with ALPN `pp-tunnel/1`. The layers: `wire` (the one-frame opening
exchange, pure), `relay` (a flow-controlled byte relay between two asyncio transports, with the
per-session counters that accounting reads), `server_end` (the endpoint: authorize, connect to
the local iperf3 server, relay) and `client_end` (the appliance: a loopback port whose every
connection becomes a tunnel).
"""

from reflector.tunnel.client_end import TunnelClient, TunnelFailure
from reflector.tunnel.relay import Relay, RelayClosed, TunnelCounters
from reflector.tunnel.server_end import (
    Authorizer,
    TunnelGrant,
    TunnelRefusal,
    TunnelRefused,
    TunnelServerProtocol,
    connections_for_streams,
)
from reflector.tunnel.wire import TunnelOpen

__all__ = [
    "Authorizer",
    "Relay",
    "RelayClosed",
    "TunnelClient",
    "TunnelCounters",
    "TunnelFailure",
    "TunnelGrant",
    "TunnelOpen",
    "TunnelRefusal",
    "TunnelRefused",
    "TunnelServerProtocol",
    "connections_for_streams",
]
