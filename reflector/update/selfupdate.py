"""Signed self-update: the I/O shell around `minisign` and `manifest` (spec §9.3).

Order of trust, and why:
1. fetch the manifest and its `.minisig` (both small, size-bounded) and verify the signature
   with the configured public key before parsing a byte of the manifest;
2. decide from the signed version (downgrades refused unless forced: an old signed manifest
   stays validly signed forever);
3. fetch the artifact into a temp file next to the target, bounded by the signed size, and
   check size and SHA-256 against the signed manifest;
4. only then link the current binary to `<target>.previous` and rename the new file over the
   target (atomic on one filesystem), fsyncing file and directory.
Nothing downloaded is ever executed; on any refusal the target keeps its bytes and its inode.

Sources are http(s) URLs or local paths. The signature is the manifest's source plus `.minisig`
(minisign's convention) and the artifact is the manifest's name resolved next to the manifest.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import platform
import ssl
import stat
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from reflector.errors import ReflectorError
from reflector.update.manifest import (
    MACHINE_TO_ARCH,
    MAX_MANIFEST_BYTES,
    Action,
    Artifact,
    Decision,
    Manifest,
    decide,
    parse_manifest,
    parse_version,
)
from reflector.update.minisign import (
    MAX_SIGNATURE_FILE_BYTES,
    PublicKey,
    SignatureError,
    Verified,
    parse_public_key,
    parse_signature,
    verify,
)

SIGNATURE_SUFFIX = ".minisig"
PREVIOUS_SUFFIX = ".previous"
# Per socket operation (connect, each read): a stalled mirror fails instead of hanging a run.
FETCH_TIMEOUT_S = 30.0
# Whole-download bound for the artifact: ~40 MB at a slow 100 kB/s, with margin; defeats a
# server that drips a byte every few seconds under the per-read timeout.
ARTIFACT_DEADLINE_S = 900.0
# Read in 1 MiB pieces: hashing and writing as we go keeps memory flat for a large binary.
CHUNK_BYTES = 1024 * 1024
_HTTP_SCHEMES = ("http", "https")


class UpdateError(ReflectorError):
    """A self-update was refused or failed; the installed binary is unchanged."""


@dataclass(frozen=True, kw_only=True)
class Offer:
    """A verified manifest and what to do about it on this host."""

    source: str
    signed_by: Verified
    manifest: Manifest
    artifact: Artifact
    decision: Decision


@dataclass(frozen=True, kw_only=True)
class Installed:
    target: Path
    previous: Path
    artifact: Artifact


# --- fetching: http(s) with bounds, or a local file ---


class _Readable(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _is_url(source: str) -> bool:
    return urllib.parse.urlsplit(source).scheme in _HTTP_SCHEMES


def _opener() -> urllib.request.OpenerDirector:
    """Only HTTP(S) and redirects between them: no file:, ftp: or data: by way of a redirect."""
    opener = urllib.request.OpenerDirector()
    for handler in (
        urllib.request.ProxyHandler(),
        urllib.request.HTTPHandler(),
        urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        urllib.request.HTTPRedirectHandler(),
        urllib.request.HTTPDefaultErrorHandler(),
        urllib.request.HTTPErrorProcessor(),
    ):
        opener.add_handler(handler)
    return opener


@contextlib.contextmanager
def _open_source(source: str, what: str) -> Iterator[_Readable]:
    try:
        if _is_url(source):
            with _opener().open(source, timeout=FETCH_TIMEOUT_S) as response:
                yield response
        else:
            if "://" in source:
                raise UpdateError(f"{what} {source}: only http://, https:// or a file path")
            with open(source, "rb") as handle:
                yield handle
    except urllib.error.HTTPError as exc:
        raise UpdateError(f"cannot fetch {what} {source}: HTTP {exc.code} {exc.reason}") from exc
    except urllib.error.URLError as exc:
        raise UpdateError(f"cannot fetch {what} {source}: {exc.reason}") from exc
    except (OSError, ValueError) as exc:
        raise UpdateError(f"cannot fetch {what} {source}: {exc}") from exc


def _copy_bounded(
    reader: _Readable, sink: BinaryIO | None, *, limit: int, deadline: float, what: str
) -> tuple[bytes, int, str]:
    """Read at most `limit` bytes (one more means too big) before `deadline` (monotonic).

    Returns the bytes (only when there is no sink), the count, and the SHA-256.
    """
    digest, kept, total = hashlib.sha256(), bytearray(), 0
    while True:
        chunk = reader.read(min(CHUNK_BYTES, limit + 1 - total))
        if not chunk:
            break
        total += len(chunk)
        if total > limit:
            raise UpdateError(f"{what} is larger than {limit} bytes; refused")
        if time.monotonic() > deadline:
            raise UpdateError(f"{what} took longer than {ARTIFACT_DEADLINE_S:.0f} s; refused")
        digest.update(chunk)
        if sink is None:
            kept += chunk
            continue
        try:
            sink.write(chunk)
        except OSError as exc:
            raise UpdateError(f"cannot write the downloaded {what}: {exc.strerror}") from exc
    return bytes(kept), total, digest.hexdigest()


def fetch_bytes(source: str, *, limit: int, what: str) -> bytes:
    """A small document (manifest, signature, key) from a URL or path, at most `limit` bytes."""
    with _open_source(source, what) as reader:
        deadline = time.monotonic() + FETCH_TIMEOUT_S * 4
        data, _, _ = _copy_bounded(reader, None, limit=limit, deadline=deadline, what=what)
    return data


def signature_source(manifest_source: str) -> str:
    return manifest_source + SIGNATURE_SUFFIX


def artifact_source(manifest_source: str, name: str) -> str:
    if _is_url(manifest_source):
        return urllib.parse.urljoin(manifest_source, urllib.parse.quote(name))
    return str(Path(manifest_source).parent / name)


# --- the steps ---


def host_arch() -> str:
    machine = platform.machine()
    try:
        return MACHINE_TO_ARCH[machine]
    except KeyError:
        raise UpdateError(f"no release binaries are built for machine {machine!r}") from None


def running_binary() -> Path:
    """The single binary this process runs from; a pip-installed reflector is not one."""
    if not getattr(sys, "frozen", False):
        raise UpdateError(
            "self-update replaces the single-file binary, but this reflector runs from a Python"
            f" environment ({sys.executable}); upgrade it the way it was installed"
        )
    return Path(sys.executable).resolve()


def load_public_key(path: Path) -> PublicKey:
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise UpdateError(f"cannot read the update public key {path}: {exc.strerror}") from exc
    try:
        return parse_public_key(text)
    except SignatureError as exc:
        raise UpdateError(f"update public key {path}: {exc}") from exc


def check(
    manifest_source: str, public_key: PublicKey, *, current_version: str, arch: str, force: bool
) -> Offer:
    """Fetch and verify the signed manifest, and decide; downloads no binary."""
    data = fetch_bytes(manifest_source, limit=MAX_MANIFEST_BYTES, what="manifest")
    sig_src = signature_source(manifest_source)
    sig_text = fetch_bytes(sig_src, limit=MAX_SIGNATURE_FILE_BYTES, what="signature")
    try:
        signed_by = verify(data, parse_signature(sig_text), public_key)
    except SignatureError as exc:
        raise UpdateError(f"manifest {manifest_source} refused: {exc}") from exc
    manifest = parse_manifest(data)
    artifact = manifest.artifact_for("linux", arch)
    decision = decide(parse_version(current_version), manifest.version, force=force)
    return Offer(
        source=manifest_source,
        signed_by=signed_by,
        manifest=manifest,
        artifact=artifact,
        decision=decision,
    )


def previous_path(target: Path) -> Path:
    return target.with_name(target.name + PREVIOUS_SUFFIX)


@contextlib.contextmanager
def _directory_lock(directory: Path) -> Iterator[int]:
    """An exclusive flock on the target's directory: two updates never interleave renames."""
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as exc:
        raise UpdateError(f"cannot open {directory}: {exc.strerror}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UpdateError(f"another update is running in {directory}") from None
        yield fd
    finally:
        os.close(fd)


def _download_verified(offer: Offer, target: Path) -> Path:
    """The artifact in a private temp file next to `target`, checked against the manifest."""
    artifact = offer.artifact
    source = artifact_source(offer.source, artifact.name)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".new", dir=target.parent)
    except OSError as exc:
        raise UpdateError(f"cannot write next to {target}: {exc.strerror}") from exc
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as sink, _open_source(source, "artifact") as reader:
            deadline = time.monotonic() + ARTIFACT_DEADLINE_S
            _, size, digest = _copy_bounded(
                reader, sink, limit=artifact.size, deadline=deadline, what=f"artifact {source}"
            )
            if size != artifact.size:
                raise UpdateError(
                    f"artifact {source} is {size} bytes, the signed manifest says {artifact.size}"
                )
            if digest != artifact.sha256:
                raise UpdateError(
                    f"artifact {source} has SHA-256 {digest}, the signed manifest says"
                    f" {artifact.sha256}"
                )
            sink.flush()
            os.fsync(sink.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp


def _match_mode(new: Path, old: Path) -> None:
    """The new binary gets the old one's permission bits and, where we may, its owner."""
    st = old.stat()
    os.chmod(new, stat.S_IMODE(st.st_mode))
    if os.geteuid() == 0:
        os.chown(new, st.st_uid, st.st_gid)


def _replace_keeping_previous(new: Path, target: Path, dir_fd: int) -> Path:
    """`target` becomes `new`; the old inode lives on as `<target>.previous`. Atomic renames."""
    previous = previous_path(target)
    link_tmp = target.with_name(f".{target.name}.previous.tmp")
    link_tmp.unlink(missing_ok=True)
    os.link(target, link_tmp)
    os.replace(link_tmp, previous)
    os.replace(new, target)
    os.fsync(dir_fd)
    return previous


def install(offer: Offer, target: Path) -> Installed:
    """Download, verify and atomically install the offered artifact over `target`."""
    if offer.decision.action is not Action.INSTALL:
        raise UpdateError(offer.decision.reason)
    if not target.is_file():
        raise UpdateError(f"{target} is not a file to replace")
    with _directory_lock(target.parent) as dir_fd:
        new = _download_verified(offer, target)
        try:
            _match_mode(new, target)
            previous = _replace_keeping_previous(new, target, dir_fd)
        except OSError as exc:
            raise UpdateError(f"cannot replace {target}: {exc.strerror}") from exc
        finally:
            new.unlink(missing_ok=True)
    return Installed(target=target, previous=previous, artifact=offer.artifact)


def rollback(target: Path) -> Path:
    """Swap `target` and `<target>.previous` (so a second rollback undoes the first)."""
    previous = previous_path(target)
    if not previous.is_file():
        raise UpdateError(f"nothing to roll back to: {previous} does not exist")
    swap = target.with_name(f".{target.name}.rollback.tmp")
    with _directory_lock(target.parent) as dir_fd:
        try:
            swap.unlink(missing_ok=True)
            os.link(target, swap)
            os.replace(previous, target)
            os.replace(swap, previous)
            os.fsync(dir_fd)
        except OSError as exc:
            swap.unlink(missing_ok=True)
            raise UpdateError(f"cannot roll back {target}: {exc.strerror}") from exc
    return previous
