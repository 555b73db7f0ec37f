"""Identity key on disk: created once, kept private, refused when unsafe, rotated with a backup."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import threading
from collections.abc import Callable
from contextlib import AbstractContextManager
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from reflector.endpoint_id import endpoint_id_from_public_key, is_valid_id, public_key_fingerprint
from reflector.errors import IdentityError, ReflectorError
from reflector.identity import (
    HISTORY_FILE_NAME,
    KEY_FILE_NAME,
    Identity,
    create_identity,
    load_identity,
    load_or_create_identity,
    rotate_identity,
)

NOW = datetime(2026, 3, 14, 15, 9, 26, tzinfo=UTC)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def write_pem(path: Path, key: PrivateKeyTypes, mode: int = 0o600) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(mode)


def load_error(path: Path) -> str:
    with pytest.raises(IdentityError) as caught:
        load_identity(path)
    message = str(caught.value)
    assert "\n" not in message
    return message


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    return tmp_path / "state" / KEY_FILE_NAME


# --- creation -----------------------------------------------------------------------------


def test_create_writes_private_pkcs8_pem_in_private_dir(key_path: Path) -> None:
    identity = create_identity(key_path)
    assert key_path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert mode_of(key_path) == 0o600
    assert mode_of(key_path.parent) == 0o700
    assert sorted(p.name for p in key_path.parent.iterdir()) == [KEY_FILE_NAME]
    assert identity.key_path == key_path
    assert is_valid_id(identity.endpoint_id)


def test_identity_fields_are_derived_from_the_public_key(key_path: Path) -> None:
    identity = create_identity(key_path)
    raw = identity.private_key.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    assert identity.public_key_raw == raw
    assert identity.endpoint_id == endpoint_id_from_public_key(raw)
    assert identity.fingerprint == public_key_fingerprint(raw)


def test_openssl_reads_the_key_file(key_path: Path) -> None:
    create_identity(key_path)
    result = subprocess.run(
        ["openssl", "pkey", "-in", str(key_path), "-noout", "-text"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert "ED25519 Private-Key" in result.stdout


def test_create_never_overwrites_an_existing_key(key_path: Path) -> None:
    first = create_identity(key_path)
    before = key_path.read_bytes()
    with pytest.raises(IdentityError, match=r"refusing to create .*: a file is already there"):
        create_identity(key_path)
    assert key_path.read_bytes() == before
    assert load_identity(key_path).endpoint_id == first.endpoint_id


def test_two_identities_differ(tmp_path: Path) -> None:
    one = create_identity(tmp_path / "a" / KEY_FILE_NAME)
    two = create_identity(tmp_path / "b" / KEY_FILE_NAME)
    assert one.endpoint_id != two.endpoint_id


def test_load_returns_the_created_identity(key_path: Path) -> None:
    created = create_identity(key_path)
    loaded = load_identity(key_path)
    assert loaded == created  # equality covers the public parts only
    assert loaded.endpoint_id == created.endpoint_id


def test_load_or_create_creates_once_then_loads(key_path: Path) -> None:
    first, created = load_or_create_identity(key_path)
    second, created_again = load_or_create_identity(key_path)
    assert created
    assert not created_again
    assert second.endpoint_id == first.endpoint_id


def test_concurrent_first_runs_agree_on_one_key(key_path: Path) -> None:
    results: list[Identity] = []

    def start() -> None:
        results.append(load_or_create_identity(key_path)[0])

    threads = [threading.Thread(target=start) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len({identity.endpoint_id for identity in results}) == 1
    assert load_identity(key_path).endpoint_id == results[0].endpoint_id


def test_load_or_create_does_not_replace_a_broken_key(key_path: Path) -> None:
    key_path.parent.mkdir(mode=0o700)
    key_path.write_bytes(b"garbage")
    key_path.chmod(0o600)
    with pytest.raises(IdentityError, match="not a PEM key file"):
        load_or_create_identity(key_path)
    assert key_path.read_bytes() == b"garbage"


def test_create_reports_a_directory_it_cannot_make(tmp_path: Path) -> None:
    (tmp_path / "file").write_bytes(b"")
    key_path = tmp_path / "file" / "state" / KEY_FILE_NAME
    with pytest.raises(IdentityError, match=r"cannot create directory .*: Not a directory"):
        create_identity(key_path)
    with pytest.raises(ReflectorError):
        load_or_create_identity(key_path)


# --- the private key stays private ---------------------------------------------------------


def test_private_key_never_appears_in_repr_or_str(key_path: Path) -> None:
    identity = create_identity(key_path)
    raw_private = identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    pem_body = key_path.read_text().splitlines()[1]
    for text in (repr(identity), str(identity), f"{identity}"):
        assert "private_key=" not in text
        assert raw_private.hex() not in text
        assert pem_body not in text
        assert identity.endpoint_id in text


# --- refusing unsafe or wrong key files ----------------------------------------------------


def test_missing_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    assert load_error(path) == f"identity key {path} does not exist"


def test_directory_instead_of_key(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.mkdir()
    assert load_error(path) == f"identity key {path} is a directory, not a key file"


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660])
def test_key_readable_by_group_or_others_is_refused(tmp_path: Path, mode: int) -> None:
    path = tmp_path / KEY_FILE_NAME
    write_pem(path, Ed25519PrivateKey.generate(), mode)
    assert load_error(path) == (
        f"refusing to use {path}: readable by group or others (mode {mode:04o}); "
        f"run chmod 600 {path}"
    )


def test_key_writable_by_others_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    write_pem(path, Ed25519PrivateKey.generate(), 0o602)
    assert "accessible by group or others (mode 0602)" in load_error(path)


def test_owner_only_modes_are_accepted(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    write_pem(path, Ed25519PrivateKey.generate(), 0o400)
    assert is_valid_id(load_identity(path).endpoint_id)


def test_truncated_key_is_refused(key_path: Path) -> None:
    create_identity(key_path)
    data = key_path.read_bytes()
    key_path.write_bytes(data[: len(data) // 2])
    assert load_error(key_path) == f"identity key {key_path} is truncated or corrupt"


def test_corrupt_base64_is_refused(key_path: Path) -> None:
    create_identity(key_path)
    lines = key_path.read_text().splitlines()
    lines[1] = "A" * len(lines[1])
    key_path.write_text("\n".join(lines) + "\n")
    assert load_error(key_path) == f"identity key {key_path} is truncated or corrupt"


@pytest.mark.parametrize("content", [b"", b"\x00\x01binary", b"ssh-ed25519 AAAA"])
def test_non_pem_file_is_refused(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(content)
    path.chmod(0o600)
    assert load_error(path) == f"identity key {path} is not a PEM key file (empty or corrupt)"


@pytest.mark.parametrize(
    ("key", "name"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=1024), "RSA"),
        (ec.generate_private_key(ec.SECP256R1()), "EC"),
        (x25519.X25519PrivateKey.generate(), "X25519"),
        (ed448.Ed448PrivateKey.generate(), "Ed448"),
    ],
)
def test_key_of_another_type_is_refused(tmp_path: Path, key: PrivateKeyTypes, name: str) -> None:
    path = tmp_path / KEY_FILE_NAME
    write_pem(path, key)
    assert load_error(path) == (
        f"identity key {path} is an {name} key; Reflector identities are Ed25519"
    )


def test_public_key_instead_of_private_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    public = Ed25519PrivateKey.generate().public_key()
    path.write_bytes(
        public.public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    path.chmod(0o600)
    assert load_error(path) == f"identity key {path} holds a PUBLIC KEY, not a private key"


def test_encrypted_key_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(
        Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    path.chmod(0o600)
    assert "is encrypted; Reflector needs an unencrypted PKCS#8 key" in load_error(path)


def test_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\n" + b"A" * 1_000_000)
    path.chmod(0o600)
    assert "is larger than 16384 bytes; it is not a key file" in load_error(path)


def test_fifo_at_key_path_is_refused_without_blocking(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE_NAME
    os.mkfifo(path, 0o600)
    assert load_error(path) == f"identity key {path} is not a regular file"


def test_unreadable_key_is_reported_with_the_os_reason(
    shared_tmp: Path, unprivileged: Callable[[], AbstractContextManager[None]]
) -> None:
    path = shared_tmp / KEY_FILE_NAME
    write_pem(path, Ed25519PrivateKey.generate(), 0o600)
    if os.geteuid() != 0:
        path.chmod(0o000)
    with unprivileged():
        message = load_error(path)
    assert message == f"cannot read identity key {path}: Permission denied"


# --- rotation -------------------------------------------------------------------------------


def test_rotation_changes_id_and_keeps_the_old_key(key_path: Path) -> None:
    old = create_identity(key_path)
    old_pem = key_path.read_bytes()
    rotation = rotate_identity(key_path, NOW)
    assert rotation.old_id == old.endpoint_id
    assert rotation.new.endpoint_id != old.endpoint_id
    assert rotation.backup_path == key_path.with_name(f"{KEY_FILE_NAME}.20260314T150926Z.bak")
    assert rotation.backup_path.read_bytes() == old_pem
    assert mode_of(rotation.backup_path) == 0o600
    assert mode_of(key_path) == 0o600
    assert load_identity(key_path).endpoint_id == rotation.new.endpoint_id
    assert load_identity(rotation.backup_path).endpoint_id == old.endpoint_id


def test_rotation_appends_history_without_key_material(key_path: Path) -> None:
    create_identity(key_path)
    first = rotate_identity(key_path, NOW)
    second = rotate_identity(key_path, NOW + timedelta(hours=1))
    history = key_path.parent / HISTORY_FILE_NAME
    text = history.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert records == [
        {
            "time": "2026-03-14T15:09:26+00:00",
            "old_id": first.old_id,
            "new_id": first.new.endpoint_id,
            "backup": f"{KEY_FILE_NAME}.20260314T150926Z.bak",
        },
        {
            "time": "2026-03-14T16:09:26+00:00",
            "old_id": first.new.endpoint_id,
            "new_id": second.new.endpoint_id,
            "backup": f"{KEY_FILE_NAME}.20260314T160926Z.bak",
        },
    ]
    assert "PRIVATE" not in text
    for pem_file in (key_path, first.backup_path, second.backup_path):
        assert pem_file.read_text().splitlines()[1] not in text
    assert mode_of(history) == 0o600


def test_rotation_timestamp_is_utc(key_path: Path) -> None:
    create_identity(key_path)
    local = NOW.astimezone(timezone(timedelta(hours=-5)))
    rotation = rotate_identity(key_path, local)
    assert rotation.backup_path.name == f"{KEY_FILE_NAME}.20260314T150926Z.bak"


def test_rotation_never_overwrites_a_backup(key_path: Path) -> None:
    create_identity(key_path)
    first = rotate_identity(key_path, NOW)
    current = key_path.read_bytes()
    backup = first.backup_path.read_bytes()
    with pytest.raises(IdentityError, match=r"refusing to rotate: backup .* already exists"):
        rotate_identity(key_path, NOW)
    assert key_path.read_bytes() == current
    assert first.backup_path.read_bytes() == backup


def test_rotation_refuses_an_unsafe_or_missing_key(key_path: Path) -> None:
    with pytest.raises(IdentityError, match="does not exist"):
        rotate_identity(key_path, NOW)
    create_identity(key_path)
    key_path.chmod(0o644)
    with pytest.raises(IdentityError, match="readable by group or others"):
        rotate_identity(key_path, NOW)
    assert not list(key_path.parent.glob("*.bak"))


def test_rotation_needs_an_aware_time(key_path: Path) -> None:
    create_identity(key_path)
    with pytest.raises(ValueError, match="timezone-aware"):
        rotate_identity(key_path, datetime(2026, 1, 1))  # naive on purpose
