"""The endpoint's cryptographic identity: one Ed25519 key on disk (spec §4.1, §4.3).

The key is stored as unencrypted PKCS#8 PEM, because that is what ``ssl.SSLContext.
load_cert_chain`` and ``openssl`` read directly; it is protected by file permissions instead of a
passphrase (an unattended service has nowhere safe to keep a passphrase): the file is 0600 in a
0700 directory, and a key that group or others can read is refused, as OpenSSH does.

An existing key is never overwritten except by an explicit rotation, which keeps the old key as a
backup and records the change in a history file, because losing the key means becoming a new
endpoint that every peer must re-trust.
"""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from reflector.endpoint_id import endpoint_id_from_public_key, public_key_fingerprint
from reflector.errors import IdentityError, ReflectorError
from reflector.fsutil import atomic_create, atomic_write, ensure_private_dir, open_owned

__all__ = [
    "HISTORY_FILE_NAME",
    "KEY_FILE_MODE",
    "KEY_FILE_NAME",
    "Identity",
    "Rotation",
    "create_identity",
    "identity_from_private_key",
    "load_identity",
    "load_or_create_identity",
    "rotate_identity",
]

KEY_FILE_NAME = "identity.ed25519"
HISTORY_FILE_NAME = "identity-history.jsonl"
# Owner read/write only: the key is the endpoint's whole identity.
KEY_FILE_MODE = 0o600
# The history holds only public IDs, but nobody else needs it either.
_HISTORY_FILE_MODE = 0o600
# An Ed25519 PKCS#8 PEM is 119 bytes; even a 16384-bit RSA key is under 13 KiB. Anything larger
# is not a key, and reading it whole would only waste memory.
_MAX_KEY_FILE_BYTES = 16 * 1024
_GROUP_OTHER_BITS = 0o077
_GROUP_OTHER_READ = stat.S_IRGRP | stat.S_IROTH
# Backup names sort in time order and contain no characters that need quoting in a shell.
_BACKUP_TIME_FORMAT = "%Y%m%dT%H%M%SZ"
# Names for the key types people most often put in the wrong file, for the error message.
_OTHER_KEY_TYPES: tuple[tuple[type, str], ...] = (
    (rsa.RSAPrivateKey, "RSA"),
    (ec.EllipticCurvePrivateKey, "EC"),
    (x25519.X25519PrivateKey, "X25519"),
    (ed448.Ed448PrivateKey, "Ed448"),
    (x448.X448PrivateKey, "X448"),
    (dsa.DSAPrivateKey, "DSA"),
)


@dataclass(frozen=True, kw_only=True)
class Identity:
    """A loaded identity. The private key is kept out of repr/str so it never reaches a log."""

    private_key: Ed25519PrivateKey = field(repr=False, compare=False)
    public_key_raw: bytes
    endpoint_id: str
    fingerprint: str
    key_path: Path


@dataclass(frozen=True, kw_only=True)
class Rotation:
    """What `rotate_identity` did: the old ID, the new identity, where the old key is kept."""

    old_id: str
    new: Identity
    backup_path: Path


def identity_from_private_key(private_key: Ed25519PrivateKey, key_path: Path) -> Identity:
    """Derive the public parts (ID, fingerprint) of a key; no I/O."""
    raw = private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return Identity(
        private_key=private_key,
        public_key_raw=raw,
        endpoint_id=endpoint_id_from_public_key(raw),
        fingerprint=public_key_fingerprint(raw),
        key_path=key_path,
    )


def load_identity(key_path: Path) -> Identity:
    """Load the key at `key_path`, refusing anything that is not a private Ed25519 key file."""
    data = _read_key_file(key_path)
    return identity_from_private_key(_parse_key(key_path, data), key_path)


def create_identity(key_path: Path) -> Identity:
    """Generate a new key and store it at `key_path`; an existing file is never overwritten."""
    _ensure_key_dir(key_path)
    private_key = Ed25519PrivateKey.generate()
    try:
        atomic_create(key_path, _to_pem(private_key), KEY_FILE_MODE)
    except FileExistsError as exc:
        raise IdentityError(f"refusing to create {key_path}: a file is already there") from exc
    except OSError as exc:
        raise IdentityError(f"cannot write {key_path}: {_reason(exc)}") from exc
    return identity_from_private_key(private_key, key_path)


def load_or_create_identity(key_path: Path) -> tuple[Identity, bool]:
    """Load the key, or create it on first run; the bool says whether it was created."""
    if not os.path.lexists(key_path):
        try:
            return create_identity(key_path), True
        except IdentityError:
            # Another process may have created it between our check and our link: load it.
            if not os.path.lexists(key_path):
                raise
    return load_identity(key_path), False


def rotate_identity(key_path: Path, now: datetime) -> Rotation:
    """Replace the key with a new one, keeping the old key as a timestamped backup (mode 0600).

    The backup is written first and never overwrites anything, so a crash at any point leaves
    either the old key in place or the new key in place with the old one saved. A JSON line
    (time, old and new ID, backup file name; never key material) is appended to the history.
    """
    _ensure_key_dir(key_path)
    old_data = _read_key_file(key_path)
    old = identity_from_private_key(_parse_key(key_path, old_data), key_path)
    backup_path = key_path.with_name(f"{key_path.name}.{_utc_stamp(now)}.bak")
    try:
        atomic_create(backup_path, old_data, KEY_FILE_MODE)
    except FileExistsError as exc:
        raise IdentityError(f"refusing to rotate: backup {backup_path} already exists") from exc
    except OSError as exc:
        raise IdentityError(f"cannot write backup {backup_path}: {_reason(exc)}") from exc
    new_key = Ed25519PrivateKey.generate()
    try:
        atomic_write(key_path, _to_pem(new_key), KEY_FILE_MODE)
    except OSError as exc:
        raise IdentityError(f"cannot write {key_path}: {_reason(exc)}") from exc
    new = identity_from_private_key(new_key, key_path)
    _append_history(key_path.parent / HISTORY_FILE_NAME, now, old.endpoint_id, new, backup_path)
    return Rotation(old_id=old.endpoint_id, new=new, backup_path=backup_path)


def _ensure_key_dir(key_path: Path) -> None:
    try:
        ensure_private_dir(key_path.parent)
    except IdentityError:
        raise
    except ReflectorError as exc:
        raise IdentityError(str(exc)) from exc


def _read_key_file(key_path: Path) -> bytes:
    """Read the key file after checking, on the open descriptor, that it is safe to use.

    Checking with fstat after open (not stat before) means the file we check is the file we read.
    O_NONBLOCK keeps a FIFO planted at the path from hanging us.
    """
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK
    try:
        fd = os.open(key_path, flags)
    except FileNotFoundError as exc:
        raise IdentityError(f"identity key {key_path} does not exist") from exc
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {key_path}: {_reason(exc)}") from exc
    try:
        _check_key_file(key_path, os.fstat(fd))
        return _read_limited(key_path, fd)
    finally:
        os.close(fd)


def _check_key_file(key_path: Path, info: os.stat_result) -> None:
    if stat.S_ISDIR(info.st_mode):
        raise IdentityError(f"identity key {key_path} is a directory, not a key file")
    if not stat.S_ISREG(info.st_mode):
        raise IdentityError(f"identity key {key_path} is not a regular file")
    mode = stat.S_IMODE(info.st_mode)
    if mode & _GROUP_OTHER_BITS:
        access = "readable" if mode & _GROUP_OTHER_READ else "accessible"
        raise IdentityError(
            f"refusing to use {key_path}: {access} by group or others (mode {mode:04o}); "
            f"run chmod 600 {key_path}"
        )


def _read_limited(key_path: Path, fd: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := os.read(fd, _MAX_KEY_FILE_BYTES + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > _MAX_KEY_FILE_BYTES:
                raise IdentityError(
                    f"identity key {key_path} is larger than {_MAX_KEY_FILE_BYTES} bytes; "
                    "it is not a key file"
                )
    except OSError as exc:
        raise IdentityError(f"cannot read identity key {key_path}: {_reason(exc)}") from exc
    return b"".join(chunks)


def _parse_key(key_path: Path, data: bytes) -> Ed25519PrivateKey:
    label = _pem_label(data)
    if label is None:
        raise IdentityError(f"identity key {key_path} is not a PEM key file (empty or corrupt)")
    if "PRIVATE KEY" not in label:
        raise IdentityError(f"identity key {key_path} holds a {label}, not a private key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:
        raise IdentityError(
            f"identity key {key_path} is encrypted; Reflector needs an unencrypted PKCS#8 key "
            "(it is protected by file permissions)"
        ) from exc
    except ValueError as exc:
        raise IdentityError(f"identity key {key_path} is truncated or corrupt") from exc
    except UnsupportedAlgorithm as exc:
        raise IdentityError(f"identity key {key_path} holds an unsupported key type") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise IdentityError(
            f"identity key {key_path} is an {_key_type_name(key)} key; "
            "Reflector identities are Ed25519"
        )
    return key


def _pem_label(data: bytes) -> str | None:
    """The label of the first PEM block (e.g. "PRIVATE KEY"), or None if there is none."""
    begin = data.find(b"-----BEGIN ")
    if begin < 0:
        return None
    start = begin + len(b"-----BEGIN ")
    end = data.find(b"-----", start)
    if end < 0:
        return None
    return data[start:end].decode("ascii", errors="replace")


def _key_type_name(key: object) -> str:
    for key_type, name in _OTHER_KEY_TYPES:
        if isinstance(key, key_type):
            return name
    return type(key).__name__


def _to_pem(private_key: Ed25519PrivateKey) -> bytes:
    return private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _utc_stamp(now: datetime) -> str:
    if now.tzinfo is None:
        raise ValueError("rotate_identity needs a timezone-aware time")
    return now.astimezone(UTC).strftime(_BACKUP_TIME_FORMAT)


def _append_history(
    history_path: Path, now: datetime, old_id: str, new: Identity, backup_path: Path
) -> None:
    record = {
        "time": now.astimezone(UTC).isoformat(),
        "old_id": old_id,
        "new_id": new.endpoint_id,
        "backup": backup_path.name,
    }
    line = (json.dumps(record, sort_keys=True) + "\n").encode()
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW
    try:
        fd = open_owned(history_path, flags, _HISTORY_FILE_MODE)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        raise IdentityError(
            f"identity rotated to {new.endpoint_id}, but cannot record it in {history_path}: "
            f"{_reason(exc)}"
        ) from exc


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
