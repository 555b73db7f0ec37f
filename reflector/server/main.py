"""`reflector serve` as a process: logging, the event loop, the banner and systemd notification."""

from __future__ import annotations

import asyncio
import logging
import sys

from reflector.config import Config
from reflector.server.notify import Notifier
from reflector.server.run import Running, format_addresses, serve_forever, start


def run_serve(config: Config) -> None:
    """Run the endpoint until SIGTERM/SIGINT (blocking)."""
    logging.basicConfig(
        level=config.service.log_level.upper(),
        stream=sys.stderr,
        format="%(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(_main(config))


async def _main(config: Config) -> None:
    notifier = Notifier()
    running = await start(config)
    running.service.on_status = notifier.status
    _banner(running)
    await serve_forever(
        running,
        on_ready=lambda: notifier.ready(running.service.status_line()),
        on_stopping=lambda: notifier.stopping("stopping: closing sessions"),
    )


def _banner(running: Running) -> None:
    cfg = running.config
    print(f"Endpoint ID: {running.identity.endpoint_id}", flush=True)
    for address in format_addresses(running.addresses):
        print(f"Listening on {address} (mTLS, ALPN pp-link/1, mode {cfg.network.mode})", flush=True)
    if cfg.access.pairing_enabled:
        print(
            "Pairing is enabled: run `reflector pair --ttl 10m` on this host to admit one"
            " appliance, then `reflector client pair --endpoint HOST:PORT --expect-id"
            f" {running.identity.endpoint_id} --token TOKEN` on the appliance.",
            flush=True,
        )
