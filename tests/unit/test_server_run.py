"""Starting the endpoint when a port is taken: one clear error, nothing left bound or changed.

The usual reason a port is taken is that the endpoint already runs with the same state dir, so
a failed start must not touch that endpoint's usage ledger or status file either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from reflector.config import Config, parse_config_text
from reflector.errors import ReflectorError
from reflector.server.run import start
from reflector.sessions import clock
from reflector.sessions.accounting import UsageStore
from reflector.status import STATUS_FILE_NAME


def config_for(state: Path, extra: str = "") -> Config:
    config = parse_config_text('[audit]\njournald = "off"\n' + extra)
    return dataclasses.replace(
        config, service=dataclasses.replace(config.service, state_dir=str(state))
    )


@contextlib.contextmanager
def port_in_use() -> Iterator[int]:
    """A loopback port some other program is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def can_listen_on(port: int) -> bool:
    """True if a plain listener (no SO_REUSEADDR) can take the port, i.e. nobody holds it."""
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        sock.listen()
        return True


def test_a_taken_port_is_named_and_the_ports_bound_before_it_are_released(
    tmp_path: Path,
) -> None:
    first = free_port()
    with port_in_use() as taken:
        addresses = [f"127.0.0.1:{first}", f"127.0.0.1:{taken}"]
        with pytest.raises(ReflectorError) as caught:
            asyncio.run(start(config_for(tmp_path / "s"), addresses=addresses))
    assert str(caught.value) == f"cannot listen on 127.0.0.1:{taken}: Address already in use"
    assert can_listen_on(first)


def test_a_taken_health_port_is_named_and_the_control_port_released(tmp_path: Path) -> None:
    control = free_port()
    with port_in_use() as taken:
        config = config_for(tmp_path / "s", f'[network]\nhealth_http_address = "127.0.0.1:{taken}"')
        with pytest.raises(ReflectorError, match=f"^cannot listen on 127.0.0.1:{taken}: Address"):
            asyncio.run(start(config, addresses=[f"127.0.0.1:{control}"]))
    assert can_listen_on(control)


def test_a_failed_start_leaves_the_running_endpoints_ledger_and_status_alone(
    tmp_path: Path,
) -> None:
    state = tmp_path / "s"
    with UsageStore.open(state) as ledger:  # the live endpoint's test, still running
        ledger.record_start(
            session_id="live", peer_id="PPLIVE", test_type="udp_echo", started=clock.now()
        )
    (state / STATUS_FILE_NAME).write_text('{"running": true}')
    with port_in_use() as taken, pytest.raises(ReflectorError):
        asyncio.run(start(config_for(state), addresses=[f"127.0.0.1:{taken}"]))
    with UsageStore.open(state) as ledger:
        assert ledger.unfinished() == [("live", "PPLIVE", "udp_echo")]
    assert (state / STATUS_FILE_NAME).read_text() == '{"running": true}'
    trail = (state / "audit.jsonl").read_text()
    assert "session_close" not in trail
    assert f"cannot listen on 127.0.0.1:{taken}" in trail  # the failed start is on record
