"""Mutual TLS 1.3: any Ed25519 key may complete the handshake, and the key alone names the peer.

Every test runs real handshakes on loopback: Python's ssl against itself, against asyncio's
memory-BIO transport, and against the openssl command-line tools.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import subprocess
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from reflector.certificate import (
    BadCertificate,
    ensure_certificate_file,
    peer_id_from_certificate_der,
)
from reflector.identity import Identity, load_or_create_identity
from reflector.tls import (
    ALPN_LINK,
    ALPN_TUNNEL,
    EndpointMismatch,
    TlsSetupError,
    _check_ssl_ctx_address,
    _libssl,
    _ssl_ctx_address,
    check_expected_peer,
    client_context,
    peer_id_of,
    server_context,
    server_protocol_factory,
)

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
# Generous for loopback, short enough that a hung handshake fails the test instead of the suite.
IO_TIMEOUT = 5.0
GREETING = b"hello"


@dataclass(frozen=True)
class Peer:
    identity: Identity
    cert: Path
    key: Path


@dataclass(frozen=True, kw_only=True)
class Served:
    """What the server side of one connection saw."""

    peer_id: str | None = None
    alpn: str | None = None
    error: Exception | None = None


def make_peer(directory: Path, now: datetime = NOW) -> Peer:
    identity, created = load_or_create_identity(directory / "identity.ed25519")
    assert created
    return Peer(
        identity=identity, cert=ensure_certificate_file(identity, now), key=identity.key_path
    )


@pytest.fixture(scope="module")
def endpoint(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer(tmp_path_factory.mktemp("endpoint"))


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Peer:
    return make_peer(tmp_path_factory.mktemp("appliance"))


@pytest.fixture(scope="module")
def rsa_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed RSA certificate: valid TLS, but not a Reflector identity."""
    directory = tmp_path_factory.mktemp("rsa")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rsa-peer")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(NOW + timedelta(days=3650))
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "rsa.crt", directory / "rsa.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


Serve = Callable[[ssl.SSLContext], tuple[int, "Future[Served]"]]


@pytest.fixture
def serve() -> Iterator[Serve]:
    """Start a one-connection TLS server in a thread; returns its port and its outcome."""
    listeners: list[socket.socket] = []
    with ThreadPoolExecutor(max_workers=2) as pool:

        def start(context: ssl.SSLContext) -> tuple[int, Future[Served]]:
            listener = socket.create_server(("127.0.0.1", 0))
            listener.settimeout(IO_TIMEOUT)
            listeners.append(listener)
            return listener.getsockname()[1], pool.submit(serve_one, listener, context)

        yield start
        for listener in listeners:
            listener.close()


def serve_one(listener: socket.socket, context: ssl.SSLContext) -> Served:
    connection, _ = listener.accept()
    connection.settimeout(IO_TIMEOUT)
    try:
        with context.wrap_socket(connection, server_side=True) as tls:
            served = Served(peer_id=peer_id_of(tls), alpn=tls.selected_alpn_protocol())
            # A client that has already gone is not this side's failure.
            with contextlib.suppress(OSError):
                tls.sendall(GREETING)
            return served
    except (OSError, BadCertificate) as exc:  # ssl.SSLError is an OSError
        return Served(error=exc)
    finally:
        connection.close()


def connect(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT)
    return context.wrap_socket(raw)


def plain_client_without_certificate() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def test_mutual_handshake_each_side_computes_the_others_id(
    serve: Serve, endpoint: Peer, appliance: Peer
) -> None:
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    with connect(port, client_context(appliance.cert, appliance.key)) as tls:
        assert tls.version() == "TLSv1.3"
        assert peer_id_of(tls) == endpoint.identity.endpoint_id
        assert tls.recv(len(GREETING)) == GREETING
        assert tls.session is not None
        assert not tls.session.has_ticket  # nothing to resume: every connection proves its key
    served = outcome.result(IO_TIMEOUT)
    assert served.error is None
    assert served.peer_id == appliance.identity.endpoint_id


@pytest.mark.parametrize("alpn", [ALPN_LINK, ALPN_TUNNEL])
def test_server_negotiates_the_protocol_the_client_asks_for(
    serve: Serve, endpoint: Peer, appliance: Peer, alpn: str
) -> None:
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    with connect(port, client_context(appliance.cert, appliance.key, alpn=alpn)) as tls:
        assert tls.selected_alpn_protocol() == alpn
    assert outcome.result(IO_TIMEOUT).alpn == alpn


def test_a_certificate_past_its_dates_still_works_because_trust_is_in_the_key(
    serve: Serve, endpoint: Peer, tmp_path: Path
) -> None:
    expired = make_peer(tmp_path, now=datetime(2000, 1, 1, tzinfo=UTC))
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    with connect(port, client_context(expired.cert, expired.key)) as tls:
        assert tls.recv(len(GREETING)) == GREETING
    assert outcome.result(IO_TIMEOUT).peer_id == expired.identity.endpoint_id


def test_a_client_without_a_certificate_gets_alert_certificate_required(
    serve: Serve, endpoint: Peer
) -> None:
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    # In TLS 1.3 the client finishes its side first; the refusal arrives as an alert on read.
    with (
        connect(port, plain_client_without_certificate()) as tls,
        pytest.raises(ssl.SSLError) as refused,
    ):
        tls.recv(1)
    assert refused.value.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    served = outcome.result(IO_TIMEOUT)
    assert isinstance(served.error, ssl.SSLError)
    assert served.error.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE"


def test_a_tls12_only_client_is_refused(serve: Serve, endpoint: Peer, appliance: Peer) -> None:
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    old.check_hostname = False
    old.verify_mode = ssl.CERT_NONE
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    old.load_cert_chain(appliance.cert, appliance.key)
    with pytest.raises(ssl.SSLError) as refused:
        connect(port, old)
    assert refused.value.reason == "TLSV1_ALERT_PROTOCOL_VERSION"
    served = outcome.result(IO_TIMEOUT)
    assert isinstance(served.error, ssl.SSLError)
    assert served.error.reason == "UNSUPPORTED_PROTOCOL"


def test_a_client_with_an_rsa_certificate_is_refused_with_alert_bad_certificate(
    serve: Serve, endpoint: Peer, rsa_files: tuple[Path, Path]
) -> None:
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    with connect(port, client_context(*rsa_files)) as tls, pytest.raises(ssl.SSLError) as refused:
        tls.recv(1)
    assert refused.value.reason == "SSLV3_ALERT_BAD_CERTIFICATE"
    served = outcome.result(IO_TIMEOUT)
    assert isinstance(served.error, ssl.SSLError)
    assert served.error.reason == "CERTIFICATE_VERIFY_FAILED"
    assert "certificate rejected" in str(served.error)


def test_a_client_refuses_a_server_with_an_rsa_certificate(
    serve: Serve, appliance: Peer, rsa_files: tuple[Path, Path]
) -> None:
    port, outcome = serve(server_context(*rsa_files))
    with pytest.raises(ssl.SSLCertVerificationError) as refused:
        connect(port, client_context(appliance.cert, appliance.key))
    assert refused.value.verify_message == "certificate rejected"
    assert isinstance(outcome.result(IO_TIMEOUT).error, ssl.SSLError)


def test_peer_id_of_rejects_a_peer_whose_key_is_not_ed25519(
    serve: Serve, rsa_files: tuple[Path, Path]
) -> None:
    # Only a context without our handshake check lets such a peer through to the application.
    rsa_server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    rsa_server.load_cert_chain(*rsa_files)
    port, _ = serve(rsa_server)
    with (
        connect(port, plain_client_without_certificate()) as tls,
        pytest.raises(BadCertificate, match="RSA, not Ed25519"),
    ):
        peer_id_of(tls)


def test_peer_id_of_rejects_a_peer_without_a_certificate(serve: Serve, endpoint: Peer) -> None:
    not_asking = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    not_asking.load_cert_chain(endpoint.cert, endpoint.key)
    port, outcome = serve(not_asking)
    with connect(port, plain_client_without_certificate()) as tls:
        assert tls.recv(len(GREETING)) == b""  # the server hangs up after failing to identify us
    served = outcome.result(IO_TIMEOUT)
    assert isinstance(served.error, BadCertificate)
    assert "no certificate" in str(served.error)


def test_a_client_pins_the_endpoint_id_in_any_spelling(
    serve: Serve, endpoint: Peer, appliance: Peer
) -> None:
    port, _ = serve(server_context(endpoint.cert, endpoint.key))
    typed = endpoint.identity.endpoint_id.replace("-", " ").lower()
    with connect(port, client_context(appliance.cert, appliance.key)) as tls:
        assert check_expected_peer(tls, typed) == endpoint.identity.endpoint_id


def test_a_pinned_client_refuses_an_endpoint_with_another_key(
    serve: Serve, endpoint: Peer, appliance: Peer
) -> None:
    port, _ = serve(server_context(endpoint.cert, endpoint.key))
    with connect(port, client_context(appliance.cert, appliance.key)) as tls:
        wrong = appliance.identity.endpoint_id
        with pytest.raises(EndpointMismatch, match=f"is {endpoint.identity.endpoint_id}, expected"):
            check_expected_peer(tls, wrong)
        with pytest.raises(EndpointMismatch, match="expected endpoint ID is not valid"):
            check_expected_peer(tls, "PP00-not-an-id")


def test_asyncio_streams_get_both_identities_and_the_protocol(
    endpoint: Peer, appliance: Peer
) -> None:
    async def scenario() -> tuple[str, str, str]:
        seen: asyncio.Future[str] = asyncio.get_running_loop().create_future()

        async def on_client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            seen.set_result(peer_id_of(writer.get_extra_info("ssl_object")))
            writer.close()

        server = await asyncio.start_server(
            on_client, "127.0.0.1", 0, ssl=server_context(endpoint.cert, endpoint.key)
        )
        async with server:
            port = server.sockets[0].getsockname()[1]
            context = client_context(appliance.cert, appliance.key, alpn=ALPN_TUNNEL)
            _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
            tls = writer.get_extra_info("ssl_object")
            client_saw = check_expected_peer(tls, endpoint.identity.endpoint_id)
            alpn = tls.selected_alpn_protocol()
            server_saw = await asyncio.wait_for(seen, IO_TIMEOUT)
            writer.close()
            return client_saw, server_saw, alpn

    client_saw, server_saw, alpn = asyncio.run(scenario())
    assert client_saw == endpoint.identity.endpoint_id
    assert server_saw == appliance.identity.endpoint_id
    assert alpn == ALPN_TUNNEL


class Greeter(asyncio.Protocol):
    """An application protocol that records who connected and greets them."""

    def __init__(self, seen: asyncio.Future[str]) -> None:
        self.seen = seen

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.seen.set_result(peer_id_of(transport.get_extra_info("ssl_object")))
        transport.write(GREETING)


def run_asyncio_server(
    client: Callable[[int], bytes | Exception], *, alerting: bool, context: ssl.SSLContext
) -> tuple[bytes | Exception, str | None]:
    """Serve one connection on asyncio; return what the blocking `client` read and who it was."""

    async def scenario() -> tuple[bytes | Exception, str | None]:
        loop = asyncio.get_running_loop()
        seen: asyncio.Future[str] = loop.create_future()
        if alerting:
            factory = server_protocol_factory(context, lambda: Greeter(seen))
            server = await loop.create_server(factory, "127.0.0.1", 0)
        else:
            server = await loop.create_server(lambda: Greeter(seen), "127.0.0.1", 0, ssl=context)
        async with server:
            port = server.sockets[0].getsockname()[1]
            read = await asyncio.to_thread(client, port)
            return read, seen.result() if seen.done() else None

    return asyncio.run(scenario())


def read_after_handshake(context: ssl.SSLContext) -> Callable[[int], bytes | Exception]:
    def client(port: int) -> bytes | Exception:
        with connect(port, context) as tls:
            try:
                return tls.recv(len(GREETING))
            except ssl.SSLError as exc:
                return exc

    return client


def test_the_asyncio_factory_serves_authenticated_peers(endpoint: Peer, appliance: Peer) -> None:
    read, seen = run_asyncio_server(
        read_after_handshake(client_context(appliance.cert, appliance.key)),
        alerting=True,
        context=server_context(endpoint.cert, endpoint.key),
    )
    assert read == GREETING
    assert seen == appliance.identity.endpoint_id


def test_the_asyncio_factory_tells_a_client_without_certificate_why(endpoint: Peer) -> None:
    read, seen = run_asyncio_server(
        read_after_handshake(plain_client_without_certificate()),
        alerting=True,
        context=server_context(endpoint.cert, endpoint.key),
    )
    assert isinstance(read, ssl.SSLError)
    assert read.reason == "TLSV13_ALERT_CERTIFICATE_REQUIRED"
    assert seen is None


def test_the_asyncio_factory_tells_an_rsa_client_why(
    endpoint: Peer, rsa_files: tuple[Path, Path]
) -> None:
    read, _ = run_asyncio_server(
        read_after_handshake(client_context(*rsa_files)),
        alerting=True,
        context=server_context(endpoint.cert, endpoint.key),
    )
    assert isinstance(read, ssl.SSLError)
    assert read.reason == "SSLV3_ALERT_BAD_CERTIFICATE"


def test_stock_asyncio_tls_hangs_up_without_the_alert_hence_the_factory(endpoint: Peer) -> None:
    read, _ = run_asyncio_server(
        read_after_handshake(plain_client_without_certificate()),
        alerting=False,
        context=server_context(endpoint.cert, endpoint.key),
    )
    assert read == b""


def test_contexts_are_tls13_only_without_tickets_or_compression(
    endpoint: Peer, appliance: Peer
) -> None:
    server = server_context(endpoint.cert, endpoint.key)
    client = client_context(appliance.cert, appliance.key)
    for context in (server, client):
        assert context.minimum_version == context.maximum_version == ssl.TLSVersion.TLSv1_3
        assert context.verify_mode == ssl.CERT_REQUIRED
        assert ssl.OP_NO_TICKET in context.options
        assert ssl.OP_NO_COMPRESSION in context.options
        assert not context.check_hostname
    assert server.num_tickets == 0


def test_a_missing_key_file_is_a_clear_setup_error(endpoint: Peer, tmp_path: Path) -> None:
    missing = tmp_path / "nope.key"
    with pytest.raises(TlsSetupError, match=f"with key {missing}"):
        server_context(endpoint.cert, missing)


def test_the_ctypes_pointer_is_the_contexts_own_ssl_ctx(endpoint: Peer) -> None:
    context = server_context(endpoint.cert, endpoint.key)
    lib = _libssl()
    address = _ssl_ctx_address(context)
    assert lib.SSL_CTX_get_verify_mode(address) == 3  # SSL_VERIFY_PEER | FAIL_IF_NO_PEER_CERT
    assert lib.SSL_CTX_get_options(address) == context.options
    _check_ssl_ctx_address(lib, context, address)  # passes: nothing raised


def test_the_sanity_check_refuses_a_pointer_to_another_context(
    endpoint: Peer, appliance: Peer
) -> None:
    context = server_context(endpoint.cert, endpoint.key)
    lib = _libssl()
    differently_configured = client_context(appliance.cert, appliance.key)
    with pytest.raises(TlsSetupError, match="refusing to start"):
        _check_ssl_ctx_address(lib, context, _ssl_ctx_address(differently_configured))
    # Identical settings agree on every value read; only the live option probe tells them apart.
    twin = server_context(endpoint.cert, endpoint.key)
    assert lib.SSL_CTX_get_options(_ssl_ctx_address(twin)) == context.options
    with pytest.raises(TlsSetupError, match="refusing to start"):
        _check_ssl_ctx_address(lib, context, _ssl_ctx_address(twin))
    with pytest.raises(TlsSetupError, match="no OpenSSL context pointer"):
        _check_ssl_ctx_address(lib, context, 0)


def openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def openssl_peer(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """An Ed25519 key and certificate made by the openssl tool, and the ID they should yield."""
    directory = tmp_path_factory.mktemp("openssl")
    openssl("genpkey", "-algorithm", "ed25519", "-out", "k.pem", cwd=directory)
    openssl(
        "req", "-new", "-x509", "-key", "k.pem", "-subj", "/CN=openssl-peer", "-days", "1",
        "-out", "c.pem", cwd=directory,
    )  # fmt: skip
    cert = x509.load_pem_x509_certificate((directory / "c.pem").read_bytes())
    expected = peer_id_from_certificate_der(cert.public_bytes(serialization.Encoding.DER))
    return directory / "c.pem", directory / "k.pem", expected


def test_openssl_s_client_completes_a_mutual_handshake(
    serve: Serve, endpoint: Peer, openssl_peer: tuple[Path, Path, str]
) -> None:
    cert, key, expected_id = openssl_peer
    port, outcome = serve(server_context(endpoint.cert, endpoint.key))
    result = subprocess.run(
        [
            "openssl", "s_client", "-tls1_3", "-alpn", ALPN_LINK,
            "-cert", str(cert), "-key", str(key), "-connect", f"127.0.0.1:{port}",
        ],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=10,
    )  # fmt: skip
    assert "New, TLSv1.3, Cipher is" in result.stdout
    assert "Peer signature type: ed25519" in result.stdout
    assert f"ALPN protocol: {ALPN_LINK}" in result.stdout
    served = outcome.result(IO_TIMEOUT)
    assert served.error is None
    assert served.peer_id == expected_id


def test_our_client_completes_a_mutual_handshake_with_openssl_s_server(
    appliance: Peer, openssl_peer: tuple[Path, Path, str]
) -> None:
    cert, key, expected_id = openssl_peer
    command = [
        "openssl", "s_server", "-tls1_3", "-accept", "127.0.0.1:0", "-naccept", "1",
        "-cert", str(cert), "-key", str(key), "-Verify", "1", "-alpn", ALPN_LINK,
    ]  # fmt: skip
    # `-Verify 1` makes s_server demand a client certificate; its stdin stays open because EOF
    # there would make it hang up.
    server = subprocess.Popen(
        command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        assert server.stdout is not None
        port = next(
            int(line.rsplit(":", 1)[1]) for line in server.stdout if line.startswith("ACCEPT")
        )
        with connect(port, client_context(appliance.cert, appliance.key)) as tls:
            assert check_expected_peer(tls, expected_id) == expected_id
            assert tls.selected_alpn_protocol() == ALPN_LINK
        output, _ = server.communicate(timeout=IO_TIMEOUT)
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
    assert f"subject=CN = {appliance.identity.endpoint_id}" in output
