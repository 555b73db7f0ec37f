"""`reflector serve`: assemble identity, audit, service and listener; run until a signal.

Start-up order is the fail-closed order: identity (refuse a bad key), certificate, TLS context
(refuse an unsafe ssl layout), audit (refuse a damaged log), bind, the service, and in direct
mode Reflector's nftables table (through the helper). Only when all of that worked is READY=1
sent to systemd; on SIGTERM/SIGINT everything is closed and the
stop audited.

The ports are bound before the service exists because creating the service settles the usage
ledger (it ends, as interrupted, every test a predecessor left open). An address already in use
is the usual sign that the endpoint is running already, with the same state dir: a second
`reflector serve` must fail there, naming the address, before it touches that endpoint's ledger.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from reflector import meta
from reflector.audit import AuditLog, open_audit_log
from reflector.buildinfo import build_info
from reflector.certificate import ensure_certificate_file
from reflector.config import Config
from reflector.errors import ReflectorError
from reflector.fsutil import ensure_private_dir
from reflector.identity import Identity, load_or_create_identity
from reflector.server.dataplane import EndpointService
from reflector.server.health_http import OneRequestProtocol, start_health_server, unavailable
from reflector.server.listener import Listener
from reflector.server.service import RefuseProtocol, Service, ServiceDeps
from reflector.tls import server_context

_log = logging.getLogger(__name__)

# At shutdown, how long the aborted links may take to report their close (a few loop turns).
LINKS_CLOSE_WAIT_S: Final = 1.0


@dataclass
class Running:
    """A started endpoint: what tests and the CLI need to talk to it and stop it."""

    config: Config
    identity: Identity
    audit: AuditLog
    service: Service
    listener: Listener
    addresses: list[tuple[str, int]]
    health_server: asyncio.Server | None = None

    async def stop(self, reason: str = "stop requested") -> None:
        if self.health_server is not None:
            self.health_server.close()
        await self.listener.close()
        await self.service.links_gone(LINKS_CLOSE_WAIT_S)
        await self.service.close()
        self.audit.emit("service_stop", reason=reason)
        self.audit.close()


def prepare_identity(config: Config) -> tuple[Identity, bool]:
    """Load (or, on first run, create) the identity; make sure its certificate exists."""
    ensure_private_dir(config.state_dir)
    identity, created = load_or_create_identity(config.key_path)
    ensure_certificate_file(identity, datetime.now(UTC))
    return identity, created


async def start(
    config: Config,
    *,
    addresses: list[str] | None = None,
    deps: ServiceDeps | None = None,
    service_factory: Callable[[Config, Identity, AuditLog, ServiceDeps | None], Service]
    | None = None,
) -> Running:
    """Start an endpoint on the running loop (used by `serve` and by tests).

    Raises ReflectorError "cannot listen on ADDRESS: reason" if a port cannot be bound, with
    everything opened so far closed again (see the module docstring for the order).
    """
    identity, created = prepare_identity(config)
    cert_path = config.key_path.parent / "identity.crt"
    context = server_context(cert_path, config.key_path)
    audit = open_audit_log(
        config.state_dir, identity.endpoint_id, config.audit.journald, config.audit.jsonl
    )
    if created:
        audit.emit("identity_created")
    handler = _ServiceHandler()
    listener = Listener(config.network, context, handler)
    health_server: asyncio.Server | None = None
    service: Service | None = None
    try:
        bound = await _bind(listener, addresses or config.network.listen_address)
        health_server = await _start_health(config.network.health_http_address)
        factory = service_factory or EndpointService
        service = factory(config, identity, audit, deps or default_deps())
        await service.prepare()  # direct mode: Reflector's nftables table, before READY
    except BaseException as exc:
        await _close_listeners(listener, health_server)
        if service is not None:
            await service.close()
        audit.emit("service_stop", reason=str(exc) or type(exc).__name__)
        audit.close()
        raise
    handler.service = service
    running = Running(config, identity, audit, service, listener, bound, health_server)
    service.publish_status()
    audit.emit("service_start", mode=config.network.mode, params={"listen": _fmt(bound)})
    return running


class _ServiceHandler:
    """The listener's handler: the service, once it exists.

    The listener is bound before the service is created (module docstring); a connection that
    completes its handshake in between is told to come back rather than served by nothing.
    """

    def __init__(self) -> None:
        self.service: Service | None = None

    def link_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        if self.service is None:
            return RefuseProtocol("not_ready", "the endpoint is starting; try again")
        return self.service.link_protocol(peer_id, source)

    def tunnel_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        if self.service is None:
            return RefuseProtocol("not_ready", "the endpoint is starting; try again")
        return self.service.tunnel_protocol(peer_id, source)

    def http_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        if self.service is None:
            return OneRequestProtocol(unavailable)
        return self.service.http_protocol(peer_id, source)

    def connection_denied(self, source: str, reason: str, peer_id: str | None) -> None:
        if self.service is not None:
            self.service.connection_denied(source, reason, peer_id)
        else:
            _log.info("connection from %s refused while starting: %s", source, reason)


async def _bind(listener: Listener, addresses: list[str]) -> list[tuple[str, int]]:
    """Bind the control port(s) one address at a time, so a failure names its address."""
    bound: list[tuple[str, int]] = []
    for address in addresses:
        try:
            bound.extend(await listener.start([address]))
        except OSError as exc:
            raise ReflectorError(f"cannot listen on {address}: {_os_reason(exc)}") from exc
    return bound


async def _start_health(address: str) -> asyncio.Server | None:
    """The optional plain-HTTP health endpoint (network.health_http_address)."""
    if not address:
        return None
    info = build_info()
    try:
        return await start_health_server(address, lambda: meta.health(info))
    except OSError as exc:
        raise ReflectorError(f"cannot listen on {address}: {_os_reason(exc)}") from exc


async def _close_listeners(listener: Listener, health_server: asyncio.Server | None) -> None:
    """Release every port a failed start had bound, so the caller may retry at once."""
    if health_server is not None:
        health_server.close()
        await health_server.wait_closed()
    await listener.close()


def _os_reason(exc: OSError) -> str:
    """The OS's own words ("Address already in use"), not asyncio's wrapped message."""
    if isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
        return exc.strerror or str(exc)
    return os.strerror(exc.errno)


def default_deps() -> ServiceDeps:
    """The real path-meta and health facts (psutil, pyroute2, adjtimex)."""
    info = build_info()
    return ServiceDeps(
        path_meta=lambda peer: meta.path_meta(peer, info),
        health=lambda: meta.health(info),
    )


async def serve_forever(
    running: Running,
    on_ready: Callable[[], None] | None = None,
    on_stopping: Callable[[], None] | None = None,
) -> None:
    """Wait for SIGTERM or SIGINT, then stop cleanly (sessions closed, holes removed)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_ready is not None:
        on_ready()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        if on_stopping is not None:
            on_stopping()
        await running.stop("signal")


def _fmt(bound: list[tuple[str, int]]) -> list[str]:
    return [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p in bound]


def format_addresses(bound: list[tuple[str, int]]) -> list[str]:
    """Listen addresses as an operator writes them ("0.0.0.0:4000", "[::]:4000")."""
    return _fmt(bound)
