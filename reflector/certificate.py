"""Self-signed X.509 certificate for the identity key (spec §5.2).

TLS needs a certificate to carry the public key; that is all this one is for. It is self-signed,
names no host and chains to no CA. Peers never trust anything the certificate *says*: a peer's ID
is recomputed from the public key in it (`peer_id_from_certificate_der`), and TLS 1.3's
CertificateVerify proves the peer holds the matching private key. The SubjectAltName entries
(`pp:id:<ID>`, `pp:pk:<fingerprint>`) are there for humans and debugging tools only.
"""

from __future__ import annotations

import contextlib
from datetime import datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import NameOID

from reflector.endpoint_id import endpoint_id_from_public_key
from reflector.errors import IdentityError
from reflector.fsutil import atomic_write
from reflector.identity import Identity

__all__ = [
    "CERT_FILE_MODE",
    "CERT_FILE_NAME",
    "CERT_LIFETIME",
    "BadCertificate",
    "ensure_certificate_file",
    "make_certificate",
    "peer_id_from_certificate_der",
]

CERT_FILE_NAME = "identity.crt"
# A certificate is public; 0644 lets operators and tools inspect it without root.
CERT_FILE_MODE = 0o644
# Tolerates a peer whose clock is up to a day behind ours (appliances without RTC, boot-time
# drift) without ever failing a handshake on "not yet valid".
CERT_BACKDATE = timedelta(days=1)
# Ten years. Expiry adds no security here: trust is in the key (the allowlist holds IDs derived
# from it), and the key is revoked by rotation, not by letting a certificate lapse. A short life
# would only add outages. Ten years stays within UTCTime (before 2050) for decades to come.
CERT_LIFETIME = timedelta(days=3650)
# `ensure_certificate_file` re-issues a certificate this close to expiry, so an endpoint that
# runs for ten years never presents an expired one.
CERT_RENEW_BEFORE = timedelta(days=30)
SAN_ID_PREFIX = "pp:id:"
SAN_FINGERPRINT_PREFIX = "pp:pk:"


class BadCertificate(ValueError):
    """A peer's certificate cannot be parsed or does not carry an Ed25519 key."""


def make_certificate(identity: Identity, now: datetime) -> x509.Certificate:
    """A self-signed certificate binding `identity`'s key, valid from a day before `now`."""
    _require_aware(now)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.endpoint_id)])
    san = x509.SubjectAlternativeName(
        [
            x509.UniformResourceIdentifier(SAN_ID_PREFIX + identity.endpoint_id),
            x509.UniformResourceIdentifier(SAN_FINGERPRINT_PREFIX + identity.fingerprint),
        ]
    )
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(identity.private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CERT_BACKDATE)
        .not_valid_after(now + CERT_LIFETIME)
        .add_extension(san, critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    )
    # Ed25519 signs the whole message itself: no separate hash algorithm.
    return builder.sign(identity.private_key, algorithm=None)


def ensure_certificate_file(identity: Identity, now: datetime) -> Path:
    """Write `<key dir>/identity.crt` unless a current certificate for this key is already there.

    Re-issued if missing, unreadable, for another key (after a rotation), not yet valid, or
    close to expiry. Returns the path, ready for `ssl.SSLContext.load_cert_chain`.
    """
    _require_aware(now)
    path = identity.key_path.parent / CERT_FILE_NAME
    if _is_current(path, identity, now):
        return path
    pem = make_certificate(identity, now).public_bytes(serialization.Encoding.PEM)
    try:
        atomic_write(path, pem, CERT_FILE_MODE)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise IdentityError(f"cannot write certificate {path}: {reason}") from exc
    return path


def peer_id_from_certificate_der(der: bytes) -> str:
    """The peer's Endpoint ID, computed from the certificate's public key and nothing else.

    Names and SANs in the certificate are ignored on purpose: anyone can write any name into a
    self-signed certificate, but only the key's holder can complete the TLS handshake with it.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise BadCertificate(
            f"peer certificate is not a valid X.509 DER certificate: {exc}"
        ) from exc
    return endpoint_id_from_public_key(_ed25519_raw(cert))


def _ed25519_raw(cert: x509.Certificate) -> bytes:
    try:
        key = cert.public_key()
    except Exception as exc:  # cryptography raises ValueError or UnsupportedAlgorithm here.
        raise BadCertificate(f"peer certificate has an unusable public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise BadCertificate(
            f"peer certificate key is {type(key).__name__.removesuffix('PublicKey')}, not Ed25519"
        )
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _is_current(path: Path, identity: Identity, now: datetime) -> bool:
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (OSError, ValueError):
        return False
    raw = b""
    with contextlib.suppress(BadCertificate):
        raw = _ed25519_raw(cert)
    return (
        raw == identity.public_key_raw
        and cert.not_valid_before_utc <= now
        and now + CERT_RENEW_BEFORE < cert.not_valid_after_utc
    )


def _require_aware(now: datetime) -> None:
    if now.utcoffset() is None:
        raise ValueError("certificate times must be timezone-aware (e.g. datetime.now(UTC))")
