"""Small, careful file-system helpers for secrets and state files.

Why this module exists: a key file that is half-written after a power cut, or briefly
world-readable between ``open`` and ``chmod``, is a real failure. Every write here goes to a
temporary file in the same directory, created exclusively with its final mode (never wider),
is flushed to disk, and is then renamed (or linked) into place, and the directory is flushed so
the rename itself survives a crash.

Ownership: on a deployed host the state directory belongs to the service user (`reflector`,
mode 0700), while operators often run `reflector pair` or `reflector peers add` as root. A file
root creates there would be root's and 0600, so the service could no longer read its own
allowlist or pairing window. So a file created here by root in a directory owned by another
user is given to that user (and the directory's group) before it becomes visible: every writer
of state files goes through `atomic_write`, `atomic_create` or `open_owned`. Only files we create
are handed over; an existing file keeps its owner (chowning an existing name could be turned
against root with a planted hard link).
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import stat
from pathlib import Path

from reflector.errors import ReflectorError

__all__ = [
    "PRIVATE_DIR_MODE",
    "atomic_create",
    "atomic_write",
    "ensure_private_dir",
    "open_owned",
]

# Owner-only: the directory holds the identity key; nobody else needs to list or enter it.
PRIVATE_DIR_MODE = 0o700
# Permission bits that let group or others in.
_GROUP_OTHER_BITS = 0o077
# Random suffix length of temporary names: collisions between concurrent writers are then
# practically impossible, and O_EXCL catches the rest.
_TEMP_SUFFIX_BYTES = 8
# Never follow a symlink planted at the temporary name; never become a controlling tty.
_CREATE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
# `open_owned` creates exclusively, or else opens the existing file; if the file vanishes between
# the two attempts it tries again, this many times (only the directory's owner can cause that).
_OPEN_ATTEMPTS = 3
_ROOT_UID = 0


def atomic_write(path: Path, data: bytes, mode: int) -> None:
    """Replace `path` with `data` so readers see either the old or the new file, never a mix.

    The file has permission bits `mode` exactly from the moment it exists. Raises OSError
    (the caller knows what the file is and words the operator-facing error).
    """
    temp = _write_temp(path, data, mode)
    try:
        os.replace(temp, path)
    except BaseException:
        _unlink_quietly(temp)
        raise
    _fsync_dir(path.parent)


def atomic_create(path: Path, data: bytes, mode: int) -> None:
    """Like `atomic_write`, but never replaces an existing file: raises FileExistsError.

    Used for things that must never be overwritten (a freshly generated key, a key backup): the
    final step is link(2), which fails atomically if the name exists, even if another process
    created it a moment ago.
    """
    temp = _write_temp(path, data, mode)
    try:
        os.link(temp, path, follow_symlinks=False)
    finally:
        _unlink_quietly(temp)
    _fsync_dir(path.parent)


def open_owned(path: Path, flags: int, mode: int) -> int:
    """`os.open(path, flags, mode)`, except that a file this call creates (`flags` has
    O_CREAT) gets the directory's owner when we are root (see the module docstring).

    The file is created exclusively first, so we know whether it is ours to hand over; an
    existing file is opened without O_CREAT and keeps its owner. Returns the descriptor; raises
    OSError like `os.open` (FileExistsError if `flags` has O_EXCL and the name exists).
    """
    if not flags & os.O_CREAT:
        return os.open(path, flags)
    for _ in range(_OPEN_ATTEMPTS):
        try:
            fd = os.open(path, flags | os.O_EXCL, mode)
        except FileExistsError:
            if flags & os.O_EXCL:
                raise
            try:
                return os.open(path, flags & ~os.O_CREAT)
            except FileNotFoundError:
                continue  # removed in between: create it after all
        try:
            _give_to_directory_owner(fd, path.parent)
        except BaseException:
            os.close(fd)
            _unlink_quietly(path)
            raise
        return fd
    raise FileNotFoundError(errno.ENOENT, "kept disappearing while being opened", str(path))


def ensure_private_dir(path: Path) -> None:
    """Make sure `path` is a directory only its owner can use; create it (and parents) if needed.

    An existing directory we own with group/other bits is tightened to 0700. A sticky
    directory (such as /tmp) is shared by design, so it is refused rather than tightened.
    Raises ReflectorError naming the path and the OS reason if the directory cannot be
    created, entered, read or written.
    """
    try:
        created = _make_dir(path)
        info = path.stat()
    except OSError as exc:
        raise ReflectorError(f"cannot create directory {path}: {_reason(exc)}") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise ReflectorError(f"{path} exists but is not a directory")
    if created or _should_tighten(path, info):
        _chmod_private(path)
    if not os.access(path, os.R_OK | os.W_OK | os.X_OK, effective_ids=True):
        raise ReflectorError(f"cannot use directory {path}: permission denied")


def _make_dir(path: Path) -> bool:
    """Create `path` (and parents); True if the leaf was created by us."""
    try:
        path.mkdir(mode=PRIVATE_DIR_MODE, parents=True)
    except FileExistsError:
        return False
    return True


def _should_tighten(path: Path, info: os.stat_result) -> bool:
    if not info.st_mode & _GROUP_OTHER_BITS or info.st_uid != os.geteuid():
        return False
    if info.st_mode & stat.S_ISVTX:
        raise ReflectorError(
            f"{path} is a shared directory (mode {stat.S_IMODE(info.st_mode):04o}); "
            "use a directory of its own"
        )
    return True


def _chmod_private(path: Path) -> None:
    """Set exactly 0700: mkdir's mode is filtered by the umask, and an old dir may be wider."""
    try:
        path.chmod(PRIVATE_DIR_MODE)
    except OSError as exc:
        raise ReflectorError(f"cannot restrict permissions of {path}: {_reason(exc)}") from exc


def _write_temp(path: Path, data: bytes, mode: int) -> Path:
    """Write `data` to a new temporary file next to `path`, flushed to disk; return its path."""
    temp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(_TEMP_SUFFIX_BYTES)}")
    fd = os.open(temp, _CREATE_FLAGS, mode)
    try:
        # The umask may have removed bits from `mode`; set it exactly (still never wider).
        os.fchmod(fd, mode)
        _give_to_directory_owner(fd, path.parent)
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(temp)
        raise
    os.close(fd)
    return temp


def _give_to_directory_owner(fd: int, directory: Path) -> None:
    """As root, hand a file we just created to the owner of its directory, if that is not root.

    Without root there is nothing to do (a file we create is ours, and the directory is one we
    may write). The mode is left as it is: fchown by root clears only set-id bits.
    """
    if os.geteuid() != _ROOT_UID:
        return
    info = os.stat(directory)
    if info.st_uid != _ROOT_UID:
        os.fchown(fd, info.st_uid, info.st_gid)


def _fsync_dir(directory: Path) -> None:
    """Flush a directory so a rename or link in it survives a crash."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _unlink_quietly(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc)
