"""Self-signed identity certificate: binds the key, names it, and never overrides it."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from reflector.certificate import (
    CERT_FILE_NAME,
    CERT_LIFETIME,
    BadCertificate,
    ensure_certificate_file,
    make_certificate,
    peer_id_from_certificate_der,
)
from reflector.identity import KEY_FILE_NAME, Identity, create_identity, rotate_identity

NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)
# Generous for a loopback handshake on a loaded CI machine; a hang fails instead of blocking.
HANDSHAKE_TIMEOUT_S = 10.0


@pytest.fixture
def identity(tmp_path: Path) -> Identity:
    return create_identity(tmp_path / "server" / KEY_FILE_NAME)


@pytest.fixture
def other(tmp_path: Path) -> Identity:
    return create_identity(tmp_path / "client" / KEY_FILE_NAME)


def san_uris(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.UniformResourceIdentifier)


def der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def test_certificate_names_the_id_and_fingerprint(identity: Identity) -> None:
    cert = make_certificate(identity, NOW)
    assert san_uris(cert) == [f"pp:id:{identity.endpoint_id}", f"pp:pk:{identity.fingerprint}"]
    common_names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    assert [attribute.value for attribute in common_names] == [identity.endpoint_id]


def test_certificate_is_self_signed_by_the_identity_key(identity: Identity) -> None:
    cert = make_certificate(identity, NOW)
    assert cert.issuer == cert.subject
    cert.verify_directly_issued_by(cert)  # raises if the signature does not verify
    assert cert.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    ) == (identity.public_key_raw)


def test_certificate_is_not_a_ca(identity: Identity) -> None:
    cert = make_certificate(identity, NOW)
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    assert constraints.critical
    assert not constraints.value.ca


def test_certificate_validity_tolerates_clock_skew_and_lasts_ten_years(identity: Identity) -> None:
    cert = make_certificate(identity, NOW)
    assert cert.not_valid_before_utc == NOW - timedelta(days=1)
    assert cert.not_valid_after_utc == NOW + timedelta(days=3650)


def test_serial_numbers_are_random(identity: Identity) -> None:
    serials = {make_certificate(identity, NOW).serial_number for _ in range(5)}
    assert len(serials) == 5
    assert all(serial > 2**64 for serial in serials)


def test_naive_time_is_a_programming_error(identity: Identity) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        make_certificate(identity, datetime(2026, 1, 1))  # naive on purpose


# --- the ID comes from the key, never from what the certificate says -------------------------


def test_peer_id_is_the_id_of_the_certificate_key(identity: Identity) -> None:
    assert peer_id_from_certificate_der(der(make_certificate(identity, NOW))) == (
        identity.endpoint_id
    )


def test_peer_id_ignores_a_lying_san_and_common_name(identity: Identity, other: Identity) -> None:
    # `other` signs a certificate that claims to be `identity` in every name field.
    liar = Identity(
        private_key=other.private_key,
        public_key_raw=other.public_key_raw,
        endpoint_id=identity.endpoint_id,
        fingerprint=identity.fingerprint,
        key_path=other.key_path,
    )
    cert = make_certificate(liar, NOW)
    assert f"pp:id:{identity.endpoint_id}" in san_uris(cert)
    assert peer_id_from_certificate_der(der(cert)) == other.endpoint_id


@pytest.mark.parametrize("data", [b"", b"not a certificate", b"\x30\x82\x01\x00" + b"\x00" * 8])
def test_unparseable_certificate_is_bad(data: bytes) -> None:
    with pytest.raises(BadCertificate, match=r"not a valid X\.509 DER certificate"):
        peer_id_from_certificate_der(data)


def test_pem_instead_of_der_is_bad(identity: Identity) -> None:
    pem = make_certificate(identity, NOW).public_bytes(serialization.Encoding.PEM)
    with pytest.raises(BadCertificate):
        peer_id_from_certificate_der(pem)


def test_certificate_with_a_non_ed25519_key_is_bad() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "PP00")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(BadCertificate, match="peer certificate key is EC, not Ed25519"):
        peer_id_from_certificate_der(der(cert))


def test_bad_certificate_is_a_value_error() -> None:
    assert issubclass(BadCertificate, ValueError)


# --- the certificate file ------------------------------------------------------------------


def test_ensure_writes_the_certificate_next_to_the_key(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)
    assert path == identity.key_path.parent / CERT_FILE_NAME
    assert path.stat().st_mode & 0o777 == 0o644
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert peer_id_from_certificate_der(der(cert)) == identity.endpoint_id
    assert sorted(p.name for p in path.parent.iterdir()) == [CERT_FILE_NAME, KEY_FILE_NAME]


def test_ensure_keeps_a_current_certificate(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)
    before = path.read_bytes()
    assert ensure_certificate_file(identity, NOW + timedelta(days=365)) == path
    assert path.read_bytes() == before


def test_ensure_replaces_the_certificate_after_rotation(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)
    rotation = rotate_identity(identity.key_path, NOW)
    ensure_certificate_file(rotation.new, NOW)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert peer_id_from_certificate_der(der(cert)) == rotation.new.endpoint_id


def test_ensure_replaces_a_corrupt_certificate(identity: Identity) -> None:
    path = identity.key_path.parent / CERT_FILE_NAME
    path.write_bytes(b"-----BEGIN CERTIFICATE-----\ntruncated")
    ensure_certificate_file(identity, NOW)
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    assert peer_id_from_certificate_der(der(cert)) == identity.endpoint_id


def test_ensure_renews_before_expiry_and_after_a_clock_jump_back(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)
    original = path.read_bytes()
    near_expiry = NOW + CERT_LIFETIME - timedelta(days=10)
    ensure_certificate_file(identity, near_expiry)
    renewed = x509.load_pem_x509_certificate(path.read_bytes())
    assert path.read_bytes() != original
    assert renewed.not_valid_after_utc > near_expiry + timedelta(days=365)
    past = NOW - timedelta(days=30)  # before the renewed cert's not-before
    ensure_certificate_file(identity, past)
    assert x509.load_pem_x509_certificate(path.read_bytes()).not_valid_before_utc <= past


def test_openssl_parses_the_certificate_file(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)
    result = subprocess.run(
        ["openssl", "x509", "-in", str(path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ED25519" in result.stdout
    assert f"URI:pp:id:{identity.endpoint_id}" in result.stdout
    assert f"URI:pp:pk:{identity.fingerprint}" in result.stdout
    assert f"CN = {identity.endpoint_id}" in result.stdout


def test_openssl_confirms_certificate_and_key_match(identity: Identity) -> None:
    path = ensure_certificate_file(identity, NOW)

    def public_key_of(*command: str) -> str:
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    from_cert = public_key_of("openssl", "x509", "-in", str(path), "-noout", "-pubkey")
    from_key = public_key_of("openssl", "pkey", "-in", str(identity.key_path), "-pubout")
    assert from_cert == from_key


# --- real mutual TLS 1.3 -----------------------------------------------------------------


def tls_context(identity: Identity, peer_cert: Path, *, server: bool) -> ssl.SSLContext:
    """Each side presents its own self-signed cert and pins the peer's as the only anchor."""
    purpose = ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT
    context = ssl.SSLContext(purpose)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.load_cert_chain(ensure_certificate_file(identity, _now()), identity.key_path)
    context.load_verify_locations(peer_cert)
    context.verify_mode = ssl.CERT_REQUIRED
    context.check_hostname = False  # the certificate deliberately names no host
    return context


def _now() -> datetime:
    # A real handshake checks validity against the real clock.
    return datetime.now(UTC)


def test_mutual_tls_13_handshake_yields_each_peer_id(identity: Identity, other: Identity) -> None:
    server_cert = ensure_certificate_file(identity, _now())
    client_cert = ensure_certificate_file(other, _now())
    server_context = tls_context(identity, client_cert, server=True)
    client_context = tls_context(other, server_cert, server=False)
    left, right = socket.socketpair()
    left.settimeout(HANDSHAKE_TIMEOUT_S)
    right.settimeout(HANDSHAKE_TIMEOUT_S)
    seen_by_server: list[str] = []

    def serve() -> None:
        with server_context.wrap_socket(left, server_side=True) as tls:
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            seen_by_server.append(peer_id_from_certificate_der(peer))
            tls.sendall(b"ok")

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with client_context.wrap_socket(right) as tls:
            assert tls.version() == "TLSv1.3"
            peer = tls.getpeercert(binary_form=True)
            assert peer is not None
            assert peer_id_from_certificate_der(peer) == identity.endpoint_id
            assert tls.recv(2) == b"ok"
    finally:
        thread.join(HANDSHAKE_TIMEOUT_S)
    assert seen_by_server == [other.endpoint_id]
