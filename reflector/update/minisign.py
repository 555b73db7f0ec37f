"""Minisign public keys and signatures: parse, verify and (for release tooling and tests) sign.

Pure: bytes and text in, results or `SignatureError` out; no files, no clock.

The format (https://jedisct1.github.io/minisign/) is small enough to verify ourselves, which keeps
the single binary free of a native helper:

- public key file: an "untrusted comment:" line, then base64 of
  `"Ed" || key_id (8 bytes) || Ed25519 public key (32 bytes)`;
- signature file: an "untrusted comment:" line; base64 of `alg (2) || key_id (8) || sig (64)`;
  a "trusted comment:" line; base64 of the global signature (64), which signs
  `sig || trusted comment text` so the trusted comment cannot be swapped.
  `alg` is "ED" (the message is prehashed with BLAKE2b-512; minisign's default since 0.10) or
  the legacy "Ed" (the message is signed as is).

A key ID is printed as minisign does: the 8 bytes read as a little-endian integer, in upper-case
hex. The untrusted comment is exactly that: never used for any decision.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Literal

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from reflector.errors import ReflectorError

UNTRUSTED_PREFIX = "untrusted comment: "
TRUSTED_PREFIX = "trusted comment: "
# minisign's own bound on a comment line (COMMENT_MAX); longer lines are not minisign files.
MAX_COMMENT_BYTES = 1024
# Two comment lines plus two short base64 lines: anything much larger is not a signature file.
MAX_SIGNATURE_FILE_BYTES = 4 * MAX_COMMENT_BYTES
# One comment line plus one base64 line.
MAX_PUBLIC_KEY_FILE_BYTES = 2 * MAX_COMMENT_BYTES

KEY_ALG = b"Ed"
ALG_LEGACY = b"Ed"
ALG_PREHASHED = b"ED"
KEY_ID_BYTES = 8
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# BLAKE2b-512, as minisign prehashes ("ED" signatures).
PREHASH_DIGEST_BYTES = 64

Algorithm = Literal["ED", "Ed"]


class SignatureError(ReflectorError):
    """A key or signature file is malformed, from another key, or does not verify."""


@dataclass(frozen=True, kw_only=True)
class PublicKey:
    """A minisign public key: its 8-byte ID and the Ed25519 key."""

    key_id: bytes
    key: bytes

    @property
    def key_id_hex(self) -> str:
        return key_id_hex(self.key_id)


@dataclass(frozen=True, kw_only=True)
class Signature:
    """A parsed signature file; nothing in it is trusted until `verify` accepts it."""

    algorithm: Algorithm
    key_id: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes


@dataclass(frozen=True, kw_only=True)
class Verified:
    """What a successful verification vouches for: the signing key and the trusted comment."""

    key_id_hex: str
    algorithm: Algorithm
    trusted_comment: str


def key_id_hex(key_id: bytes) -> str:
    """minisign's display form: the bytes as a little-endian integer in upper-case hex.

    minisign prints it with `%PRIX64`, so without leading zeros; padding it would show one key in
    sixteen under an ID that differs from the one in its `.pub` comment."""
    return f"{int.from_bytes(key_id, 'little'):X}"


def _lines(text: bytes | str, *, limit: int, what: str) -> list[str]:
    raw = text.encode() if isinstance(text, str) else text
    if len(raw) > limit:
        raise SignatureError(f"{what} is {len(raw)} bytes, more than the {limit} allowed")
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SignatureError(f"{what} is not UTF-8 text") from exc
    lines = [line.removesuffix("\r") for line in decoded.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def _b64(line: str, size: int, what: str) -> bytes:
    try:
        data = base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(f"{what} is not valid base64") from exc
    if len(data) != size:
        raise SignatureError(f"{what} decodes to {len(data)} bytes, expected {size}")
    return data


def _comment(line: str, prefix: str, what: str) -> str:
    if not line.startswith(prefix):
        raise SignatureError(f'{what} must start with "{prefix.strip()}"')
    if len(line.encode()) > MAX_COMMENT_BYTES:
        raise SignatureError(f"{what} is longer than {MAX_COMMENT_BYTES} bytes")
    return line[len(prefix) :]


def parse_public_key(text: bytes | str) -> PublicKey:
    """A minisign public key file, or the bare base64 line (`minisign -P` takes that form)."""
    lines = _lines(text, limit=MAX_PUBLIC_KEY_FILE_BYTES, what="public key file")
    if len(lines) == 2:
        _comment(lines[0], UNTRUSTED_PREFIX, "public key comment")
        lines = lines[1:]
    if len(lines) != 1:
        raise SignatureError("public key file must be a comment line and one base64 line")
    blob = _b64(lines[0], 2 + KEY_ID_BYTES + PUBLIC_KEY_BYTES, "public key")
    if blob[:2] != KEY_ALG:
        raise SignatureError(f"public key algorithm {blob[:2]!r} is not Ed25519 ('Ed')")
    return PublicKey(key_id=blob[2 : 2 + KEY_ID_BYTES], key=blob[2 + KEY_ID_BYTES :])


def parse_signature(text: bytes | str) -> Signature:
    """A four-line minisign signature file, strictly."""
    lines = _lines(text, limit=MAX_SIGNATURE_FILE_BYTES, what="signature file")
    if len(lines) != 4:
        raise SignatureError(f"signature file has {len(lines)} lines, expected 4")
    _comment(lines[0], UNTRUSTED_PREFIX, "signature's first line")
    blob = _b64(lines[1], 2 + KEY_ID_BYTES + SIGNATURE_BYTES, "signature")
    algorithm: Algorithm
    if blob[:2] == ALG_PREHASHED:
        algorithm = "ED"
    elif blob[:2] == ALG_LEGACY:
        algorithm = "Ed"
    else:
        raise SignatureError(f"signature algorithm {blob[:2]!r} is neither 'ED' nor 'Ed'")
    trusted = _comment(lines[2], TRUSTED_PREFIX, "signature's third line")
    return Signature(
        algorithm=algorithm,
        key_id=blob[2 : 2 + KEY_ID_BYTES],
        signature=blob[2 + KEY_ID_BYTES :],
        trusted_comment=trusted,
        global_signature=_b64(lines[3], SIGNATURE_BYTES, "global signature"),
    )


def _signed_bytes(message: bytes, algorithm: Algorithm) -> bytes:
    if algorithm == "ED":
        return hashlib.blake2b(message, digest_size=PREHASH_DIGEST_BYTES).digest()
    return message


def verify(message: bytes, signature: Signature, public_key: PublicKey) -> Verified:
    """Accept `message` only if `public_key` signed it and its trusted comment; else raise."""
    if signature.key_id != public_key.key_id:
        raise SignatureError(
            f"signed by key {key_id_hex(signature.key_id)}, not by the trusted key"
            f" {public_key.key_id_hex}"
        )
    key = Ed25519PublicKey.from_public_bytes(public_key.key)
    try:
        key.verify(signature.signature, _signed_bytes(message, signature.algorithm))
    except InvalidSignature as exc:
        raise SignatureError("signature does not match the signed file (altered?)") from exc
    try:
        trusted = signature.signature + signature.trusted_comment.encode()
        key.verify(signature.global_signature, trusted)
    except InvalidSignature as exc:
        raise SignatureError("trusted comment signature does not verify (altered?)") from exc
    return Verified(
        key_id_hex=public_key.key_id_hex,
        algorithm=signature.algorithm,
        trusted_comment=signature.trusted_comment,
    )


def verify_text(
    message: bytes, signature_text: bytes | str, public_key_text: bytes | str
) -> Verified:
    """`verify` from the files' contents."""
    return verify(message, parse_signature(signature_text), parse_public_key(public_key_text))


# --- signing: for our release tooling and for tests; a verifier never needs it ---


def default_key_id(key: Ed25519PublicKey) -> bytes:
    """A stable key ID for a key we hold: the first 8 bytes of BLAKE2b-512 of the public key.

    minisign draws key IDs at random; any 8 bytes work, and deriving them means re-exporting
    the public key never changes its ID.
    """
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    return hashlib.blake2b(raw, digest_size=PREHASH_DIGEST_BYTES).digest()[:KEY_ID_BYTES]


def _check_comment(text: str, what: str) -> None:
    if "\n" in text or "\r" in text:
        raise SignatureError(f"{what} must be one line")


def format_public_key(key: Ed25519PublicKey, key_id: bytes | None = None) -> str:
    """A public key file that `minisign -V -p FILE` reads."""
    kid = default_key_id(key) if key_id is None else key_id
    raw = key.public_bytes(Encoding.Raw, PublicFormat.Raw)
    blob = base64.b64encode(KEY_ALG + kid + raw).decode()
    return f"{UNTRUSTED_PREFIX}minisign public key {key_id_hex(kid)}\n{blob}\n"


def sign(
    message: bytes,
    key: Ed25519PrivateKey,
    *,
    trusted_comment: str,
    untrusted_comment: str = "signature from reflector release tooling",
    key_id: bytes | None = None,
    algorithm: Algorithm = "ED",
) -> str:
    """A signature file for `message` that `minisign -V` accepts."""
    _check_comment(trusted_comment, "trusted comment")
    _check_comment(untrusted_comment, "untrusted comment")
    kid = default_key_id(key.public_key()) if key_id is None else key_id
    if len(kid) != KEY_ID_BYTES:
        raise SignatureError(f"key ID must be {KEY_ID_BYTES} bytes")
    sig = key.sign(_signed_bytes(message, algorithm))
    global_sig = key.sign(sig + trusted_comment.encode())
    alg = ALG_PREHASHED if algorithm == "ED" else ALG_LEGACY
    text = (
        f"{UNTRUSTED_PREFIX}{untrusted_comment}\n"
        f"{base64.b64encode(alg + kid + sig).decode()}\n"
        f"{TRUSTED_PREFIX}{trusted_comment}\n"
        f"{base64.b64encode(global_sig).decode()}\n"
    )
    # Refuse to emit what our own parser (and minisign) would reject, e.g. an over-long comment.
    parse_signature(text)
    return text
