"""The optional plain-HTTP health port (spec §7.4): `GET /health` and nothing else.

It exists so that HttpProbe/TcpProbe and load balancers can check liveness without a key. It
is unauthenticated, so it is deliberately tiny: one route, one request per connection, a
bounded request head read within a deadline, a cap on concurrent connections, and a body
restricted to `status`, `version` and `load` whatever the health callable returns — no IDs, no
peers, no configuration.

The request head is judged by `response_for`, a pure function of the bytes received; the
asyncio shell only reads, bounds, writes and closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from reflector.config import parse_address
from reflector.errors import ConfigError

_log = logging.getLogger(__name__)

# A health probe's request is one line plus a few headers (~100-300 bytes); 4 KiB leaves room
# for verbose clients while keeping an unauthenticated connection's memory tiny.
MAX_HEAD_BYTES = 4 * 1024

# A real client sends its request at once; 5 s covers a slow link and stops slow-loris clients
# from holding a slot. The same bound applies to delivering our (small) reply.
READ_TIMEOUT_SEC = 5.0
WRITE_TIMEOUT_SEC = 5.0

# Probes come one at a time from a handful of appliances; 32 open connections is generous for
# them and bounds what a flood can hold (each slot costs at most MAX_HEAD_BYTES x 2 of buffer).
MAX_CONNECTIONS = 32

# After replying we half-close and discard what the client still sends, briefly, so that our
# close does not turn into a TCP reset that could destroy the reply before the client reads it.
LINGER_TIMEOUT_SEC = 1.0
LINGER_MAX_BYTES = 64 * 1024

# Kernel accept queue for the listening socket; excess SYNs wait in the kernel, not in us.
LISTEN_BACKLOG = 64

# The only fields the health body may carry (spec §7.4), whatever the callable returns.
HEALTH_FIELDS = ("status", "version", "load")

_REASONS = {
    200: "OK",
    400: "Bad Request",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

# RFC 9110 §5.6.2 token, used for methods and header names.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_VERSION = re.compile(r"HTTP/1\.[01]")
# Visible ASCII only: no spaces, no control characters (RFC 9112 §3.2 origin-form).
_TARGET = re.compile(r"/[\x21-\x7e]*")
# Field values: visible ASCII, space and tab (obs-text is not needed by any health probe).
_FIELD_VALUE = re.compile(r"[\x20-\x7e\t]*")
_HEAD_END = b"\r\n\r\n"


class BadRequest(ValueError):
    """The request head breaks HTTP/1.1 syntax; answered with 400."""


@dataclass(frozen=True, kw_only=True)
class RequestHead:
    """A syntactically valid HTTP/1.x request line and header fields."""

    method: str
    target: str
    version: str
    headers: tuple[tuple[str, str], ...]


def parse_request_head(head: bytes) -> RequestHead:
    """Parse a request head ending in CRLF CRLF; raise BadRequest for anything malformed."""
    if not head.endswith(_HEAD_END):
        raise BadRequest("the request head does not end with an empty line")
    try:
        text = head[: -len(_HEAD_END)].decode("ascii")
    except UnicodeDecodeError:
        raise BadRequest("non-ASCII bytes in the request head") from None
    request_line, *field_lines = text.split("\r\n")
    parts = request_line.split(" ")
    if len(parts) != 3:
        raise BadRequest("the request line is not 'METHOD TARGET VERSION'")
    method, target, version = parts
    if not _TOKEN.fullmatch(method):
        raise BadRequest("the method is not a token")
    if not _TARGET.fullmatch(target):
        raise BadRequest("the target is not an absolute path")
    if not _VERSION.fullmatch(version):
        raise BadRequest("the version is not HTTP/1.0 or HTTP/1.1")
    headers = tuple(_parse_field(line) for line in field_lines)
    hosts = sum(1 for name, _ in headers if name == "host")
    if version == "HTTP/1.1" and hosts != 1:
        # RFC 9112 §3.2: a server MUST answer 400 to HTTP/1.1 without exactly one Host.
        raise BadRequest("an HTTP/1.1 request needs exactly one Host header")
    return RequestHead(method=method, target=target, version=version, headers=headers)


def _parse_field(line: str) -> tuple[str, str]:
    name, sep, value = line.partition(":")
    # No whitespace before the colon and no obsolete line folding (RFC 9112 §5.1, §5.2).
    if not sep or not _TOKEN.fullmatch(name):
        raise BadRequest("malformed header field")
    if not _FIELD_VALUE.fullmatch(value):
        raise BadRequest("control characters in a header value")
    return name.lower(), value.strip(" \t")


def render(
    status: int,
    body: bytes = b"",
    content_type: str = "text/plain; charset=utf-8",
    extra: Mapping[str, str] | None = None,
) -> bytes:
    """A complete HTTP/1.1 response; every reply closes the connection (no keep-alive)."""
    lines = [
        f"HTTP/1.1 {status} {_REASONS[status]}",
        f"Content-Type: {content_type}",
        f"Content-Length: {len(body)}",
        "Cache-Control: no-store",
        "Connection: close",
        *(f"{name}: {value}" for name, value in (extra or {}).items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


def _plain(status: int, extra: Mapping[str, str] | None = None) -> bytes:
    return render(status, f"{_REASONS[status].lower()}\n".encode("ascii"), extra=extra)


def health_body(snapshot: Mapping[str, object]) -> bytes:
    """The JSON body: only `HEALTH_FIELDS`, so a richer dict can never leak through this port."""
    return json.dumps({key: snapshot.get(key) for key in HEALTH_FIELDS}, allow_nan=False).encode(
        "ascii"
    )


def response_for(head: bytes, health: Callable[[], Mapping[str, object]]) -> bytes:
    """The whole reply to one request head (pure, given a pure `health`)."""
    try:
        request = parse_request_head(head)
    except BadRequest:
        return _plain(400)
    if request.target.split("?", 1)[0] != "/health":
        return _plain(404)
    if request.method != "GET":
        return _plain(405, extra={"Allow": "GET"})
    try:
        body = health_body(health())
    except Exception:  # never let a failing fact kill the port; say only that it failed
        _log.exception("the health callable failed")
        return _plain(500)
    return render(200, body, content_type="application/json")


class _HealthServer:
    """The asyncio shell: admit under the cap, read one bounded head, reply, close."""

    def __init__(
        self,
        health: Callable[[], Mapping[str, object]],
        *,
        max_connections: int,
        read_timeout: float,
    ) -> None:
        self._health = health
        self._max_connections = max_connections
        self._read_timeout = read_timeout
        self._active = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._active >= self._max_connections:
            await _send_and_close(writer, _plain(503), reader=None)
            return
        self._active += 1
        try:
            reply = await self._read_and_answer(reader)
            await _send_and_close(writer, reply, reader=reader)
        finally:
            self._active -= 1

    async def _read_and_answer(self, reader: asyncio.StreamReader) -> bytes:
        try:
            head = await asyncio.wait_for(reader.readuntil(_HEAD_END), self._read_timeout)
        except asyncio.LimitOverrunError:
            return _plain(431)
        except TimeoutError:
            return _plain(408)
        except asyncio.IncompleteReadError:
            return _plain(400)  # the client stopped sending before the end of the head
        except ConnectionError:
            return b""
        return response_for(head, self._health)


class OneRequestProtocol(asyncio.Protocol):
    """One HTTP request on an already authenticated connection (the mTLS port, ALPN http/1.1).

    Buffers at most MAX_HEAD_BYTES of request head for at most `timeout` seconds, answers with
    `reply_for(head)` and closes; every other outcome gets its status code (431, 408) and a
    close. The TLS, the key and the allowlist were checked before this protocol exists.
    """

    def __init__(self, reply_for: Callable[[bytes], bytes], timeout: float = READ_TIMEOUT_SEC):
        self._reply_for = reply_for
        self._timeout = timeout
        self._buffer = bytearray()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._timer = asyncio.get_running_loop().call_later(self._timeout, self._reply, _plain(408))

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._buffer += data
        end = self._buffer.find(_HEAD_END)
        if 0 <= end < MAX_HEAD_BYTES:
            self._reply(self._reply_for(bytes(self._buffer[: end + len(_HEAD_END)])))
        elif len(self._buffer) >= MAX_HEAD_BYTES:
            self._reply(_plain(431))

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._transport = None

    def _reply(self, reply: bytes) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        self._transport.write(reply)
        self._transport.close()


def forbidden(head: bytes) -> bytes:
    """The reply to any request from a key that is not on the allowlist."""
    return _plain(403)


def unavailable(head: bytes) -> bytes:
    """The reply while the endpoint is still starting."""
    return _plain(503)


async def _send_and_close(
    writer: asyncio.StreamWriter, reply: bytes, reader: asyncio.StreamReader | None
) -> None:
    """Write `reply`, half-close, briefly discard leftover input, then close; never raises."""
    try:
        if reply:
            writer.write(reply)
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_SEC)
        if reader is not None and writer.can_write_eof():
            writer.write_eof()
            await asyncio.wait_for(_discard(reader), LINGER_TIMEOUT_SEC)
    except (TimeoutError, ConnectionError, OSError):
        writer.transport.abort()
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(writer.wait_closed(), WRITE_TIMEOUT_SEC)


async def _discard(reader: asyncio.StreamReader) -> None:
    """Read and drop input until EOF or `LINGER_MAX_BYTES`, whichever comes first."""
    remaining = LINGER_MAX_BYTES
    while remaining > 0:
        chunk = await reader.read(min(remaining, MAX_HEAD_BYTES))
        if not chunk:
            return
        remaining -= len(chunk)


async def start_health_server(
    address: str,
    health: Callable[[], Mapping[str, object]],
    *,
    max_connections: int = MAX_CONNECTIONS,
    read_timeout: float = READ_TIMEOUT_SEC,
) -> asyncio.Server:
    """Listen on `address` ("127.0.0.1:8080" or "[::]:8080") and serve `GET /health`.

    `health` is called once per valid request (typically `lambda: meta.health(build)`). An IPv6
    address listens on IPv6 only, like the control port. Raises ConfigError for a malformed
    address; OSError if the address cannot be bound.
    """
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise ConfigError(f"network.health_http_address: {exc}") from None
    server = _HealthServer(health, max_connections=max_connections, read_timeout=read_timeout)
    return await asyncio.start_server(
        server.handle,
        host=host,
        port=port,
        limit=MAX_HEAD_BYTES,
        backlog=LISTEN_BACKLOG,
        reuse_address=True,
    )
