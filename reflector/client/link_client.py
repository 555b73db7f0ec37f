"""The appliance side of Paramedic Link: an asyncio client over mutual TLS (spec §5, §6).

The client has its own identity (same code as the endpoint, its own state dir) and pins the
endpoint by ID: the ID computed from the key the server proved must equal `expected_id`.
Trust on first use is possible only when asked for explicitly, and then the ID is recorded in
`known_endpoints.json` so that later connections are pinned.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

from reflector.certificate import ensure_certificate_file
from reflector.endpoint_id import parse_id
from reflector.errors import EndpointIdError, ReflectorError
from reflector.fsutil import atomic_write, ensure_private_dir
from reflector.identity import Identity, load_or_create_identity
from reflector.link import NEED_DATA, PROTOCOL_VERSION, ClientConnection, Reply
from reflector.link.connection import UnattributedError
from reflector.link.messages import ErrorResponse, Hello, Request, Response, ServerHello
from reflector.tls import ALPN_LINK, check_expected_peer, client_context, peer_id_of

KNOWN_ENDPOINTS_FILE = "known_endpoints.json"
# Bounds on waiting for the endpoint: a connect (TCP + TLS) and one RPC round trip.
CONNECT_TIMEOUT_SEC = 10.0
REQUEST_TIMEOUT_SEC = 30.0
READ_CHUNK = 64 * 1024

R = TypeVar("R", bound=Response)


class RemoteError(ReflectorError):
    """The endpoint refused a request; `code` is its reason code."""

    def __init__(self, code: str, message: str, retry_after: int | None = None) -> None:
        hint = f" (retry after {retry_after} s)" if retry_after is not None else ""
        super().__init__(f"{code}: {message}{hint}")
        self.code = code
        self.remote_message = message
        self.retry_after = retry_after


def default_appliance_dir() -> Path:
    """Where the appliance keeps its identity when no --state-dir is given."""
    env = os.environ.get("REFLECTOR_APPLIANCE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/var/lib/reflector-appliance")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "reflector-appliance"


@dataclass(frozen=True)
class ApplianceIdentity:
    """The appliance's key and certificate paths, ready for a TLS client context."""

    identity: Identity
    cert_path: Path
    state_dir: Path

    @classmethod
    def open(cls, state_dir: Path) -> ApplianceIdentity:
        ensure_private_dir(state_dir)
        identity, _ = load_or_create_identity(state_dir / "identity.ed25519")
        cert = ensure_certificate_file(identity, datetime.now(UTC))
        return cls(identity=identity, cert_path=cert, state_dir=state_dir)

    def context(self, alpn: str = ALPN_LINK) -> ssl.SSLContext:
        return client_context(self.cert_path, self.identity.key_path, alpn)


def parse_endpoint(text: str) -> tuple[str, int]:
    """ "host:port" or "[v6]:port" → (host, port); a clear error otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536 or not host:
        raise ReflectorError(f'endpoint must look like "HOST:PORT" or "[IPv6]:PORT", got {text!r}')
    return host.strip("[]"), int(port)


def resolve_pin(
    state_dir: Path, endpoint: tuple[str, int], expected_id: str | None, tofu: bool
) -> str | None:
    """The ID to pin: explicit, else recorded, else None (only allowed with `tofu`)."""
    if expected_id is not None:
        try:
            return parse_id(expected_id)
        except EndpointIdError as exc:
            raise ReflectorError(f"--expect-id {expected_id!r}: {exc}") from None
    known = _read_known(state_dir)
    recorded = known.get(_endpoint_key(endpoint))
    if recorded is not None:
        return recorded
    if not tofu:
        raise ReflectorError(
            "no expected Endpoint ID: pass --expect-id ID (printed by `reflector id` on the"
            " endpoint), or --tofu to trust this endpoint on first use"
        )
    return None


def record_known(state_dir: Path, endpoint: tuple[str, int], endpoint_id: str) -> None:
    known = _read_known(state_dir)
    known[_endpoint_key(endpoint)] = endpoint_id
    data = json.dumps(known, indent=2, sort_keys=True).encode()
    atomic_write(state_dir / KNOWN_ENDPOINTS_FILE, data, 0o600)


def _read_known(state_dir: Path) -> dict[str, str]:
    try:
        doc = json.loads((state_dir / KNOWN_ENDPOINTS_FILE).read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise ReflectorError(f"{state_dir / KNOWN_ENDPOINTS_FILE}: unreadable: {exc}") from None
    if not isinstance(doc, dict):
        raise ReflectorError(f"{state_dir / KNOWN_ENDPOINTS_FILE}: not a JSON object")
    return {str(k): str(v) for k, v in doc.items()}


def _endpoint_key(endpoint: tuple[str, int]) -> str:
    host, port = endpoint
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LinkClient:
    """One control connection; requests may be in flight concurrently."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        endpoint_id: str,
        endpoint: tuple[str, int],
    ) -> None:
        self.endpoint_id = endpoint_id
        self.endpoint = endpoint
        self.server_hello: ServerHello | None = None
        self._reader = reader
        self._writer = writer
        self._conn = ClientConnection()
        self._waiting: dict[int, asyncio.Future[Response]] = {}
        self._failure: BaseException | None = None
        self._pump = asyncio.get_running_loop().create_task(self._read_loop())

    @classmethod
    async def connect(
        cls,
        endpoint: tuple[str, int],
        appliance: ApplianceIdentity,
        expected_id: str | None,
        *,
        tofu: bool = False,
        timeout: float = CONNECT_TIMEOUT_SEC,
    ) -> LinkClient:
        """Connect, pin the endpoint's ID, and say hello."""
        pin = resolve_pin(appliance.state_dir, endpoint, expected_id, tofu)
        host, port = endpoint
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port, ssl=appliance.context(), server_hostname=""),
                timeout,
            )
        except TimeoutError:
            raise ReflectorError(
                f"{_endpoint_key(endpoint)}: no TLS connection within {timeout:.0f} s"
            ) from None
        except (OSError, ssl.SSLError) as exc:
            raise ReflectorError(f"{_endpoint_key(endpoint)}: cannot connect: {exc}") from None
        ssl_obj = writer.get_extra_info("ssl_object")
        try:
            if pin is not None:
                actual = check_expected_peer(ssl_obj, pin)
            else:
                actual = peer_id_of(ssl_obj)
                record_known(appliance.state_dir, endpoint, actual)
        except Exception:
            writer.close()
            raise
        client = cls(reader, writer, actual, endpoint)
        try:
            client.server_hello = await client.call(
                Hello(version=PROTOCOL_VERSION, features=("udp_echo", "throughput", "tunnel")),
                ServerHello,
            )
        except BaseException:
            await client.close()
            raise
        return client

    async def call(
        self, request: Request, expect: type[R], timeout: float = REQUEST_TIMEOUT_SEC
    ) -> R:
        """Send `request`, wait for its answer; RemoteError if the endpoint refused it."""
        response = await self.request(request, timeout)
        if isinstance(response, ErrorResponse):
            raise RemoteError(response.code, response.message, response.retry_after)
        if not isinstance(response, expect):
            raise ReflectorError(f"unexpected answer {response.TYPE} to {request.TYPE}")
        return response

    async def request(self, request: Request, timeout: float = REQUEST_TIMEOUT_SEC) -> Response:
        if self._failure is not None:
            raise self._closed_error()
        data = self._conn.send_request(request)
        future: asyncio.Future[Response] = asyncio.get_running_loop().create_future()
        self._waiting[self._conn.last_request_id] = future
        self._writer.write(data)
        await self._writer.drain()
        try:
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise ReflectorError(f"no answer to {request.TYPE} within {timeout:.0f} s") from None

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(BaseException):
            await self._pump
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                data = await self._reader.read(READ_CHUNK)
                if not data:
                    raise ConnectionError("the endpoint closed the connection")
                self._conn.receive_data(data)
                self._dispatch()
        except asyncio.CancelledError:
            self._fail(ConnectionError("connection closed"))
            raise
        except Exception as exc:
            self._fail(exc)

    def _dispatch(self) -> None:
        while True:
            event = self._conn.next_event()
            if event is NEED_DATA:
                return
            if isinstance(event, UnattributedError):
                # The endpoint is telling us why it closes the connection.
                self._fail(RemoteError(event.code, event.message))
                continue
            assert isinstance(event, Reply)
            future = self._waiting.pop(event.response.request_id, None)
            if future is not None and not future.done():
                future.set_result(event.response)

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None or isinstance(exc, RemoteError):
            self._failure = exc
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(self._closed_error())
        self._waiting.clear()

    def _closed_error(self) -> BaseException:
        if isinstance(self._failure, RemoteError):
            return self._failure
        return ReflectorError(f"connection to {_endpoint_key(self.endpoint)} lost: {self._failure}")
