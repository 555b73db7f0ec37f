"""Fixtures for the unit tests that check what an ordinary user may or may not do."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest

# The `nobody` user of Debian (and most distributions).
NOBODY_UID = 65534


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory an unprivileged user may traverse (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix="reflector-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


@contextmanager
def _as_nobody() -> Iterator[None]:
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(NOBODY_UID)
    try:
        yield
    finally:
        os.seteuid(0)


@pytest.fixture
def unprivileged() -> Callable[[], AbstractContextManager[None]]:
    """`with unprivileged():` runs the block as an ordinary user (as root: euid nobody)."""
    return _as_nobody
