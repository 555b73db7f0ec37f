"""Self-update end to end against a release served over HTTP on 127.0.0.1.

Reads as §9.3: a signed manifest is verified before anything else, then the artifact's size and
SHA-256; downgrades are refused unless forced; the binary is replaced atomically with the old
one kept for --rollback; and every refusal leaves the installed binary's bytes *and inode* as
they were, with no stray temp file next to it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from reflector import __version__
from reflector.errors import ConfigError
from reflector.update.cli import update_app
from reflector.update.manifest import Action, Artifact, artifact_name, format_manifest
from reflector.update.minisign import format_public_key, parse_public_key, sign
from reflector.update.selfupdate import (
    Installed,
    UpdateError,
    check,
    host_arch,
    install,
    previous_path,
    rollback,
    running_binary,
)

REPO = Path(__file__).resolve().parents[2]
OLD_BINARY = b"\x7fELF old reflector binary\n" * 100


@dataclass
class Release:
    """A release directory as the release tooling publishes it."""

    directory: Path
    key: Ed25519PrivateKey

    def publish(self, version: str, payload: bytes, *, name: str | None = None) -> str:
        """Write artifact, manifest and signature; return the manifest's file name."""
        arch = host_arch()
        art_name = artifact_name(version, "linux", arch)
        (self.directory / art_name).write_bytes(payload)
        art = Artifact(
            name=art_name,
            os="linux",
            arch=arch,
            sha256=hashlib.sha256(payload).hexdigest(),
            size=len(payload),
        )
        manifest_name = name or f"reflector-{version}.json"
        data = format_manifest(version, [art])
        (self.directory / manifest_name).write_bytes(data)
        sig = sign(data, self.key, trusted_comment=f"reflector release {version}")
        (self.directory / f"{manifest_name}.minisig").write_text(sig)
        return manifest_name

    @property
    def public_key_text(self) -> str:
        return format_public_key(self.key.public_key())


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A static HTTP server on 127.0.0.1 (never another address) in a thread."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def release(tmp_path: Path) -> Release:
    directory = tmp_path / "release"
    directory.mkdir()
    return Release(directory=directory, key=Ed25519PrivateKey.generate())


@pytest.fixture
def base_url(release: Release) -> Iterator[str]:
    with serve_directory(release.directory) as url:
        yield url


@pytest.fixture
def target(tmp_path: Path) -> Path:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = bindir / "reflector"
    path.write_bytes(OLD_BINARY)
    path.chmod(0o755)
    return path


def snapshot(target: Path) -> tuple[bytes, int, list[str]]:
    """What must not change on a refusal: the bytes, the inode, and the directory's listing."""
    return target.read_bytes(), target.stat().st_ino, sorted(os.listdir(target.parent))


def update(
    url: str, release: Release, target: Path, *, current: str = "0.1.0", force: bool = False
) -> Installed:
    offer = check(
        url,
        parse_public_key(release.public_key_text),
        current_version=current,
        arch=host_arch(),
        force=force,
    )
    return install(offer, target)


def test_newer_signed_release_replaces_the_binary_and_keeps_the_previous(
    release: Release, base_url: str, target: Path
) -> None:
    new = b"\x7fELF new reflector binary\n" * 300
    name = release.publish("0.2.0", new)
    old_inode = target.stat().st_ino
    done = update(base_url + name, release, target)
    assert target.read_bytes() == new
    assert target.stat().st_mode & 0o777 == 0o755
    assert done.previous == previous_path(target)
    assert done.previous.read_bytes() == OLD_BINARY
    assert done.previous.stat().st_ino == old_inode  # the old file itself, not a copy
    assert sorted(os.listdir(target.parent)) == ["reflector", "reflector.previous"]


def test_check_verifies_and_reports_without_downloading_the_binary(
    release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.2.0", b"new")
    (release.directory / artifact_name("0.2.0", "linux", host_arch())).unlink()
    before = snapshot(target)
    offer = check(
        base_url + name,
        parse_public_key(release.public_key_text),
        current_version="0.1.0",
        arch=host_arch(),
        force=False,
    )
    assert offer.decision.action is Action.INSTALL
    assert offer.signed_by.trusted_comment == "reflector release 0.2.0"
    assert snapshot(target) == before


def test_tampered_manifest_is_refused_and_nothing_replaced(
    release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.2.0", b"new")
    path = release.directory / name
    path.write_bytes(path.read_bytes().replace(b'"size": 3', b'"size": 4'))
    before = snapshot(target)
    with pytest.raises(UpdateError, match="refused: signature does not match the signed file"):
        update(base_url + name, release, target)
    assert snapshot(target) == before


def test_tampered_artifact_is_refused_and_nothing_replaced(
    release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.2.0", b"genuine binary")
    (release.directory / artifact_name("0.2.0", "linux", host_arch())).write_bytes(
        b"evil binary!!!"
    )
    before = snapshot(target)
    with pytest.raises(UpdateError, match=r"has SHA-256 .*, the signed manifest says"):
        update(base_url + name, release, target)
    assert snapshot(target) == before


@pytest.mark.parametrize(
    ("served", "reason"),
    [(b"genuine binary and more", "larger than 14 bytes"), (b"genuine", "is 7 bytes")],
)
def test_artifact_of_the_wrong_size_is_refused(
    release: Release, base_url: str, target: Path, served: bytes, reason: str
) -> None:
    name = release.publish("0.2.0", b"genuine binary")
    (release.directory / artifact_name("0.2.0", "linux", host_arch())).write_bytes(served)
    before = snapshot(target)
    with pytest.raises(UpdateError, match=reason):
        update(base_url + name, release, target)
    assert snapshot(target) == before


def test_manifest_signed_by_another_key_is_refused(
    release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.2.0", b"new")
    stranger = Release(directory=release.directory, key=Ed25519PrivateKey.generate())
    before = snapshot(target)
    with pytest.raises(UpdateError, match=r"signed by key [0-9A-F]{1,16}, not by the trusted key"):
        update(base_url + name, stranger, target)
    assert snapshot(target) == before


def test_replayed_older_manifest_is_refused_unless_forced(
    release: Release, base_url: str, target: Path
) -> None:
    old = release.publish("0.1.0", b"the 0.1.0 binary")
    before = snapshot(target)
    with pytest.raises(UpdateError, match=r"refusing to downgrade from 0.2.0 to 0.1.0"):
        update(base_url + old, release, target, current="0.2.0")
    assert snapshot(target) == before
    update(base_url + old, release, target, current="0.2.0", force=True)
    assert target.read_bytes() == b"the 0.1.0 binary"


def test_same_release_is_reported_up_to_date_and_not_reinstalled(
    release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.2.0", b"new")
    before = snapshot(target)
    with pytest.raises(UpdateError, match=r"0.2.0 is already the offered release"):
        update(base_url + name, release, target, current="0.2.0")
    assert snapshot(target) == before


def test_missing_signature_is_refused(release: Release, base_url: str, target: Path) -> None:
    name = release.publish("0.2.0", b"new")
    (release.directory / f"{name}.minisig").unlink()
    with pytest.raises(UpdateError, match=r"cannot fetch signature .*minisig: HTTP 404"):
        update(base_url + name, release, target)


def test_rollback_swaps_with_the_previous_binary(
    release: Release, base_url: str, target: Path
) -> None:
    new = b"new binary"
    update(base_url + release.publish("0.2.0", new), release, target)
    rollback(target)
    assert target.read_bytes() == OLD_BINARY
    assert previous_path(target).read_bytes() == new
    rollback(target)  # and back again
    assert target.read_bytes() == new
    assert sorted(os.listdir(target.parent)) == ["reflector", "reflector.previous"]


def test_rollback_without_a_previous_binary_is_refused(target: Path) -> None:
    before = snapshot(target)
    with pytest.raises(UpdateError, match="nothing to roll back to"):
        rollback(target)
    assert snapshot(target) == before


def test_a_local_manifest_file_works_like_a_url(release: Release, target: Path) -> None:
    name = release.publish("0.2.0", b"from a file")
    update(str(release.directory / name), release, target)
    assert target.read_bytes() == b"from a file"


def test_other_url_schemes_are_refused(release: Release, target: Path) -> None:
    with pytest.raises(UpdateError, match="only http://, https:// or a file path"):
        update("ftp://127.0.0.1/m.json", release, target)


def test_a_python_install_is_not_a_single_binary_to_replace() -> None:
    assert not getattr(sys, "frozen", False)
    with pytest.raises(UpdateError, match="runs from a Python environment"):
        running_binary()


# --- the command ---


def write_config(tmp_path: Path, *, enabled: bool) -> Path:
    path = tmp_path / "reflector.toml"
    path.write_text(
        f'[service]\nstate_dir = "{tmp_path / "state"}"\n'
        f"[updates]\nenabled = {str(enabled).lower()}\n"
    )
    return path


def run_cli(*args: str) -> tuple[int, str, BaseException | None]:
    result = CliRunner().invoke(update_app, list(args))
    return result.exit_code, result.output, result.exception


def test_command_is_refused_when_updates_are_disabled(
    tmp_path: Path, release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("99.0.0", b"new")
    before = snapshot(target)
    code, _, exc = run_cli(
        "-c",
        str(write_config(tmp_path, enabled=False)),
        "--manifest",
        base_url + name,
        "--binary",
        str(target),
    )
    assert code != 0
    assert isinstance(exc, ConfigError)
    assert "self-update is disabled on this host" in str(exc)
    assert snapshot(target) == before


def test_command_check_reports_and_install_replaces(
    tmp_path: Path, release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("99.0.0", b"new")
    key = tmp_path / "update.pub"
    key.write_text(release.public_key_text)
    common = [
        "-c",
        str(write_config(tmp_path, enabled=True)),
        "--manifest",
        base_url + name,
        "--public-key",
        str(key),
        "--binary",
        str(target),
    ]
    before = snapshot(target)
    code, out, exc = run_cli(*common, "--check")
    assert (code, exc) == (0, None)
    assert "release 99.0.0" in out and f"running {__version__}: install" in out
    assert snapshot(target) == before
    code, out, exc = run_cli(*common)
    assert (code, exc) == (0, None), out
    assert "installed reflector-99.0.0-linux-" in out
    assert target.read_bytes() == b"new"
    code, out, exc = run_cli(
        "-c", str(write_config(tmp_path, enabled=True)), "--rollback", "--binary", str(target)
    )
    assert (code, exc) == (0, None), out
    assert target.read_bytes() == OLD_BINARY


def test_command_refuses_a_replayed_old_release(
    tmp_path: Path, release: Release, base_url: str, target: Path
) -> None:
    name = release.publish("0.0.1", b"ancient")
    key = tmp_path / "update.pub"
    key.write_text(release.public_key_text)
    before = snapshot(target)
    code, _, exc = run_cli(
        "-c",
        str(write_config(tmp_path, enabled=True)),
        "--manifest",
        base_url + name,
        "--public-key",
        str(key),
        "--binary",
        str(target),
    )
    assert code != 0 and isinstance(exc, UpdateError)
    assert f"refusing to downgrade from {__version__} to 0.0.1" in str(exc)
    assert snapshot(target) == before


# --- the release tool: signs with the real minisign ---


def test_release_tool_signs_with_minisign_and_self_update_accepts_it(
    tmp_path: Path, target: Path
) -> None:
    minisign = shutil.which("minisign")
    assert minisign, "the minisign tool is missing: install the Debian package minisign"
    pub, sec = tmp_path / "k.pub", tmp_path / "k.sec"
    subprocess.run(
        [minisign, "-G", "-W", "-p", str(pub), "-s", str(sec)],
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
    )
    out = tmp_path / "out"
    out.mkdir()
    binary = out / artifact_name("99.1.0", "linux", host_arch())
    binary.write_bytes(b"release build")
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / ".ci" / "release_manifest.py"),
            "--key",
            str(sec),
            "--out",
            str(out),
            str(binary),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr
    manifest = out / "reflector-99.1.0.json"
    # The standard tool verifies what we publish...
    verified = subprocess.run(
        [minisign, "-V", "-m", str(manifest), "-p", str(pub)], capture_output=True, text=True
    )
    assert verified.returncode == 0, verified.stderr
    # ...and so does self-update, end to end.
    offer = check(
        str(manifest),
        parse_public_key(pub.read_bytes()),
        current_version="0.1.0",
        arch=host_arch(),
        force=False,
    )
    assert offer.signed_by.trusted_comment.startswith("reflector release 99.1.0")
    install(offer, target)
    assert target.read_bytes() == b"release build"
