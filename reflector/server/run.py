"""`reflector serve`: assemble identity, audit, service and listener; run until a signal.

Start-up order is the fail-closed order: identity (refuse a bad key), certificate, TLS context
(refuse an unsafe ssl layout), audit (refuse a damaged log), then bind. Only when all of that
worked is READY=1 sent to systemd; on SIGTERM/SIGINT everything is closed and the stop audited.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from reflector import meta
from reflector.audit import AuditLog, open_audit_log
from reflector.buildinfo import build_info
from reflector.certificate import ensure_certificate_file
from reflector.config import Config
from reflector.fsutil import ensure_private_dir
from reflector.identity import Identity, load_or_create_identity
from reflector.server.dataplane import EndpointService
from reflector.server.health_http import start_health_server
from reflector.server.listener import Listener
from reflector.server.service import Service, ServiceDeps
from reflector.tls import server_context

_log = logging.getLogger(__name__)


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
    """Start an endpoint on the running loop (used by `serve` and by tests)."""
    identity, created = prepare_identity(config)
    cert_path = config.key_path.parent / "identity.crt"
    context = server_context(cert_path, config.key_path)
    audit = open_audit_log(
        config.state_dir, identity.endpoint_id, config.audit.journald, config.audit.jsonl
    )
    if created:
        audit.emit("identity_created")
    factory = service_factory or EndpointService
    service = factory(config, identity, audit, deps or default_deps())
    listener = Listener(config.network, context, service)
    try:
        bound = await listener.start(addresses)
    except OSError as exc:
        audit.emit("service_stop", reason=f"cannot bind: {exc.strerror}")
        audit.close()
        raise
    running = Running(config, identity, audit, service, listener, bound)
    service.publish_status()
    if config.network.health_http_address:
        info = build_info()
        running.health_server = await start_health_server(
            config.network.health_http_address, lambda: meta.health(info)
        )
    audit.emit("service_start", mode=config.network.mode, params={"listen": _fmt(bound)})
    return running


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
