"""The control plane end to end on loopback: real keys, real TLS 1.3, the real listener.

Reads as §5/§6 of the spec: paired peers are served, everyone else gets a reason code and is
closed, pairing tokens are one-time, malformed input gets typed errors without disturbing other
clients, and floods of idle connections do not lock out a paired appliance.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import pytest

from reflector.access import pairing
from reflector.client.link_client import ApplianceIdentity, LinkClient, RemoteError
from reflector.config import Config, parse_config_text
from reflector.errors import ReflectorError
from reflector.link import FrameDecoder, decode_json, encode_frame
from reflector.link.frames import NEED_DATA
from reflector.link.messages import GetPathMeta, Health, HealthStatus, Pair, PairOk, PathMeta
from reflector.server.run import Running, start
from reflector.tls import ALPN_HTTP, EndpointMismatch

CONFIG = """
[access]
pairing_enabled = true
[audit]
journald = "off"
[network]
handshake_timeout_sec = 3
"""


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 60))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def endpoint(tmp_path: Path, extra: str = "") -> AsyncIterator[Running]:
    config = parse_config_text(CONFIG + extra)
    config = _with_state(config, tmp_path / "endpoint")
    running = await start(config, addresses=["127.0.0.1:0"])
    try:
        yield running
    finally:
        await running.stop("test over")


def _with_state(config: Config, state: Path) -> Config:
    import dataclasses

    return dataclasses.replace(
        config, service=dataclasses.replace(config.service, state_dir=str(state))
    )


def appliance(tmp_path: Path, name: str) -> ApplianceIdentity:
    return ApplianceIdentity.open(tmp_path / name)


def authorize(running: Running, app: ApplianceIdentity) -> None:
    running.service.peers.add(app.identity.endpoint_id, via="cli")


async def connect(running: Running, app: ApplianceIdentity) -> LinkClient:
    port = running.addresses[0][1]
    return await LinkClient.connect(("127.0.0.1", port), app, running.identity.endpoint_id)


def audit_records(running: Running) -> list[dict[str, Any]]:
    path = running.config.state_dir / "audit.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()]


def denies(running: Running, reason: str) -> list[dict[str, Any]]:
    return [r for r in audit_records(running) if r.get("reason") == reason]


# --- authorization


def test_a_paired_peer_is_served_and_audited(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            client = await connect(ep, app)
            assert client.server_hello is not None
            assert client.server_hello.endpoint_id == ep.identity.endpoint_id
            assert "throughput" in client.server_hello.features
            health = await client.call(Health(), HealthStatus)
            assert health.status == "ok"
            await client.close()
            accepts = [r for r in audit_records(ep) if r["reflector_event"] == "connection_accept"]
            assert accepts[-1]["peer_id"] == app.identity.endpoint_id

    run(body())


def test_stopping_closes_every_live_link_before_the_service_closes(tmp_path: Path) -> None:
    # A link hears of its abort a few loop turns after its transport; its close ends the peer's
    # sessions, so stop() waits for it rather than closing the ledger and audit log under it.
    async def body() -> None:
        config = _with_state(parse_config_text(CONFIG), tmp_path / "endpoint")
        ep = await start(config, addresses=["127.0.0.1:0"])
        links_at_close: list[int] = []
        close = ep.service.close

        async def recording_close() -> None:
            links_at_close.append(len(ep.service.links))
            await close()

        ep.service.close = recording_close  # type: ignore[method-assign]
        clients = []
        try:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            clients = [await connect(ep, app) for _ in range(3)]
            assert len(ep.service.links) == 3
        finally:
            await ep.stop("test over")
            for client in clients:
                await client.close()
        assert links_at_close == [0]
        assert audit_records(ep)[-1]["reflector_event"] == "service_stop"

    run(body())


def test_an_unknown_key_gets_unknown_peer_and_is_closed(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            stranger = appliance(tmp_path, "stranger")
            with pytest.raises(RemoteError) as err:
                await connect(ep, stranger)
            assert err.value.code == "unknown_peer"
            assert denies(ep, "unknown_peer")[-1]["peer_id"] == stranger.identity.endpoint_id

    run(body())


def test_the_client_refuses_an_endpoint_with_another_id(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            other = appliance(tmp_path, "other").identity.endpoint_id
            port = ep.addresses[0][1]
            with pytest.raises(EndpointMismatch):
                await LinkClient.connect(("127.0.0.1", port), app, other)

    run(body())


def test_trust_on_first_use_only_when_asked_and_then_pinned(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            target = ("127.0.0.1", ep.addresses[0][1])
            with pytest.raises(ReflectorError, match="--expect-id"):
                await LinkClient.connect(target, app, None)
            client = await LinkClient.connect(target, app, None, tofu=True)
            await client.close()
            recorded = json.loads((app.state_dir / "known_endpoints.json").read_text())
            assert recorded == {f"127.0.0.1:{target[1]}": ep.identity.endpoint_id}
            again = await LinkClient.connect(target, app, None)  # pinned now, no flag needed
            await again.close()

    run(body())


# --- pairing


async def pair_with(ep: Running, app: ApplianceIdentity, token: str) -> str:
    port = ep.addresses[0][1]
    client = await LinkClient.connect(("127.0.0.1", port), app, ep.identity.endpoint_id)
    try:
        return (await client.call(Pair(token=token), PairOk)).peer_id
    finally:
        await client.close()


def test_pairing_admits_one_appliance_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            token, _ = pairing.open_window(ep.config.state_dir, 60, time.time())
            first = appliance(tmp_path, "first")
            assert await pair_with(ep, first, token) == first.identity.endpoint_id
            assert ep.service.peers.is_authorized(first.identity.endpoint_id)
            client = await connect(ep, first)  # now a full peer
            assert (await client.call(Health(), HealthStatus)).status == "ok"
            await client.close()
            # The same token again, by another appliance: the window is gone.
            second = appliance(tmp_path, "second")
            with pytest.raises(RemoteError) as err:
                await pair_with(ep, second, token)
            assert err.value.code == "unknown_peer"
            events = [r["reflector_event"] for r in audit_records(ep)]
            assert "pairing_enroll" in events and "peer_added" in events

    run(body())


@pytest.mark.parametrize("case", ["wrong", "expired", "disabled"])
def test_bad_pairing_attempts_are_refused_with_their_reason(tmp_path: Path, case: str) -> None:
    async def body() -> None:
        config_text = CONFIG
        if case == "disabled":
            config_text = CONFIG.replace("pairing_enabled = true", "pairing_enabled = false")
        async with endpoint_from(tmp_path, config_text) as ep:
            now = time.time()
            ttl_start = now - 3600 if case == "expired" else now
            token, _ = pairing.open_window(ep.config.state_dir, 60, ttl_start)
            app = appliance(tmp_path, "app")
            guess = "x" * 32 if case == "wrong" else token
            with pytest.raises(RemoteError) as err:
                await pair_with(ep, app, guess)
            expected = {"wrong": "bad_token", "expired": "unknown_peer", "disabled": "unknown_peer"}
            assert err.value.code == expected[case]
            assert not ep.service.peers.is_authorized(app.identity.endpoint_id)

    run(body())


@contextlib.asynccontextmanager
async def endpoint_from(tmp_path: Path, text: str) -> AsyncIterator[Running]:
    config = _with_state(parse_config_text(text), tmp_path / "endpoint")
    running = await start(config, addresses=["127.0.0.1:0"])
    try:
        yield running
    finally:
        await running.stop("test over")


def test_an_expired_window_pipelined_pair_gets_pairing_closed(tmp_path: Path) -> None:
    """A client that sends hello and pair together learns the precise reason."""

    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            token, _ = pairing.open_window(ep.config.state_dir, 60, time.time())
            app = appliance(tmp_path, "app")
            # Open window → restricted hello; then expire it before the pair arrives.
            reader, writer = await raw_tls(ep, app)
            writer.write(
                encode_frame({"type": "hello", "request_id": 1, "version": 1, "features": []})
            )
            hello = await read_frame(reader)
            assert hello["type"] == "server_hello" and hello["features"] == ["pairing"]
            pairing.close_window(ep.config.state_dir)
            writer.write(encode_frame({"type": "pair", "request_id": 2, "token": token}))
            answer = await read_frame(reader)
            assert (answer["type"], answer["code"]) == ("error", "pairing_closed")
            assert await reader.read() == b""  # closed
            writer.close()

    run(body())


def test_pairing_failures_are_rate_limited_per_source(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            pairing.open_window(ep.config.state_dir, 600, time.time())
            codes = []
            for i in range(7):
                app = appliance(tmp_path, f"guesser{i}")
                try:
                    await pair_with(ep, app, f"guess-{i}")
                except RemoteError as exc:
                    codes.append(exc.code)
            assert codes[:5] == ["bad_token"] * 5
            assert codes[5:] == ["rate_limited"] * 2

    run(body())


# --- revocation


def test_removing_a_peer_closes_its_live_connection(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            client = await connect(ep, app)
            from reflector.access.peers import PeerStore

            PeerStore(ep.config.state_dir).remove(app.identity.endpoint_id, via="cli")
            ep.service.enforce_revocations()  # the server's 2 s poll does the same
            with pytest.raises(RemoteError) as err:
                await client.call(Health(), HealthStatus)
            assert err.value.code == "unknown_peer"
            await client.close()
            assert denies(ep, "peer_revoked")

    run(body())


# --- malformed input


async def raw_tls(
    ep: Running, app: ApplianceIdentity, source: str | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    port = ep.addresses[0][1]
    return await asyncio.open_connection(
        "127.0.0.1",
        port,
        ssl=app.context(),
        server_hostname="",
        local_addr=(source, 0) if source else None,
    )


async def read_frame(reader: asyncio.StreamReader) -> dict[str, Any]:
    decoder = FrameDecoder()
    while True:
        frame = decoder.next_frame()
        if frame is not NEED_DATA:
            doc = decode_json(frame)  # type: ignore[arg-type]
            assert isinstance(doc, dict)
            return doc
        data = await asyncio.wait_for(reader.read(65536), 15)
        assert data, "connection closed before a frame arrived"
        decoder.receive_data(data)


HELLO = encode_frame({"type": "hello", "request_id": 1, "version": 1, "features": []})


@pytest.mark.parametrize(
    ("payload", "code", "closes"),
    [
        (struct.pack(">I", 10 * 1024 * 1024), "frame_too_large", True),
        (struct.pack(">I", 0), "bad_frame", True),
        (struct.pack(">I", 5) + b"{nope", "bad_json", False),
        (
            encode_frame(
                {
                    "type": "session_request",
                    "request_id": 2,
                    "test_type": "throughput",
                    "params": {
                        "duration_sec": "ten",
                        "protocol": "tcp",
                        "streams": 1,
                        "reverse": False,
                    },
                }
            ),
            "bad_field",
            False,
        ),
        (encode_frame({"type": "launch_missiles", "request_id": 3}), "unknown_type", False),
    ],
)
def test_malformed_frames_get_typed_errors_and_others_keep_being_served(
    tmp_path: Path, payload: bytes, code: str, closes: bool
) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            bad, good = appliance(tmp_path, "bad"), appliance(tmp_path, "good")
            authorize(ep, bad)
            authorize(ep, good)
            reader, writer = await raw_tls(ep, bad)
            writer.write(HELLO)
            assert (await read_frame(reader))["type"] == "server_hello"
            writer.write(payload)
            error = await read_frame(reader)
            assert (error["type"], error["code"]) == ("error", code)
            (audited,) = denies(ep, code)  # every refusal is on the audit trail
            assert audited["reflector_event"] == "request_deny"
            assert audited["peer_id"] == bad.identity.endpoint_id
            if closes:
                assert await asyncio.wait_for(reader.read(), 5) == b""
            else:  # the same connection still works
                writer.write(encode_frame({"type": "health", "request_id": 9}))
                assert (await read_frame(reader))["type"] == "health_status"
            writer.close()
            client = await connect(ep, good)
            assert (await client.call(Health(), HealthStatus)).status == "ok"
            await client.close()

    run(body())


def test_a_truncated_frame_then_silence_is_closed_by_the_idle_timeout(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path, "idle_timeout_sec = 5\n") as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            reader, writer = await raw_tls(ep, app)
            writer.write(HELLO)
            await read_frame(reader)
            writer.write(struct.pack(">I", 100) + b'{"type":')  # and then nothing
            error = await asyncio.wait_for(read_frame(reader), 12)
            assert error["code"] == "idle_timeout"
            assert await asyncio.wait_for(reader.read(), 5) == b""

    run(body())


def test_a_partial_frame_trickled_byte_by_byte_does_not_keep_a_connection_alive(
    tmp_path: Path,
) -> None:
    """Only whole frames count as activity (slowloris): the idle timeout still applies."""

    async def body() -> None:
        async with endpoint(tmp_path, "idle_timeout_sec = 5\n") as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            reader, writer = await raw_tls(ep, app)
            writer.write(HELLO)
            await read_frame(reader)
            writer.write(struct.pack(">I", 1000))
            closed = asyncio.ensure_future(read_frame(reader))
            for _ in range(12):  # one byte a second, never a whole frame
                if closed.done():
                    break
                writer.write(b" ")
                await asyncio.sleep(1)
            error = await asyncio.wait_for(closed, 5)
            assert error["code"] == "idle_timeout"

    run(body())


def test_an_unknown_key_that_sends_garbage_is_answered_once_and_closed(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            stranger = appliance(tmp_path, "stranger")
            reader, writer = await raw_tls(ep, stranger)
            writer.write(encode_frame({"type": "launch_missiles", "request_id": 1}) * 3)
            error = await read_frame(reader)
            assert error["code"] == "unknown_type"
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed after one answer
            (audited,) = denies(ep, "unknown_type")
            assert audited["reflector_event"] == "request_deny"
            assert audited["peer_id"] == stranger.identity.endpoint_id

    run(body())


def test_an_unknown_key_that_does_not_pair_in_time_is_closed_and_audited(
    tmp_path: Path,
) -> None:
    """Throwaway keys cannot hold connection slots: the handshake timeout (3 s here) applies."""

    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            stranger = appliance(tmp_path, "stranger")
            reader, _ = await raw_tls(ep, stranger)  # TLS done, then silence
            started = time.monotonic()
            error = await asyncio.wait_for(read_frame(reader), 10)
            assert error["code"] == "unknown_peer"
            assert 2.5 < time.monotonic() - started < 6
            assert await asyncio.wait_for(reader.read(), 5) == b""
            (audited,) = denies(ep, "unknown_peer_timeout")
            assert audited["reflector_event"] == "connection_deny"
            assert ep.listener.open_connections == 0

    run(body())


# --- GET /health over the mTLS port (ALPN http/1.1, spec §7.4)


async def https_get(ep: Running, app: ApplianceIdentity, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", ep.addresses[0][1], ssl=app.context(ALPN_HTTP), server_hostname=""
    )
    writer.write(request)
    reply = await asyncio.wait_for(reader.read(), 10)  # the endpoint closes after one reply
    writer.close()
    return reply


GET_HEALTH = b"GET /health HTTP/1.1\r\nHost: endpoint\r\n\r\n"


def test_an_allowlisted_key_gets_health_over_https_on_the_control_port(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            reply = await https_get(ep, app, GET_HEALTH)
            head, _, payload = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200 OK")
            doc = json.loads(payload)
            assert set(doc) == {"status", "version", "load"} and doc["status"] == "ok"
            other = await https_get(ep, app, b"GET /peers HTTP/1.1\r\nHost: e\r\n\r\n")
            assert other.startswith(b"HTTP/1.1 404")
            accepts = [r for r in audit_records(ep) if r["reflector_event"] == "connection_accept"]
            assert accepts[-1]["mode"] == "http"

    run(body())


def test_curl_with_the_appliances_key_gets_health(tmp_path: Path) -> None:
    """Interop with a stock HTTPS client: curl offers h2 and http/1.1 and gets http/1.1.

    (-k: the endpoint's certificate is self-signed; appliances pin it by its key instead.)
    """

    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            url = f"https://127.0.0.1:{ep.addresses[0][1]}/health"
            argv = ["curl", "-sS", "-k", "--max-time", "10", "--cert", str(app.cert_path)]
            argv += ["--key", str(app.identity.key_path), "-w", "\n%{http_version}", url]
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
            )
            out, err = await asyncio.wait_for(proc.communicate(), 20)
            assert proc.returncode == 0, err
            payload, version = out.decode().rsplit("\n", 1)
            assert version == "1.1"
            assert json.loads(payload)["status"] == "ok"

    run(body())


def test_an_unknown_key_gets_403_over_https_and_is_audited(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            stranger = appliance(tmp_path, "stranger")
            reply = await https_get(ep, stranger, GET_HEALTH)
            assert reply.startswith(b"HTTP/1.1 403 Forbidden")
            assert b"version" not in reply
            (denied,) = denies(ep, "unknown_peer")
            assert denied["peer_id"] == stranger.identity.endpoint_id

    run(body())


# --- TLS refusals against the server


def _blocking_handshake(port: int, context: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw) as tls:
            tls.sendall(HELLO)
            return tls.recv(100)


def test_a_client_without_certificate_or_with_tls12_is_refused(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            port = ep.addresses[0][1]
            no_cert = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            no_cert.check_hostname = False
            no_cert.verify_mode = ssl.CERT_NONE
            tls12 = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            tls12.check_hostname = False
            tls12.verify_mode = ssl.CERT_NONE
            tls12.maximum_version = ssl.TLSVersion.TLSv1_2
            loop = asyncio.get_running_loop()
            with pytest.raises(ssl.SSLError, match="CERTIFICATE_REQUIRED"):
                await loop.run_in_executor(None, _blocking_handshake, port, no_cert)
            with pytest.raises(ssl.SSLError, match=r"VERSION|PROTOCOL"):
                await loop.run_in_executor(None, _blocking_handshake, port, tls12)
            await asyncio.sleep(0.1)
            reasons = {r.get("reason") for r in audit_records(ep)}
            assert "bad_certificate" in reasons and "bad_tls_version" in reasons

    run(body())


def test_openssl_s_client_completes_the_handshake(tmp_path: Path) -> None:
    """A client that is not ours: openssl with its own Ed25519 key and certificate."""
    key, cert = tmp_path / "o.key", tmp_path / "o.crt"
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", key], check=True)
    subprocess.run(
        ["openssl", "req", "-x509", "-key", key, "-out", cert, "-days", "1", "-subj", "/CN=o"],
        check=True,
        capture_output=True,
    )

    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            port = ep.addresses[0][1]
            proc = await asyncio.create_subprocess_exec(
                "openssl",
                "s_client",
                "-tls1_3",
                "-alpn",
                "pp-link/1",
                "-cert",
                str(cert),
                "-key",
                str(key),
                "-connect",
                f"127.0.0.1:{port}",
                "-ign_eof",
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
            )
            out, _ = await asyncio.wait_for(proc.communicate(HELLO), 15)
            text = out.decode(errors="replace")
            assert "Protocol  : TLSv1.3" in text or "TLSv1.3" in text
            assert "ALPN protocol: pp-link/1" in text
            # openssl's key is unknown here, so the answer to its hello is unknown_peer.
            assert "unknown_peer" in text

    run(body())


# --- floods


def test_200_idle_unauthenticated_connections_do_not_lock_out_a_paired_peer(
    tmp_path: Path,
) -> None:
    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            port = ep.addresses[0][1]
            idle: list[socket.socket] = []
            try:
                for i in range(200):  # 20 sources x 10 silent TCP connections
                    sock = socket.socket()
                    sock.bind((f"127.0.0.{10 + i % 20}", 0))
                    sock.setblocking(False)
                    with contextlib.suppress(BlockingIOError):
                        sock.connect(("127.0.0.1", port))
                    idle.append(sock)
                for _ in range(50):
                    if ep.listener.open_connections >= 200:
                        break
                    await asyncio.sleep(0.1)
                assert ep.listener.open_connections == 200
                start_t = time.monotonic()
                client = await connect(ep, app)
                assert (await client.call(Health(), HealthStatus)).status == "ok"
                # Served at once, not after the idle ones' handshake timeout (default 10 s).
                assert time.monotonic() - start_t < 5.0
                await client.close()
            finally:
                for sock in idle:
                    sock.close()

    run(body())


TOO_MANY = "too_many_connections_from_source"


def test_a_flooding_source_is_capped_and_audited_once(tmp_path: Path) -> None:
    async def body() -> None:
        async with endpoint(tmp_path, "max_connections_per_source = 4\n") as ep:
            port = ep.addresses[0][1]
            socks = []
            for _ in range(12):
                sock = socket.socket()
                sock.bind(("127.0.0.77", 0))
                sock.connect(("127.0.0.1", port))
                socks.append(sock)
            # The listener accepts and aborts the 8 beyond the cap a few loop turns later.
            deadline = time.monotonic() + 5
            while ep.listener.open_connections != 4 or not denies(ep, TOO_MANY):
                assert time.monotonic() < deadline, ep.listener.open_connections
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.2)  # any further record would come now
            assert ep.listener.open_connections == 4
            capped = denies(ep, TOO_MANY)
            assert len(capped) == 1  # a flood is folded into one audit record
            for sock in socks:
                sock.close()

    run(body())


def test_a_peer_flooding_bad_requests_is_answered_and_audited_once_per_interval(
    tmp_path: Path,
) -> None:
    """Each bad request gets its typed error; the audit trail gets one record for the burst."""
    burst = 50

    async def body() -> None:
        async with endpoint(tmp_path) as ep:
            bad = appliance(tmp_path, "bad")
            authorize(ep, bad)
            reader, writer = await raw_tls(ep, bad)
            writer.write(HELLO)
            assert (await read_frame(reader))["type"] == "server_hello"
            garbage = encode_frame({"type": "launch_missiles", "request_id": 3})
            writer.write(garbage * burst + encode_frame({"type": "health", "request_id": 9}))
            decoder = FrameDecoder(65536)
            replies: list[object] = []
            while len(replies) < burst + 1:
                decoder.receive_data(await asyncio.wait_for(reader.read(65536), 5))
                replies += [decode_json(f) for f in iter(decoder.next_frame, NEED_DATA)]
            assert all(isinstance(r, dict) and r["code"] == "unknown_type" for r in replies[:-1])
            last = replies[-1]
            assert isinstance(last, dict) and last["type"] == "health_status"  # still served
            writer.close()
            (audited,) = denies(ep, "unknown_type")
            assert audited["reflector_event"] == "request_deny"

    run(body())


# --- health and path meta


def test_path_meta_and_the_plain_http_health_listener(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        http_port = probe.getsockname()[1]

    async def body() -> None:
        extra = f'health_http_address = "127.0.0.1:{http_port}"\n'
        async with endpoint(tmp_path, extra) as ep:
            app = appliance(tmp_path, "app")
            authorize(ep, app)
            client = await connect(ep, app)
            meta = (await client.call(GetPathMeta(), PathMeta)).meta
            await client.close()
            assert meta["iface"]["name"] == "lo"
            assert meta["build"]["version"].startswith("0.")
            assert set(meta) >= {"cpu", "load", "mem", "net", "time_sync"}
            reader, writer = await asyncio.open_connection("127.0.0.1", http_port)
            writer.write(b"GET /health HTTP/1.0\r\n\r\n")
            reply = await asyncio.wait_for(reader.read(), 5)
            writer.close()
            head, _, body_bytes = reply.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200")
            assert set(json.loads(body_bytes)) == {"status", "version", "load"}

    run(body())
