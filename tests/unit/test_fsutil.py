"""File helpers: atomic replacement with exact modes, exclusive creation, private directories,
and files that root creates in another user's directory belonging to that user."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

from reflector.errors import ReflectorError
from reflector.fsutil import atomic_create, atomic_write, ensure_private_dir, open_owned

# The conventional uid of "nobody"; any uid that owns nothing here would do.
NOBODY_UID = 65534


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@contextmanager
def umask(value: int) -> Iterator[None]:
    old = os.umask(value)
    try:
        yield
    finally:
        os.umask(old)


def test_atomic_write_creates_file_with_exact_mode(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    with umask(0o077):
        atomic_write(target, b"public", 0o644)  # umask narrower than the mode: still 0644
    with umask(0o000):
        atomic_write(tmp_path / "key", b"private", 0o600)  # umask wider: still 0600
    assert target.read_bytes() == b"public"
    assert mode_of(target) == 0o644
    assert mode_of(tmp_path / "key") == 0o600


def test_atomic_write_replaces_content_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "state"
    target.write_bytes(b"old")
    atomic_write(target, b"new" * 10_000, 0o600)
    assert target.read_bytes() == b"new" * 10_000
    assert sorted(tmp_path.iterdir()) == [target]


def test_temp_file_never_has_a_wider_mode_than_requested(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "key"
    seen: list[int] = []
    real_replace = os.replace

    def inspecting_replace(src: Path, dst: Path) -> None:
        seen.append(mode_of(Path(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", inspecting_replace)
    with umask(0o000):
        atomic_write(target, b"secret", 0o600)
    assert seen == [0o600]


def test_failed_write_keeps_old_file_and_removes_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Fault injection: the disk refuses to flush. The original must be untouched.
    target = tmp_path / "key"
    target.write_bytes(b"original")

    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="Input/output error"):
        atomic_write(target, b"replacement", 0o600)
    assert target.read_bytes() == b"original"
    assert sorted(tmp_path.iterdir()) == [target]


def test_failed_rename_removes_temp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "key"

    def failing_replace(src: Path, dst: Path) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="No space left"):
        atomic_write(target, b"data", 0o600)
    assert list(tmp_path.iterdir()) == []


def test_atomic_write_into_missing_directory_raises_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        atomic_write(tmp_path / "absent" / "file", b"data", 0o600)


def test_atomic_write_does_not_follow_a_symlink_at_the_target(tmp_path: Path) -> None:
    # rename(2) replaces the link itself; the file it pointed at is untouched.
    victim = tmp_path / "victim"
    victim.write_bytes(b"untouched")
    link = tmp_path / "key"
    link.symlink_to(victim)
    atomic_write(link, b"new", 0o600)
    assert not link.is_symlink()
    assert link.read_bytes() == b"new"
    assert victim.read_bytes() == b"untouched"


def test_atomic_create_writes_a_new_file(tmp_path: Path) -> None:
    target = tmp_path / "key"
    atomic_create(target, b"fresh", 0o600)
    assert target.read_bytes() == b"fresh"
    assert mode_of(target) == 0o600
    assert target.stat().st_nlink == 1  # the temporary link is gone
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_create_never_overwrites(tmp_path: Path) -> None:
    target = tmp_path / "key"
    target.write_bytes(b"precious")
    with pytest.raises(FileExistsError):
        atomic_create(target, b"fresh", 0o600)
    assert target.read_bytes() == b"precious"
    assert sorted(tmp_path.iterdir()) == [target]


def test_atomic_create_refuses_a_dangling_symlink(tmp_path: Path) -> None:
    link = tmp_path / "key"
    link.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(FileExistsError):
        atomic_create(link, b"fresh", 0o600)
    assert not (tmp_path / "elsewhere").exists()


def test_ensure_private_dir_creates_parents_and_leaf_0700(tmp_path: Path) -> None:
    leaf = tmp_path / "a" / "b" / "reflector"
    with umask(0o022):
        ensure_private_dir(leaf)
    assert leaf.is_dir()
    assert mode_of(leaf) == 0o700


def test_ensure_private_dir_sets_0700_even_under_a_strange_umask(tmp_path: Path) -> None:
    leaf = tmp_path / "reflector"
    with umask(0o277):
        ensure_private_dir(leaf)
    assert mode_of(leaf) == 0o700


def test_ensure_private_dir_tightens_an_open_directory_we_own(tmp_path: Path) -> None:
    leaf = tmp_path / "reflector"
    leaf.mkdir()
    leaf.chmod(0o755)
    (leaf / "existing").write_bytes(b"kept")
    ensure_private_dir(leaf)
    assert mode_of(leaf) == 0o700
    assert (leaf / "existing").read_bytes() == b"kept"


def test_ensure_private_dir_leaves_a_private_directory_alone(tmp_path: Path) -> None:
    leaf = tmp_path / "reflector"
    leaf.mkdir(mode=0o700)
    before = leaf.stat()
    ensure_private_dir(leaf)
    assert leaf.stat().st_ctime_ns == before.st_ctime_ns  # no chmod happened


def test_ensure_private_dir_refuses_a_sticky_shared_directory(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(ReflectorError, match=f"{shared} is a shared directory \\(mode 1777\\)"):
        ensure_private_dir(shared)
    assert mode_of(shared) == 0o1777


def test_ensure_private_dir_rejects_a_file(tmp_path: Path) -> None:
    path = tmp_path / "file"
    path.write_bytes(b"")
    with pytest.raises(ReflectorError, match=f"{path} exists but is not a directory"):
        ensure_private_dir(path)


def test_ensure_private_dir_names_path_and_os_reason_when_it_cannot_create(
    tmp_path: Path,
) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    target = blocker / "reflector"
    with pytest.raises(ReflectorError, match=f"cannot create directory {target}: Not a directory"):
        ensure_private_dir(target)


def test_ensure_private_dir_reports_permission_denied_creating(
    shared_tmp: Path, unprivileged: Callable[[], AbstractContextManager[None]]
) -> None:
    locked = shared_tmp / "locked"
    locked.mkdir(mode=0o555)
    with unprivileged(), pytest.raises(ReflectorError) as caught:
        ensure_private_dir(locked / "reflector")
    assert str(caught.value) == f"cannot create directory {locked / 'reflector'}: Permission denied"


def test_ensure_private_dir_reports_a_directory_it_cannot_write(
    shared_tmp: Path, unprivileged: Callable[[], AbstractContextManager[None]]
) -> None:
    # Someone else's directory: we neither tighten it nor pretend we can use it.
    foreign = shared_tmp / "foreign"
    foreign.mkdir(mode=0o755)
    if os.geteuid() != 0:
        foreign.chmod(0o555)
    with unprivileged(), pytest.raises(ReflectorError) as caught:
        ensure_private_dir(foreign)
    assert str(caught.value) == f"cannot use directory {foreign}: permission denied"
    assert mode_of(foreign) in (0o755, 0o555)


NOGROUP_GID = 65534
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="only root can create for others")


def owner_of(path: Path) -> tuple[int, int]:
    info = path.lstat()
    return info.st_uid, info.st_gid


@pytest.fixture
def service_dir(tmp_path: Path) -> Path:
    """A state dir as deployed: another user's (nobody:nogroup), 0700."""
    path = tmp_path / "state"
    path.mkdir(mode=0o700)
    if os.geteuid() == 0:
        os.chown(path, NOBODY_UID, NOGROUP_GID)
    return path


@needs_root
def test_as_root_atomic_writes_into_another_users_directory_belong_to_that_user(
    service_dir: Path,
) -> None:
    atomic_write(service_dir / "pairing.json", b"{}", 0o600)
    atomic_create(service_dir / "identity.ed25519", b"key", 0o600)
    for name in ("pairing.json", "identity.ed25519"):
        assert owner_of(service_dir / name) == (NOBODY_UID, NOGROUP_GID)
        assert mode_of(service_dir / name) == 0o600
    assert sorted(p.name for p in service_dir.iterdir()) == ["identity.ed25519", "pairing.json"]


@needs_root
def test_as_root_replacing_a_file_of_the_directory_owner_keeps_it_theirs(
    service_dir: Path,
) -> None:
    target = service_dir / "identity.ed25519"
    atomic_write(target, b"old", 0o600)
    atomic_write(target, b"new", 0o600)
    assert owner_of(target) == (NOBODY_UID, NOGROUP_GID)


@needs_root
def test_in_roots_own_directory_files_stay_roots(tmp_path: Path) -> None:
    atomic_write(tmp_path / "a", b"x", 0o600)
    os.close(open_owned(tmp_path / "b", os.O_WRONLY | os.O_CREAT, 0o600))
    assert owner_of(tmp_path / "a") == (0, 0)
    assert owner_of(tmp_path / "b") == (0, 0)


@needs_root
def test_open_owned_hands_over_a_file_it_creates_and_appends_to_an_existing_one(
    service_dir: Path,
) -> None:
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
    for line in (b"one\n", b"two\n"):
        fd = open_owned(service_dir / "peers.jsonl", flags, 0o600)
        os.write(fd, line)
        os.close(fd)
    assert (service_dir / "peers.jsonl").read_bytes() == b"one\ntwo\n"
    assert owner_of(service_dir / "peers.jsonl") == (NOBODY_UID, NOGROUP_GID)
    assert mode_of(service_dir / "peers.jsonl") == 0o600


@needs_root
def test_open_owned_never_gives_away_a_file_that_already_existed(service_dir: Path) -> None:
    # Chowning an existing name would hand over whatever a hard link planted there points to.
    existing = service_dir / "audit.jsonl"
    existing.write_bytes(b"")
    os.chown(existing, 0, 0)
    os.close(open_owned(existing, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600))
    assert owner_of(existing) == (0, 0)


def test_open_owned_keeps_os_open_errors(tmp_path: Path) -> None:
    present = tmp_path / "present"
    present.write_bytes(b"")
    with pytest.raises(FileExistsError):
        open_owned(present, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with pytest.raises(FileNotFoundError):
        open_owned(tmp_path / "absent", os.O_WRONLY, 0o600)
    link = tmp_path / "link"
    link.symlink_to(present)
    with pytest.raises(OSError, match="Too many levels of symbolic links"):
        open_owned(link, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
