"""Minisign keys and signatures: ours interoperate with the real `minisign` tool both ways, and
every alteration (message, trusted comment, key) is refused with its reason."""

from __future__ import annotations

import base64
import contextlib
import shutil
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given, settings
from hypothesis import strategies as st

from reflector.update.minisign import (
    MAX_COMMENT_BYTES,
    Algorithm,
    SignatureError,
    default_key_id,
    format_public_key,
    key_id_hex,
    parse_public_key,
    parse_signature,
    sign,
    verify_text,
)

MESSAGE = b'{"format": "reflector-release/1"}\n'


def minisign(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("minisign")
    assert exe, "the minisign tool is missing: install the Debian package minisign (make deps)"
    return subprocess.run(
        [exe, *args], cwd=cwd, capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=30
    )


@pytest.fixture
def minisign_keypair(tmp_path: Path) -> tuple[Path, Path]:
    """A real minisign key pair, unencrypted (-W), made by the tool itself."""
    pub, sec = tmp_path / "k.pub", tmp_path / "k.sec"
    done = minisign("-G", "-W", "-p", str(pub), "-s", str(sec), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    return pub, sec


@pytest.mark.parametrize("legacy", [False, True], ids=["prehashed-ED", "legacy-Ed"])
def test_minisign_signature_verifies_with_ours(
    tmp_path: Path, minisign_keypair: tuple[Path, Path], legacy: bool
) -> None:
    pub, sec = minisign_keypair
    (tmp_path / "m").write_bytes(MESSAGE)
    flags = ["-l"] if legacy else []
    done = minisign("-S", *flags, "-s", str(sec), "-m", "m", "-t", "release 0.2.0", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    verified = verify_text(MESSAGE, (tmp_path / "m.minisig").read_bytes(), pub.read_bytes())
    assert verified.trusted_comment == "release 0.2.0"
    assert verified.algorithm == ("Ed" if legacy else "ED")
    # The ID we print is the one minisign prints in the key's comment.
    assert pub.read_text().splitlines()[0].endswith(verified.key_id_hex)


@pytest.mark.parametrize("algorithm", ["ED", "Ed"])
def test_our_signature_verifies_with_minisign(tmp_path: Path, algorithm: Algorithm) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "m").write_bytes(MESSAGE)
    (tmp_path / "k.pub").write_text(format_public_key(key.public_key()))
    sig = sign(MESSAGE, key, trusted_comment="version:0.2.0", algorithm=algorithm)
    (tmp_path / "m.minisig").write_text(sig)
    done = minisign("-V", "-m", "m", "-p", "k.pub", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Trusted comment: version:0.2.0" in done.stdout
    # And minisign rejects it once the file changes.
    (tmp_path / "m").write_bytes(MESSAGE + b" ")
    assert minisign("-V", "-m", "m", "-p", "k.pub", cwd=tmp_path).returncode != 0


def test_minisign_requiring_prehash_accepts_our_default(tmp_path: Path) -> None:
    key = Ed25519PrivateKey.generate()
    (tmp_path / "m").write_bytes(MESSAGE)
    (tmp_path / "m.minisig").write_text(sign(MESSAGE, key, trusted_comment="t"))
    (tmp_path / "k.pub").write_text(format_public_key(key.public_key()))
    done = minisign("-V", "-H", "-m", "m", "-p", "k.pub", cwd=tmp_path)
    assert done.returncode == 0, done.stderr


def test_ours_round_trip_both_algorithms() -> None:
    key = Ed25519PrivateKey.generate()
    pub = format_public_key(key.public_key())
    for algorithm in ("ED", "Ed"):
        sig = sign(MESSAGE, key, trusted_comment="tc", algorithm=algorithm)
        assert verify_text(MESSAGE, sig, pub).trusted_comment == "tc"


def test_altered_message_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign(MESSAGE, key, trusted_comment="tc")
    with pytest.raises(SignatureError, match="does not match the signed file"):
        verify_text(MESSAGE.replace(b"1", b"2"), sig, format_public_key(key.public_key()))


def test_altered_trusted_comment_is_refused() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign(MESSAGE, key, trusted_comment="version:0.2.0")
    forged = sig.replace("version:0.2.0", "version:9.9.9")
    with pytest.raises(SignatureError, match="trusted comment signature does not verify"):
        verify_text(MESSAGE, forged, format_public_key(key.public_key()))


def test_untrusted_comment_is_not_covered_and_not_used() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign(MESSAGE, key, trusted_comment="tc").replace("signature from", "anything at all")
    assert verify_text(MESSAGE, sig, format_public_key(key.public_key())).trusted_comment == "tc"


@pytest.mark.parametrize(
    ("key_id", "shown"),
    [
        (bytes.fromhex("59ad29f42668af09"), "9AF6826F429AD59"),  # top nibble zero: not padded
        (bytes.fromhex("0100000000000000"), "1"),
        (bytes.fromhex("efcdab8967452301"), "123456789ABCDEF"),
        (bytes.fromhex("ffffffffffffffff"), "FFFFFFFFFFFFFFFF"),
    ],
)
def test_key_id_is_shown_as_minisign_prints_it(key_id: bytes, shown: str) -> None:
    """minisign prints the little-endian key number with %PRIX64: upper case, no leading zeros."""
    assert key_id_hex(key_id) == shown


def test_signature_from_another_key_names_both_ids() -> None:
    signer, trusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    sig = sign(MESSAGE, signer, trusted_comment="tc")
    expected = key_id_hex(default_key_id(trusted.public_key()))
    with pytest.raises(SignatureError, match=f"not by the trusted key {expected}"):
        verify_text(MESSAGE, sig, format_public_key(trusted.public_key()))


def test_another_key_claiming_the_trusted_key_id_is_refused() -> None:
    signer, trusted = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    stolen_id = default_key_id(trusted.public_key())
    sig = sign(MESSAGE, signer, trusted_comment="tc", key_id=stolen_id)
    with pytest.raises(SignatureError, match="does not match"):
        verify_text(MESSAGE, sig, format_public_key(trusted.public_key()))


def test_public_key_accepts_the_bare_base64_line() -> None:
    key = Ed25519PrivateKey.generate()
    text = format_public_key(key.public_key())
    assert parse_public_key(text.splitlines()[1]) == parse_public_key(text)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "comment line and one base64 line"),
        ("untrusted comment: x\n!!!\n", "not valid base64"),
        ("untrusted comment: x\n" + base64.b64encode(b"Ed" + bytes(10)).decode(), "decodes to 12"),
        ("untrusted comment: x\n" + base64.b64encode(b"XX" + bytes(40)).decode(), "not Ed25519"),
        ("hello: x\n" + base64.b64encode(b"Ed" + bytes(40)).decode(), "must start with"),
        ("a\nb\nc\n", "comment line and one base64 line"),
    ],
)
def test_malformed_public_keys_are_refused(text: str, reason: str) -> None:
    with pytest.raises(SignatureError, match=reason):
        parse_public_key(text)


def _signature_lines() -> list[str]:
    key = Ed25519PrivateKey.generate()
    return sign(MESSAGE, key, trusted_comment="tc").splitlines()


def test_malformed_signatures_are_refused() -> None:
    lines = _signature_lines()
    cases = {
        "\n".join(lines[:3]): "3 lines, expected 4",
        "\n".join(["comment: x", *lines[1:]]): "must start with",
        "\n".join([lines[0], lines[1], "comment: x", lines[3]]): 'start with "trusted comment:"',
        "\n".join([lines[0], "AAAA", *lines[2:]]): "decodes to 3 bytes",
        "\n".join([lines[0], lines[1], lines[2], "AAAA"]): "decodes to 3 bytes",
    }
    blob = bytearray(base64.b64decode(lines[1]))
    blob[:2] = b"Zz"
    cases["\n".join([lines[0], base64.b64encode(blob).decode(), *lines[2:]])] = "neither"
    long_comment = "trusted comment: " + "x" * MAX_COMMENT_BYTES
    cases["\n".join([lines[0], lines[1], long_comment, lines[3]])] = "longer than"
    for text, reason in cases.items():
        with pytest.raises(SignatureError, match=reason):
            parse_signature(text)


def test_crlf_line_endings_are_accepted() -> None:
    key = Ed25519PrivateKey.generate()
    sig = sign(MESSAGE, key, trusted_comment="tc").replace("\n", "\r\n")
    pub = format_public_key(key.public_key()).replace("\n", "\r\n")
    assert verify_text(MESSAGE, sig, pub).trusted_comment == "tc"


def test_oversized_and_non_utf8_files_are_refused_before_parsing() -> None:
    with pytest.raises(SignatureError, match="more than"):
        parse_signature(b"x" * 5000)
    with pytest.raises(SignatureError, match="not UTF-8"):
        parse_signature(b"\xff\xfe")


def test_sign_refuses_multi_line_comments() -> None:
    key = Ed25519PrivateKey.generate()
    with pytest.raises(SignatureError, match="one line"):
        sign(MESSAGE, key, trusted_comment="a\nb")


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=400))
def test_random_signature_bytes_raise_only_signature_error(data: bytes) -> None:
    with contextlib.suppress(SignatureError):
        parse_signature(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_public_key_bytes_raise_only_signature_error(data: bytes) -> None:
    with contextlib.suppress(SignatureError):
        parse_public_key(data)
