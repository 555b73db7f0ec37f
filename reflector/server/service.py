"""The endpoint's application layer: who may do what on the control plane (spec §5.3, §6.3).

The listener hands every authenticated connection here. Authorization is decided per request
against the live allowlist (so `reflector peers remove` takes effect on open connections), and
every accept and deny is written to the audit trail.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from reflector import __version__
from reflector.access import pairing
from reflector.access.gate import source_key
from reflector.access.peers import PeerStore
from reflector.audit import AuditLog
from reflector.config import Config
from reflector.identity import Identity
from reflector.link import PROTOCOL_VERSION, ProtocolViolation, encode_frame
from reflector.link.messages import (
    ErrorResponse,
    GetPathMeta,
    Health,
    HealthStatus,
    Hello,
    Pair,
    PairOk,
    PathMeta,
    Request,
    Response,
    ServerHello,
)
from reflector.server.health_http import OneRequestProtocol, forbidden, response_for
from reflector.server.link_protocol import CloseAfter, LinkProtocol

_log = logging.getLogger(__name__)

# How often open connections are re-checked against the allowlist while any is open. Requests
# re-check on their own; this only catches a revoked peer that sits idle. No timer runs when no
# connection is open (idle footprint: zero wakeups).
REVOCATION_POLL_SEC = 2.0
# How often a shutdown looks whether the aborted links have all reported their close.
LINKS_GONE_POLL_SEC = 0.01
# Pairing tokens carry 192 bits, so guessing is hopeless; the limit stops log flooding and
# wasted work: at most this many failed attempts per source per window.
PAIRING_FAILURES_PER_WINDOW = 5
PAIRING_FAILURE_WINDOW_SEC = 60.0
# Pre-authentication denies (floods) are audited at most once per source per this interval;
# the record says how many were folded into it.
DENY_AUDIT_INTERVAL_SEC = 10.0
# Requests an unknown (not yet paired) peer may make before it is disconnected: hello + pair.
UNKNOWN_PEER_MAX_REQUESTS = 2

FEATURES = ("udp_echo", "throughput", "tunnel", "path_meta", "health", "pairing")


@dataclass
class _DenyBudget:
    last: float
    folded: int = 0


@dataclass
class _PairingFailures:
    window_start: float
    count: int = 0


@dataclass
class _LinkState:
    requests: int = 0
    was_authorized: bool = False


@dataclass
class ServiceDeps:
    """Optional collaborators, so tests can wire a service without the whole data plane."""

    path_meta: Callable[[str], dict[str, object]] | None = None
    health: Callable[[], dict[str, object]] | None = None
    wall_clock: Callable[[], float] = time.time
    mono_clock: Callable[[], float] = time.monotonic
    extra_handlers: dict[type[Request], Callable[..., object]] = field(default_factory=dict)


class Service:
    """Implements the listener's `ConnectionHandler` and the link's `LinkService`."""

    def __init__(
        self,
        config: Config,
        identity: Identity,
        audit: AuditLog,
        deps: ServiceDeps | None = None,
    ) -> None:
        self.config = config
        self.identity = identity
        self.audit = audit
        self.deps = deps or ServiceDeps()
        self.peers = PeerStore(config.state_dir, config.access.authorized_peers)
        self.links: dict[LinkProtocol, _LinkState] = {}
        self._deny_budget: dict[str, _DenyBudget] = {}
        self._pair_failures: dict[str, _PairingFailures] = {}
        self._watch: asyncio.Task[None] | None = None
        # Called with a one-line status whenever it changes (systemd STATUS=).
        self.on_status: Callable[[str], None] | None = None

    async def prepare(self) -> None:
        """What must be in place before the endpoint says it is ready (the data plane adds)."""

    # --- ConnectionHandler (listener)

    def link_protocol(self, peer_id: str, source: tuple[str, int]) -> LinkProtocol:
        """A connection of a known key gets the idle timeout; an unknown key, a short deadline.

        An unknown key finished TLS with a certificate anyone can make. It may say hello and
        pair (while a window is open) within `handshake_timeout_sec`, and nothing more: any
        protocol violation, a third request or the deadline closes it, so throwaway keys
        cannot hold connection slots that paired appliances need.
        """
        net = self.config.network
        known = self.peers.is_authorized(peer_id)
        return LinkProtocol(
            self,
            peer_id=peer_id,
            source=source,
            max_frame_size=net.max_frame_size,
            idle_timeout=float(net.idle_timeout_sec),
            deadline=None if known else float(net.handshake_timeout_sec),
        )

    def tunnel_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        self.connection_denied(source[0], "tunnel_unavailable", peer_id)
        return RefuseProtocol("tunnel_unavailable", "this endpoint has no tunneled data plane")

    def http_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        """`GET /health` over the mTLS port for an allowlisted key; 403 for any other key."""
        if not self.peers.is_authorized(peer_id):
            self.connection_denied(source[0], "unknown_peer", peer_id)
            return OneRequestProtocol(forbidden)
        self.audit.emit("connection_accept", peer_id=peer_id, source_addr=source[0], mode="http")
        health = self.deps.health or _default_health
        return OneRequestProtocol(lambda head: response_for(head, health))

    def connection_denied(self, source: str, reason: str, peer_id: str | None) -> None:
        """Audit a refused connection, folding floods from one source into one record."""
        self._emit_folded("connection_deny", source, reason, peer_id=peer_id)

    def _emit_folded(
        self,
        kind: str,
        source: str,
        reason: str,
        *,
        peer_id: str | None,
        message: str | None = None,
        params: dict[str, object] | None = None,
    ) -> None:
        """Audit a deny, at most once per source, kind and reason per DENY_AUDIT_INTERVAL_SEC.

        The record that ends a quiet interval says how many denies were folded into it, so a
        flood costs one record (and one fsync) per interval, yet none goes uncounted.
        """
        key = f"{kind}/{source_key(source) if source != '?' else source}/{reason}"
        now = self.deps.mono_clock()
        budget = self._deny_budget.get(key)
        if budget is not None and now - budget.last < DENY_AUDIT_INTERVAL_SEC:
            budget.folded += 1
            return
        folded = budget.folded if budget else 0
        if len(self._deny_budget) > 10000:
            self._deny_budget.clear()  # bounded memory under a distributed flood
        self._deny_budget[key] = _DenyBudget(last=now)
        params = {**(params or {}), **({"folded_since_last": folded} if folded else {})}
        self.audit.emit(
            kind,
            peer_id=peer_id,
            source_addr=source,
            reason=reason,
            message=message,
            params=params or None,
        )

    # --- LinkService (link protocol)

    def link_opened(self, link: LinkProtocol) -> None:
        self.links[link] = _LinkState()

    def link_closed(self, link: LinkProtocol) -> None:
        state = self.links.pop(link, None)
        if state is not None and state.was_authorized:
            self.on_peer_link_closed(link.peer_id)
        if not any(s.was_authorized for s in self.links.values()) and self._watch is not None:
            self._watch.cancel()
            self._watch = None

    def link_deadline_passed(self, link: LinkProtocol) -> None:
        self.connection_denied(link.source[0], "unknown_peer_timeout", link.peer_id)
        link.abort_with("unknown_peer", "this appliance did not pair in time")

    def protocol_violation(self, link: LinkProtocol, violation: ProtocolViolation) -> bool:
        """A request refused by the protocol core (malformed, out of order, over a limit).

        Audited (folded per source); an unknown key's connection is then closed, while a known
        appliance's stays open (a client bug should not cost it its session).
        """
        _log.info("protocol violation from %s: %s", link.peer_id, violation.code)
        self._emit_folded(
            "request_deny",
            link.source[0],
            violation.code,
            peer_id=link.peer_id,
            message=violation.message,
            params={"request_id": violation.request_id, "closed": violation.close},
        )
        return not (link.authorized or self.peers.is_authorized(link.peer_id))

    async def handle(self, link: LinkProtocol, request: Request) -> Response:
        state = self.links.setdefault(link, _LinkState())
        state.requests += 1
        if not link.authorized and state.requests > UNKNOWN_PEER_MAX_REQUESTS:
            self._deny(link, request, "unknown_peer", "an unpaired appliance may only pair")
        if isinstance(request, Hello):
            return self._hello(link, state, request)
        if isinstance(request, Pair):
            return self._pair(link, state, request)
        if not self.peers.is_authorized(link.peer_id):
            self._refuse_unauthorized(link, state, request)
        if isinstance(request, Health):
            return self._health(request)
        if isinstance(request, GetPathMeta):
            return await self._path_meta(link, request)
        return await self.handle_session_request(link, request)

    # --- hooks the data plane fills in (see reflector.server.run)

    async def handle_session_request(self, link: LinkProtocol, request: Request) -> Response:
        return ErrorResponse(
            request_id=request.request_id,
            code="unsupported",
            message=f"{request.TYPE} is not available on this endpoint",
        )

    def on_peer_link_closed(self, peer_id: str) -> None:
        """The data plane starts its session grace here."""

    def on_peer_revoked(self, peer_id: str) -> None:
        """The data plane ends the revoked peer's sessions here."""

    def on_peer_authorized(self, peer_id: str) -> None:
        """The data plane cancels a reconnecting peer's session grace here."""

    def status_line(self) -> str:
        return f"Endpoint {self.identity.endpoint_id}, 0 active sessions"

    def publish_status(self, *, running: bool = True) -> None:
        """Tell systemd (STATUS=) how things stand; the data plane adds status.json."""
        if self.on_status is not None:
            self.on_status(self.status_line())

    def policy_summary(self) -> dict[str, object]:
        q, net, ip = self.config.quotas, self.config.network, self.config.iperf3
        return {
            "mode": net.mode,
            "max_test_duration_sec": q.max_test_duration_sec,
            "max_concurrent_tests": q.max_concurrent_tests,
            "max_tests_per_hour_per_peer": q.max_tests_per_hour_per_peer,
            "max_bytes_per_day_per_peer": q.max_bytes_per_day_per_peer,
            "cooldown_sec": q.cooldown_sec,
            "allow_udp_echo": q.allow_udp_echo,
            "allow_throughput": q.allow_throughput,
            "heavy_tests_window": q.heavy_tests_window,
            "timezone": q.timezone,
            "max_streams": ip.max_streams,
            "max_udp_echo_pps": q.max_udp_echo_pps,
        }

    # --- requests

    def _hello(self, link: LinkProtocol, state: _LinkState, request: Hello) -> Response:
        if self.peers.is_authorized(link.peer_id):
            link.authorized = state.was_authorized = True
            self.audit.emit("connection_accept", peer_id=link.peer_id, source_addr=link.source[0])
            self._ensure_watch()
            self.on_peer_authorized(link.peer_id)
            return ServerHello(
                request_id=request.request_id,
                version=PROTOCOL_VERSION,
                features=FEATURES,
                endpoint_id=self.identity.endpoint_id,
                policy_summary=self.policy_summary(),
            )
        if self._pairing_window_open():
            # An unknown key may only present a pairing token: tell it nothing else.
            return ServerHello(
                request_id=request.request_id,
                version=PROTOCOL_VERSION,
                features=("pairing",),
                endpoint_id=self.identity.endpoint_id,
                policy_summary={},
            )
        self._deny(link, request, "unknown_peer", "this appliance is not authorized here")
        raise AssertionError("unreachable")

    def _pair(self, link: LinkProtocol, state: _LinkState, request: Pair) -> Response:
        if self.peers.is_authorized(link.peer_id):
            return PairOk(request_id=request.request_id, peer_id=link.peer_id)
        source = link.source[0]
        now = self.deps.mono_clock()
        if self._pairing_rate_limited(source, now):
            self._pair_deny(link, request, "rate_limited", "too many failed pairing attempts")
        try:
            pairing.consume(
                self.config.state_dir,
                request.token,
                self.deps.wall_clock(),
                enabled=self.config.access.pairing_enabled,
            )
        except pairing.PairingRefused as exc:
            self._count_pairing_failure(source, now)
            self._pair_deny(link, request, exc.reason, exc.message)
        self.peers.add(link.peer_id, via="pairing", note=f"from {source}")
        self.audit.emit("pairing_enroll", peer_id=link.peer_id, source_addr=source)
        self.audit.emit("peer_added", peer_id=link.peer_id, reason="pairing")
        link.authorized = state.was_authorized = True
        self._ensure_watch()
        self.on_peer_authorized(link.peer_id)
        return PairOk(request_id=request.request_id, peer_id=link.peer_id)

    def _health(self, request: Health) -> Response:
        doc = self.deps.health() if self.deps.health else _default_health()
        return HealthStatus(
            request_id=request.request_id,
            status=str(doc["status"]),
            version=str(doc["version"]),
            load=float(doc["load"]),  # type: ignore[arg-type]
        )

    async def _path_meta(self, link: LinkProtocol, request: GetPathMeta) -> Response:
        if self.deps.path_meta is None:
            return ErrorResponse(
                request_id=request.request_id, code="unsupported", message="no path meta"
            )
        # The route lookup may block for a moment (netlink); keep the loop free meanwhile.
        meta = await asyncio.to_thread(self.deps.path_meta, link.source[0])
        return PathMeta(request_id=request.request_id, meta=meta)

    # --- refusals

    def _refuse_unauthorized(self, link: LinkProtocol, state: _LinkState, req: Request) -> None:
        if state.was_authorized:
            self._deny(link, req, "unknown_peer", "this appliance is no longer authorized")
        self._deny(link, req, "unknown_peer", f"{req.TYPE} needs an authorized appliance")

    def _deny(self, link: LinkProtocol, req: Request, reason: str, message: str) -> None:
        self.audit.emit(
            "connection_deny", peer_id=link.peer_id, source_addr=link.source[0], reason=reason
        )
        raise CloseAfter(ErrorResponse(request_id=req.request_id, code=reason, message=message))

    def _pair_deny(self, link: LinkProtocol, request: Pair, reason: str, message: str) -> None:
        self.audit.emit(
            "pairing_deny", peer_id=link.peer_id, source_addr=link.source[0], reason=reason
        )
        raise CloseAfter(ErrorResponse(request_id=request.request_id, code=reason, message=message))

    def _pairing_window_open(self) -> bool:
        if not self.config.access.pairing_enabled:
            return False
        window = pairing.read_window(self.config.state_dir)
        return window is not None and self.deps.wall_clock() < window.expires_at

    def _pairing_rate_limited(self, source: str, now: float) -> bool:
        entry = self._pair_failures.get(source_key(source))
        if entry is None or now - entry.window_start > PAIRING_FAILURE_WINDOW_SEC:
            return False
        return entry.count >= PAIRING_FAILURES_PER_WINDOW

    def _count_pairing_failure(self, source: str, now: float) -> None:
        key = source_key(source)
        entry = self._pair_failures.get(key)
        if entry is None or now - entry.window_start > PAIRING_FAILURE_WINDOW_SEC:
            if len(self._pair_failures) > 10000:
                self._pair_failures.clear()
            entry = self._pair_failures[key] = _PairingFailures(window_start=now)
        entry.count += 1

    # --- revocation of live connections

    def _ensure_watch(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_revocations())

    async def _watch_revocations(self) -> None:
        while True:
            await asyncio.sleep(REVOCATION_POLL_SEC)
            self.enforce_revocations()

    def enforce_revocations(self) -> None:
        """Close every open connection of a peer that is no longer on the allowlist."""
        try:
            current = self.peers.current()
        except Exception:  # unreadable peers file: fail closed
            _log.exception("cannot read the allowlist; closing all connections")
            current = frozenset()
        revoked = set()
        for link, state in list(self.links.items()):
            if state.was_authorized and link.peer_id not in current:
                revoked.add(link.peer_id)
                self.audit.emit(
                    "connection_deny",
                    peer_id=link.peer_id,
                    source_addr=link.source[0],
                    reason="peer_revoked",
                )
                link.abort_with("unknown_peer", "this appliance is no longer authorized")
        for peer_id in revoked:
            self.on_peer_revoked(peer_id)

    async def links_gone(self, timeout_s: float) -> None:
        """Wait, bounded, until every link has reported its close.

        A TLS link hears of its connection's abort a loop turn or two after the raw transport
        does, and its close still ends that peer's sessions: it must come before close().
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while self.links and loop.time() < deadline:
            await asyncio.sleep(LINKS_GONE_POLL_SEC)

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        for link in list(self.links):
            link.abort_with("shutting_down", "the endpoint is shutting down")


class RefuseProtocol(asyncio.Protocol):
    """Tells a connected peer why it is refused (one error frame), then closes."""

    def __init__(self, code: str, message: str) -> None:
        self._frame = encode_frame(
            {"type": "error", "request_id": 0, "code": code, "message": message}
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        transport.write(self._frame)
        transport.close()


def _default_health() -> dict[str, object]:
    return {"status": "ok", "version": __version__, "load": os.getloadavg()[0]}
