"""The tunneled data plane: every iperf3 connection rides its own mTLS connection, relayed.

Real TLS with real Ed25519 identities on loopback: the appliance's `TunnelClient` talks to a
small endpoint built the way the listener builds it (`server_protocol_factory`, peer ID from the
key, hand-off to `TunnelServerProtocol`), which relays to an echo server, a sink, or a real
`iperf3 -s`. The opening exchange's parsing is tested on its own first.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import os
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from reflector.certificate import ensure_certificate_file
from reflector.identity import Identity, load_or_create_identity
from reflector.link.frames import RemoteProtocolError, encode_frame
from reflector.tls import (
    ALPN_TUNNEL,
    client_context,
    peer_id_of,
    server_context,
    server_protocol_factory,
)
from reflector.tunnel import (
    RelayClosed,
    TunnelClient,
    TunnelCounters,
    TunnelGrant,
    TunnelRefusal,
    TunnelRefused,
    TunnelServerProtocol,
    connections_for_streams,
)
from reflector.tunnel.relay import MAX_HELD_BYTES, WRITE_HIGH_WATER, Relay
from reflector.tunnel.wire import (
    MAX_OPEN_FRAME_SIZE,
    TunnelOpen,
    encode_tunnel_error,
    encode_tunnel_ok,
    encode_tunnel_open,
    parse_tunnel_open,
    parse_tunnel_reply,
    split_first_frame,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# Generous for loopback, short enough that a hang fails one test instead of the suite.
IO_TIMEOUT = 5.0
# asyncio reads at most this much per callback (TCP and TLS alike).
READ_CHUNK = 256 * 1024
SESSION = "s-1"
TOKEN = "tok-0123456789abcdef"


# --- identities


@dataclass(frozen=True)
class Peer:
    identity: Identity
    cert: Path
    key: Path

    @property
    def id(self) -> str:
        return self.identity.endpoint_id


def make_peer(directory: Path) -> Peer:
    identity, _ = load_or_create_identity(directory / "identity.ed25519")
    return Peer(identity, ensure_certificate_file(identity, NOW), identity.key_path)


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer(tmp_path_factory.mktemp("endpoint"))


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer(tmp_path_factory.mktemp("appliance"))


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer(tmp_path_factory.mktemp("stranger"))


# --- the opening exchange, pure


def test_tunnel_open_round_trips_and_hides_the_token() -> None:
    frame = encode_tunnel_open(TunnelOpen(session_id=SESSION, token=TOKEN))
    split = split_first_frame(frame + b"stream bytes", MAX_OPEN_FRAME_SIZE)
    assert split is not None
    payload, rest = split
    assert rest == b"stream bytes"
    parsed = parse_tunnel_open(payload)
    assert parsed == TunnelOpen(session_id=SESSION, token=TOKEN)
    assert TOKEN not in repr(parsed)


def test_the_first_frame_waits_for_its_last_byte() -> None:
    frame = encode_tunnel_open(TunnelOpen(session_id=SESSION, token=TOKEN))
    assert split_first_frame(frame[:3], MAX_OPEN_FRAME_SIZE) is None
    assert split_first_frame(frame[:-1], MAX_OPEN_FRAME_SIZE) is None


def test_an_oversized_first_frame_is_refused_from_its_header_alone() -> None:
    header = (MAX_OPEN_FRAME_SIZE + 1).to_bytes(4, "big")
    with pytest.raises(RemoteProtocolError) as caught:
        split_first_frame(header, MAX_OPEN_FRAME_SIZE)
    assert caught.value.code == "frame_too_large"


BAD_OPENS: list[tuple[object, str]] = [
    ([1, 2], "bad_message"),
    ({"session_id": SESSION, "token": TOKEN}, "bad_message"),
    ({"type": "hello", "session_id": SESSION, "token": TOKEN}, "unknown_type"),
    ({"type": "tunnel_open", "token": TOKEN}, "bad_field"),
    ({"type": "tunnel_open", "session_id": SESSION, "token": TOKEN, "x": 1}, "bad_field"),
    ({"type": "tunnel_open", "session_id": 7, "token": TOKEN}, "bad_field"),
    ({"type": "tunnel_open", "session_id": "a b", "token": TOKEN}, "bad_field"),
    ({"type": "tunnel_open", "session_id": "s" * 65, "token": TOKEN}, "bad_field"),
    ({"type": "tunnel_open", "session_id": SESSION, "token": ""}, "bad_field"),
    ({"type": "tunnel_open", "session_id": SESSION, "token": "t" * 257}, "bad_field"),
    ({"type": "tunnel_open", "session_id": SESSION, "token": "tab\there"}, "bad_field"),
]


@pytest.mark.parametrize(("obj", "code"), BAD_OPENS)
def test_a_tunnel_open_must_match_its_schema_exactly(obj: object, code: str) -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_tunnel_open(json.dumps(obj).encode())
    assert caught.value.code == code


def test_a_refusal_never_quotes_the_token() -> None:
    secret = "secret\x01value"
    with pytest.raises(RemoteProtocolError) as caught:
        parse_tunnel_open(
            json.dumps({"type": "tunnel_open", "session_id": "s", "token": secret}).encode()
        )
    assert "secret" not in str(caught.value)


def test_a_first_frame_that_is_not_json_is_refused() -> None:
    with pytest.raises(RemoteProtocolError) as caught:
        parse_tunnel_open(b"{not json")
    assert caught.value.code == "bad_json"


def test_the_reply_is_tunnel_ok_or_an_error() -> None:
    assert parse_tunnel_reply(encode_tunnel_ok()[4:]).ok
    refused = parse_tunnel_reply(encode_tunnel_error("bad_token", "wrong token")[4:])
    assert (refused.ok, refused.code, refused.message) == (False, "bad_token", "wrong token")
    with pytest.raises(RemoteProtocolError):
        parse_tunnel_reply(b'{"type":"tunnel_ok","request_id":0,"extra":1}')
    with pytest.raises(RemoteProtocolError):
        parse_tunnel_reply(b'{"type":"tunnel_ok","request_id":3}')
    with pytest.raises(RemoteProtocolError):
        parse_tunnel_reply(b'{"type":"pong","request_id":0}')


# --- a small endpoint wired the way the listener wires it


@dataclass
class Session:
    owner: str
    token: str
    target: tuple[str, int]
    max_connections: int = 4
    counters: TunnelCounters = field(default_factory=TunnelCounters)
    closed: list[RelayClosed] = field(default_factory=list)


@dataclass
class Sessions:
    """A stand-in for the session manager's authorizer, with the checks it must make."""

    by_id: dict[str, Session] = field(default_factory=dict)
    refusals: list[TunnelRefusal] = field(default_factory=list)

    async def authorize(self, peer_id: str, session_id: str, token: str) -> TunnelGrant:
        await asyncio.sleep(0)  # the real one may await: exercise that path
        session = self.by_id.get(session_id)
        if session is None:
            raise TunnelRefused("unknown_session", f"no live session {session_id}")
        if session.owner != peer_id:
            raise TunnelRefused("not_authorized", "this session belongs to another peer")
        if not hmac.compare_digest(session.token.encode(), token.encode()):
            raise TunnelRefused("bad_token", "wrong session token")
        return TunnelGrant(
            target=session.target,
            counters=session.counters,
            max_connections=session.max_connections,
            on_close=session.closed.append,
        )


class Handoff(asyncio.Protocol):
    """The listener's dispatch, reduced to the tunnel: peer ID from the key, then hand off."""

    def __init__(self, sessions: Sessions, options: dict[str, Any]) -> None:
        self._sessions = sessions
        self._options = options
        self._inner: TunnelServerProtocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer_id = peer_id_of(transport.get_extra_info("ssl_object"))
        host, port = transport.get_extra_info("peername")[:2]
        self._inner = TunnelServerProtocol(
            peer_id,
            (host, port),
            self._sessions.authorize,
            on_refused=self._sessions.refusals.append,
            **self._options,
        )
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        assert self._inner is not None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        assert self._inner is not None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        assert self._inner is not None
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        assert self._inner is not None
        self._inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is not None:
            self._inner.connection_lost(exc)


class Target(asyncio.Protocol):
    """A TCP server behind the tunnel: echoes (or, as a sink, counts) what it reads."""

    def __init__(self, stats: TargetStats) -> None:
        self.stats = stats
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.stats.accepted += 1
        self.stats.transports.append(transport)
        if self.stats.sink_paused:
            transport.pause_reading()

    def data_received(self, data: bytes) -> None:
        self.stats.received += len(data)
        if self.stats.sink:
            return
        assert self.transport is not None
        self.transport.write(data)

    def eof_received(self) -> None:
        # Answer the half-close with a trailer, proving our write side was still open.
        assert self.transport is not None
        self.transport.write(b"<eof>")


@dataclass
class TargetStats:
    sink: bool = False
    sink_paused: bool = False
    accepted: int = 0
    received: int = 0
    transports: list[asyncio.Transport] = field(default_factory=list)


@dataclass
class World:
    sessions: Sessions
    endpoint_port: int
    target: tuple[str, int]
    target_stats: TargetStats

    def session(self, owner: Peer, **kwargs: Any) -> Session:
        session = Session(owner=owner.id, token=TOKEN, target=self.target, **kwargs)
        self.sessions.by_id[SESSION] = session
        return session


@contextlib.asynccontextmanager
async def world(endpoint: Peer, *, sink: bool = False, **options: Any) -> AsyncIterator[World]:
    loop = asyncio.get_running_loop()
    stats = TargetStats(sink=sink, sink_paused=sink)
    target = await loop.create_server(lambda: Target(stats), "127.0.0.1", 0)
    sessions = Sessions()
    factory = server_protocol_factory(
        server_context(endpoint.cert, endpoint.key), lambda: Handoff(sessions, options)
    )
    server = await loop.create_server(factory, "127.0.0.1", 0)
    try:
        yield World(
            sessions=sessions,
            endpoint_port=server.sockets[0].getsockname()[1],
            target=target.sockets[0].getsockname()[:2],
            target_stats=stats,
        )
    finally:
        for session in sessions.by_id.values():
            session.counters.stop_all()
        for transport in stats.transports:
            transport.abort()
        server.close()
        target.close()


def tunnel_client(
    peer: Peer, port: int, expected: Peer, *, session_id: str = SESSION, token: str = TOKEN
) -> TunnelClient:
    return TunnelClient(
        ("127.0.0.1", port),
        client_context(peer.cert, peer.key, alpn=ALPN_TUNNEL),
        expected.id,
        session_id,
        token,
    )


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    async def bounded() -> None:
        async with asyncio.timeout(4 * IO_TIMEOUT):
            await scenario()

    asyncio.run(bounded())


async def eventually(check: Callable[[], bool], what: str) -> None:
    async with asyncio.timeout(IO_TIMEOUT):
        while not check():
            await asyncio.sleep(0.01)
    assert check(), what


async def read_closed(reader: asyncio.StreamReader) -> bytes:
    """What a local connection reads until it is closed (a reset counts as closed)."""
    try:
        async with asyncio.timeout(IO_TIMEOUT):
            return await reader.read()
    except ConnectionResetError:
        return b""


# --- through the tunnel


def test_data_round_trips_both_ways_and_every_byte_is_counted(
    endpoint: Peer, appliance: Peer
) -> None:
    payload = os.urandom(3 * 1024 * 1024 + 17)

    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            assert local[0] == "127.0.0.1"
            reader, writer = await asyncio.open_connection(*local)
            writer.write(payload)
            echoed = await reader.readexactly(len(payload))
            writer.close()
            await eventually(lambda: session.closed != [], "the relay reports its end")
            await client.close()

            assert echoed == payload
            assert client.failures == []
            assert session.counters.upstream_bytes == len(payload)
            assert session.counters.downstream_bytes == len(payload)
            assert client.counters.upstream_bytes == len(payload)
            assert client.counters.downstream_bytes == len(payload)
            assert session.closed == [
                RelayClosed(
                    upstream_bytes=len(payload),
                    downstream_bytes=len(payload),
                    stopped=False,
                    error=None,
                )
            ]
            assert session.counters.open_connections == 0
            assert w.sessions.refusals == []

    run(scenario)


def test_counters_aggregate_over_all_connections_of_a_session(
    endpoint: Peer, appliance: Peer
) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            streams = [await asyncio.open_connection(*local) for _ in range(3)]
            for index, (reader, writer) in enumerate(streams):
                writer.write(b"x" * (1000 * (index + 1)))
                assert await reader.readexactly(1000 * (index + 1))
            assert session.counters.open_connections == 3
            assert session.counters.connections_opened == 3
            for _, writer in streams:
                writer.close()
            await eventually(lambda: len(session.closed) == 3, "all three relays end")
            assert session.counters.upstream_bytes == 6000
            assert session.counters.downstream_bytes == 6000
            assert sorted(c.upstream_bytes for c in session.closed) == [1000, 2000, 3000]
            await client.close()

    run(scenario)


def test_bytes_sent_right_behind_tunnel_open_are_forwarded(endpoint: Peer, appliance: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            context = client_context(appliance.cert, appliance.key, alpn=ALPN_TUNNEL)
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", w.endpoint_port, ssl=context
            )
            opening = encode_tunnel_open(TunnelOpen(session_id=SESSION, token=TOKEN))
            writer.write(opening + b"early bytes")
            assert await reader.readexactly(len(encode_tunnel_ok())) == encode_tunnel_ok()
            assert await reader.readexactly(len(b"early bytes")) == b"early bytes"
            assert session.counters.upstream_bytes == len(b"early bytes")
            writer.close()

    run(scenario)


async def refused_attempt(client: TunnelClient) -> bytes:
    """Connect locally through a client whose tunnel will be refused; what does iperf3 read?"""
    local = await client.start()
    reader, writer = await asyncio.open_connection(*local)
    writer.write(b"iperf3 cookie")
    read = await read_closed(reader)
    await eventually(lambda: client.failures != [], "the failure is reported")
    writer.close()
    await client.close()
    return read


@pytest.mark.parametrize(
    ("who", "session_id", "token", "code"),
    [
        ("appliance", SESSION, "wrong-token", "bad_token"),
        ("appliance", "no-such-session", TOKEN, "unknown_session"),
        ("stranger", SESSION, TOKEN, "not_authorized"),
    ],
)
def test_a_tunnel_the_authorizer_refuses_reaches_nothing(
    endpoint: Peer,
    appliance: Peer,
    stranger: Peer,
    who: str,
    session_id: str,
    token: str,
    code: str,
) -> None:
    peer = appliance if who == "appliance" else stranger

    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            client = tunnel_client(
                peer, w.endpoint_port, endpoint, session_id=session_id, token=token
            )
            assert await refused_attempt(client) == b""
            assert [f.code for f in client.failures] == [code]
            assert w.target_stats.accepted == 0
            assert session.counters.connections_opened == 0
            assert [(r.code, r.peer_id, r.session_id) for r in w.sessions.refusals] == [
                (code, peer.id, session_id)
            ]

    run(scenario)


def test_a_client_refuses_an_endpoint_with_another_key(
    endpoint: Peer, appliance: Peer, stranger: Peer
) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, expected=stranger)
            assert await refused_attempt(client) == b""
            assert [f.code for f in client.failures] == ["endpoint_mismatch"]
            assert w.target_stats.accepted == 0

    run(scenario)


def test_connections_beyond_the_sessions_cap_are_refused(endpoint: Peer, appliance: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance, max_connections=1)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            reader, writer = await asyncio.open_connection(*local)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            second_reader, second_writer = await asyncio.open_connection(*local)
            assert await read_closed(second_reader) == b""
            await eventually(lambda: client.failures != [], "the refusal is reported")
            assert [f.code for f in client.failures] == ["too_many_connections"]
            assert w.target_stats.accepted == 1
            assert session.counters.open_connections == 1
            writer.close()
            second_writer.close()
            await client.close()

    run(scenario)


def test_an_unreachable_target_is_reported_to_the_appliance(
    endpoint: Peer, appliance: Peer
) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            session.target = ("127.0.0.1", free_port())
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            assert await refused_attempt(client) == b""
            assert [f.code for f in client.failures] == ["target_unreachable"]
            await eventually(lambda: session.counters.open_connections == 0, "slot released")

    run(scenario)


MALFORMED_FIRST_FRAMES: list[tuple[bytes, str]] = [
    (encode_frame({"type": "tunnel_open", "session_id": SESSION}), "bad_field"),
    (encode_frame({"type": "hello", "version": 1}), "unknown_type"),
    (b"\x00\x00\x00\x05{oops", "bad_json"),
    ((MAX_OPEN_FRAME_SIZE + 1).to_bytes(4, "big"), "frame_too_large"),
    (b"\x00\x00\x00\x00", "bad_frame"),
]


@pytest.mark.parametrize(("frame", "code"), MALFORMED_FIRST_FRAMES)
def test_a_malformed_first_frame_is_refused_with_its_reason(
    endpoint: Peer, appliance: Peer, frame: bytes, code: str
) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            w.session(appliance)
            reply = await raw_tunnel(w, appliance, frame)
            assert reply.code == code
            assert w.target_stats.accepted == 0
            assert [r.code for r in w.sessions.refusals] == [code]

    run(scenario)


def test_a_peer_that_never_sends_tunnel_open_is_dropped(endpoint: Peer, appliance: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint, first_frame_timeout=0.1) as w:
            reply = await raw_tunnel(w, appliance, b"")
            assert reply.code == "open_timeout"

    run(scenario)


@dataclass(frozen=True)
class RawReply:
    code: str
    rest: bytes


async def raw_tunnel(w: World, peer: Peer, first: bytes) -> RawReply:
    """Open a TLS tunnel connection by hand, send `first`, read the one reply and the close."""
    context = client_context(peer.cert, peer.key, alpn=ALPN_TUNNEL)
    reader, writer = await asyncio.open_connection("127.0.0.1", w.endpoint_port, ssl=context)
    writer.write(first)
    async with asyncio.timeout(IO_TIMEOUT):
        length = int.from_bytes(await reader.readexactly(4), "big")
        reply = json.loads(await reader.readexactly(length))
        rest = await read_closed(reader)
    writer.close()
    assert reply["type"] == "error"
    assert reply["request_id"] == 0
    return RawReply(code=reply["code"], rest=rest)


# --- flow control and teardown


def test_between_two_tcp_transports_a_half_close_is_passed_on(endpoint: Peer) -> None:
    """Plain TCP on both sides can half-close; the relay keeps the other direction open."""

    async def scenario() -> None:
        async with world(endpoint) as w:
            loop = asyncio.get_running_loop()
            counters = TunnelCounters()
            closed: list[RelayClosed] = []

            def accept() -> asyncio.Protocol:
                relay = Relay(counters, on_close=closed.append)

                async def connect() -> None:
                    await loop.create_connection(lambda: relay.server_side, *w.target)
                    relay.start()

                tasks.append(loop.create_task(connect()))
                return relay.client_side

            tasks: list[asyncio.Task[None]] = []
            proxy = await loop.create_server(accept, "127.0.0.1", 0)
            reader, writer = await asyncio.open_connection(*proxy.sockets[0].getsockname()[:2])
            writer.write(b"last words")
            writer.write_eof()
            assert await read_closed(reader) == b"last words<eof>"
            writer.close()
            await eventually(lambda: closed != [], "the relay ends once both directions did")
            assert closed == [
                RelayClosed(upstream_bytes=10, downstream_bytes=15, stopped=False, error=None)
            ]
            proxy.close()

    run(scenario)


class ReadsAtOnce(asyncio.Protocol):
    """A relay side on a transport that reads although `connection_made` paused it: what
    Python before 3.11.4 (Debian 12's 3.11.2) does (CPython gh-103607)."""

    def __init__(self, side: asyncio.Protocol) -> None:
        self.side = side

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.side.connection_made(transport)
        transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        self.side.data_received(data)

    def eof_received(self) -> bool | None:
        return self.side.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.side.connection_lost(exc)


async def relay_proxy(
    w: World, relays: list[Relay], closed: list[RelayClosed]
) -> tuple[asyncio.Server, tuple[str, int]]:
    """A local port whose connections are relayed to the target, started only on demand."""

    def accept() -> asyncio.Protocol:
        relay = Relay(TunnelCounters(), on_close=closed.append)
        relays.append(relay)
        return ReadsAtOnce(relay.client_side)

    proxy = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
    return proxy, proxy.sockets[0].getsockname()[:2]


def test_bytes_read_before_the_relay_starts_go_out_first_when_it_starts(endpoint: Peer) -> None:
    """iperf3 sends its cookie the moment it connects, while the tunnel is still opening; on a
    Python that reads a paused transport anyway, the cookie must not be lost."""

    async def scenario() -> None:
        async with world(endpoint) as w:
            relays: list[Relay] = []
            proxy, address = await relay_proxy(w, relays, [])
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"cookie")
            await eventually(lambda: relays != [] and relays[0].client_side.held != b"", "read")
            (relay,) = relays
            assert relay.upstream_bytes == 0  # nowhere to put it yet: held, not dropped

            await asyncio.get_running_loop().create_connection(lambda: relay.server_side, *w.target)
            relay.start()
            writer.write(b" and the rest")
            async with asyncio.timeout(IO_TIMEOUT):
                echoed = await reader.readexactly(len(b"cookie and the rest"))
            assert echoed == b"cookie and the rest"
            assert relay.upstream_bytes == len(echoed)
            writer.close()
            proxy.close()

    run(scenario)


def test_a_peer_that_sends_too_much_before_the_relay_starts_is_cut_off(endpoint: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            relays: list[Relay] = []
            closed: list[RelayClosed] = []
            proxy, address = await relay_proxy(w, relays, closed)
            reader, writer = await asyncio.open_connection(*address)
            writer.write(b"x" * (MAX_HELD_BYTES + READ_CHUNK))
            await eventually(lambda: closed != [], "the relay stops instead of holding more")
            assert closed == [
                RelayClosed(upstream_bytes=0, downstream_bytes=0, stopped=True, error=None)
            ]
            assert await read_closed(reader) == b""
            assert w.target_stats.accepted == 0
            writer.close()
            proxy.close()

    run(scenario)


def test_a_slow_target_pushes_back_instead_of_filling_memory(
    endpoint: Peer, appliance: Peer
) -> None:
    chunk = b"z" * READ_CHUNK

    async def scenario() -> None:
        async with world(endpoint, sink=True) as w:
            session = w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            _, writer = await asyncio.open_connection(*local)
            sent = 0

            async def flood() -> None:
                nonlocal sent
                while True:
                    writer.write(chunk)
                    await writer.drain()
                    sent += len(chunk)

            flooding = asyncio.create_task(flood())
            await eventually(lambda: w.target_stats.accepted == 1, "the target is connected")
            stalled_at = await wait_until_stalled(lambda: session.counters.upstream_bytes)
            (relay,) = session.counters.live
            assert buffered(relay) <= WRITE_HIGH_WATER + READ_CHUNK
            (client_relay,) = client.counters.live
            assert buffered(client_relay) <= WRITE_HIGH_WATER + READ_CHUNK
            assert not flooding.done()

            flooding.cancel()
            w.target_stats.transports[0].resume_reading()
            await eventually(
                lambda: w.target_stats.received == session.counters.upstream_bytes > stalled_at,
                "everything relayed arrives once the target reads again",
            )
            writer.close()
            await client.close()

    run(scenario)


async def wait_until_stalled(read: Callable[[], int]) -> int:
    """Wait until a counter has stopped moving for a while; return where it stopped."""
    async with asyncio.timeout(IO_TIMEOUT):
        last = -1
        while (value := read()) != last or value == 0:
            last = value
            await asyncio.sleep(0.2)
    return last


def buffered(relay: Relay) -> int:
    total = 0
    for side in (relay.client_side, relay.server_side):
        assert side.transport is not None
        total = max(total, side.transport.get_write_buffer_size())
    return total


def test_stop_all_tears_down_the_sessions_live_relays(endpoint: Peer, appliance: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            streams = [await asyncio.open_connection(*local) for _ in range(2)]
            for reader, writer in streams:
                writer.write(b"ping")
                assert await reader.readexactly(4) == b"ping"

            session.counters.stop_all()

            for reader, writer in streams:
                assert await read_closed(reader) == b""
                writer.close()
            await eventually(lambda: len(session.closed) == 2, "both relays report")
            assert all(closed.stopped for closed in session.closed)
            assert session.counters.open_connections == 0
            await eventually(lambda: client.counters.open_connections == 0, "client relays end")
            assert all(t.is_closing() for t in w.target_stats.transports)
            await client.close()

    run(scenario)


def test_closing_the_client_closes_its_tunnels_and_port(endpoint: Peer, appliance: Peer) -> None:
    async def scenario() -> None:
        async with world(endpoint) as w:
            session = w.session(appliance)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local = await client.start()
            reader, writer = await asyncio.open_connection(*local)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            await client.close()
            assert await read_closed(reader) == b""
            writer.close()
            await eventually(lambda: session.counters.open_connections == 0, "server side ends")
            with pytest.raises(OSError):
                await asyncio.open_connection(*local)

    run(scenario)


# --- a real iperf3 through the tunnel


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def is_listening(port: int) -> bool:
    """Whether 127.0.0.1:port is listening, found without connecting (iperf3 -1 counts those)."""
    wanted = f"0100007F:{port:04X}"
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[1] == wanted and fields[3] == "0A":  # 0A: LISTEN
            return True
    return False


@pytest.fixture
def iperf3_server() -> Iterator[tuple[int, Callable[[], dict[str, Any]]]]:
    """A one-off `iperf3 -s` on loopback; yields its port and a function returning its JSON."""
    if shutil.which("iperf3") is None:
        pytest.skip("iperf3 is not installed")
    port = free_port()
    process = subprocess.Popen(
        ["iperf3", "-s", "-p", str(port), "--one-off", "-B", "127.0.0.1", "-J"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )

    def result() -> dict[str, Any]:
        out, _ = process.communicate(timeout=IO_TIMEOUT)
        parsed: dict[str, Any] = json.loads(out)
        return parsed

    try:
        yield port, result
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()


@pytest.mark.parametrize(
    "options", [[], ["-P", "2"], ["-R"]], ids=["1-stream", "2-streams", "reverse"]
)
def test_iperf3_runs_through_the_tunnel_and_the_relay_counts_its_bytes(
    endpoint: Peer,
    appliance: Peer,
    iperf3_server: tuple[int, Callable[[], dict[str, Any]]],
    options: list[str],
) -> None:
    port, server_result = iperf3_server
    streams = 2 if "-P" in options else 1

    async def scenario() -> None:
        async with world(endpoint) as w:
            await eventually(lambda: is_listening(port), "iperf3 listens")
            session = w.session(appliance, max_connections=connections_for_streams(streams))
            session.target = ("127.0.0.1", port)
            client = tunnel_client(appliance, w.endpoint_port, endpoint)
            local_host, local_port = await client.start()
            command = ["iperf3", "-c", local_host, "-p", str(local_port), "-t", "1", "-J"]
            process = await asyncio.create_subprocess_exec(
                *command,
                *options,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            async with asyncio.timeout(3 * IO_TIMEOUT):
                out, err = await process.communicate()
            assert process.returncode == 0, out.decode() + err.decode()
            report = json.loads(out)
            await eventually(lambda: session.counters.open_connections == 0, "all relays end")
            await client.close()

            assert session.counters.connections_opened == streams + 1  # + the control connection
            received = report["end"]["sum_received"]["bytes"]
            sent = report["end"]["sum_sent"]["bytes"]
            counters = session.counters
            bulk = counters.downstream_bytes if "-R" in options else counters.upstream_bytes
            assert received > 0
            assert 0.97 * received <= bulk <= 1.03 * sent + WRITE_HIGH_WATER
            assert client.failures == []
            # iperf3's receiver closes its data sockets with bytes still in flight, so a data
            # relay may end on a reset; each still ends on its own, none had to be stopped.
            assert len(session.closed) == streams + 1
            assert not any(c.stopped for c in session.closed)

        server_report = server_result()
        assert "error" not in server_report
        server_side = "sum_sent" if "-R" in options else "sum_received"
        assert server_report["end"][server_side]["bytes"] > 0

    run(scenario)
