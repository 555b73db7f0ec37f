"""Per-peer usage accounting that survives restarts: one sqlite database in the state dir.

Quotas ("10 tests per hour", "5 GB per day", cooldowns) would be worthless if restarting the
service reset them, so every granted test is a row in `<state_dir>/accounting.sqlite3`:
who, what, when it started and ended (as `Instant`s, see `clock`), how many bytes the data plane
counted and how it ended. Bytes come only from the caller's data-plane counters, never from the
peer's own report.

Queries take `now` and measure ages with `clock.age_seconds`, so a wall-clock step neither
reopens nor wrongly closes a window. The policy never sees the database: the manager asks the
store for a `PeerUsage` value and hands that to the pure `policy.decide`. `Ledger` is the
interface the manager needs; `UsageStore` is its sqlite implementation.
"""

from __future__ import annotations

import os
import sqlite3
import stat
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from reflector.errors import ReflectorError
from reflector.fsutil import ensure_private_dir, open_owned
from reflector.sessions.clock import Instant, age_seconds

__all__ = [
    "DAY_SEC",
    "DB_FILE_NAME",
    "HOUR_SEC",
    "RETENTION_SEC",
    "SCHEMA_VERSION",
    "Ledger",
    "PeerUsage",
    "UsageStore",
]

HOUR_SEC: Final = 3_600
DAY_SEC: Final = 86_400
DB_FILE_NAME: Final = "accounting.sqlite3"
# Owner-only: the file names every peer and when it tested.
DB_FILE_MODE: Final = 0o600
# Bump when the table layout changes; kept in PRAGMA user_version.
SCHEMA_VERSION: Final = 1
# The longest window any quota looks back is a day; three days more lets an operator look at
# yesterday's usage after a long weekend without the file growing without bound.
RETENTION_SEC: Final = 3 * DAY_SEC
# `reflector status` may read while the service writes; WAL lets readers in, and a writer that
# meets a checkpoint waits this long (ms) rather than failing at once.
BUSY_TIMEOUT_MS: Final = 2_000
# Largest byte counter we accept in one delta: sqlite integers are signed 64-bit.
MAX_BYTES_DELTA: Final = 2**62

_SCHEMA: Final = """
CREATE TABLE tests (
    session_id       TEXT PRIMARY KEY,
    peer_id          TEXT NOT NULL,
    test_type        TEXT NOT NULL,
    started_wall     REAL NOT NULL,
    started_boot     TEXT NOT NULL,
    started_boottime REAL NOT NULL,
    ended_wall       REAL,
    ended_boot       TEXT,
    ended_boottime   REAL,
    bytes_rx         INTEGER NOT NULL DEFAULT 0 CHECK (bytes_rx >= 0),
    bytes_tx         INTEGER NOT NULL DEFAULT 0 CHECK (bytes_tx >= 0),
    outcome          TEXT
);
CREATE INDEX tests_by_peer ON tests (peer_id, started_boot, started_boottime);
"""

# The SQL below is assembled only from these constant fragments (hence the S608 noqa marks);
# every value is a bound parameter.
# "Started less than :window seconds before now", written so that it is exactly
# `age_seconds(started, now) < window`: same boot compares boottime, another boot wall time.
_STARTED_WITHIN: Final = (
    "((started_boot = :boot AND started_boottime > :boottime - :window)"
    " OR (started_boot != :boot AND started_wall > :wall - :window))"
)
_ENDED_WITHIN: Final = (
    "ended_wall IS NOT NULL AND ((ended_boot = :boot AND ended_boottime > :boottime - :window)"
    " OR (ended_boot != :boot AND ended_wall > :wall - :window))"
)


@dataclass(frozen=True, kw_only=True)
class PeerUsage:
    """What one peer has used recently, as ages relative to the `now` it was computed for.

    `start_ages`: ages of the tests started in the last hour, oldest first.
    `byte_records`: (age, bytes rx+tx) of the tests started in the last 24 h, oldest first.
    `last_end_age`: seconds since the peer's most recent test ended (within a day), or None.
    """

    start_ages: tuple[float, ...] = ()
    byte_records: tuple[tuple[float, int], ...] = ()
    last_end_age: float | None = None

    @property
    def tests_last_hour(self) -> int:
        return len(self.start_ages)

    @property
    def bytes_last_day(self) -> int:
        return sum(b for _, b in self.byte_records)


class Ledger(Protocol):
    """The accounting the session manager needs; `UsageStore` implements it on sqlite."""

    def record_start(
        self, *, session_id: str, peer_id: str, test_type: str, started: Instant
    ) -> None: ...

    def record_bytes(self, session_id: str, rx: int, tx: int) -> bool: ...

    def record_end(self, session_id: str, ended: Instant, outcome: str) -> None: ...

    def peer_usage(self, peer_id: str, now: Instant) -> PeerUsage: ...

    def peers_seen(self, now: Instant, within: float = DAY_SEC) -> list[str]: ...

    def close_unfinished(self, now: Instant, outcome: str) -> int: ...

    def prune(self, now: Instant) -> int: ...


class LedgerError(ReflectorError):
    """The usage database cannot be read or written (e.g. the state dir's disk is full)."""


class UsageStore:
    """The sqlite ledger. Open it with `UsageStore.open(state_dir)`; close it with `close()`."""

    def __init__(self, conn: sqlite3.Connection, path: Path) -> None:
        self._conn = conn
        self.path = path

    @classmethod
    def open(cls, state_dir: Path) -> UsageStore:
        """Open (creating if needed) the database; raise ReflectorError naming the file."""
        ensure_private_dir(state_dir)
        path = state_dir / DB_FILE_NAME
        try:
            _create_private_file(path)
            conn = sqlite3.connect(path, isolation_level=None)
        except OSError as exc:
            raise ReflectorError(f"cannot open {path}: {exc.strerror or exc}") from exc
        except sqlite3.Error as exc:
            raise ReflectorError(f"cannot open accounting database {path}: {exc}") from exc
        return cls._checked(conn, path, _configure)

    @classmethod
    def open_readonly(cls, state_dir: Path) -> UsageStore:
        """The server's ledger, opened so that nothing is created or changed by reading it.

        For `reflector status`, beside the running service (WAL lets a reader in). The file is
        opened once by hand first: sqlite would only say "unable to open database file", while
        the OS names the reason (typically: run as the service user or as root).
        Raises FileNotFoundError if there is no ledger, ReflectorError if it cannot be read.
        """
        path = state_dir / DB_FILE_NAME
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY))
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise ReflectorError(
                f"cannot read usage ledger {path}: {exc.strerror or exc}"
                " (run as the service user or root)"
            ) from exc
        try:
            conn = sqlite3.connect(
                f"{path.absolute().as_uri()}?mode=ro", uri=True, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise ReflectorError(f"cannot read usage ledger {path}: {exc}") from exc
        return cls._checked(conn, path, _check_readable)

    @classmethod
    def _checked(
        cls, conn: sqlite3.Connection, path: Path, check: Callable[[sqlite3.Connection, Path], None]
    ) -> UsageStore:
        """The store over `conn` once `check` accepts it; else `conn` is closed and it raises."""
        try:
            check(conn, path)
        except BaseException:
            conn.close()
            raise
        return cls(conn, path)

    def close(self) -> None:
        self._conn.close()

    def _execute(
        self, sql: str, params: Sequence[object] | Mapping[str, object] = ()
    ) -> sqlite3.Cursor:
        """Run one statement; any database failure (disk full, I/O error, corruption) becomes
        a LedgerError, which callers turn into a refusal rather than a crash."""
        try:
            return self._conn.execute(sql, params)
        except sqlite3.Error as exc:
            raise LedgerError(f"{self.path}: {exc}") from exc

    def __enter__(self) -> UsageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record_start(
        self, *, session_id: str, peer_id: str, test_type: str, started: Instant
    ) -> None:
        """Record a granted test; from now on it counts against the peer's quotas."""
        self._execute(
            "INSERT INTO tests (session_id, peer_id, test_type,"
            " started_wall, started_boot, started_boottime) VALUES (?, ?, ?, ?, ?, ?)",
            (session_id, peer_id, test_type, started.wall, started.boot_id, started.boottime),
        )

    def record_bytes(self, session_id: str, rx: int, tx: int) -> bool:
        """Add data-plane counter deltas to a test; False if the test is unknown."""
        for name, value in (("rx", rx), ("tx", tx)):
            if type(value) is not int or not 0 <= value <= MAX_BYTES_DELTA:
                raise ValueError(
                    f"{name} must be an integer in 0..{MAX_BYTES_DELTA}, got {value!r}"
                )
        cursor = self._execute(
            "UPDATE tests SET bytes_rx = bytes_rx + ?, bytes_tx = bytes_tx + ?"
            " WHERE session_id = ?",
            (rx, tx, session_id),
        )
        return cursor.rowcount == 1

    def record_end(self, session_id: str, ended: Instant, outcome: str) -> None:
        """Mark a test ended (the first end recorded wins)."""
        self._execute(
            "UPDATE tests SET ended_wall = ?, ended_boot = ?, ended_boottime = ?, outcome = ?"
            " WHERE session_id = ? AND ended_wall IS NULL",
            (ended.wall, ended.boot_id, ended.boottime, outcome, session_id),
        )

    def peer_usage(self, peer_id: str, now: Instant) -> PeerUsage:
        """The peer's tests in the last hour, bytes in the last day and last end, as of `now`."""
        started = self._execute(
            "SELECT started_wall, started_boot, started_boottime, bytes_rx + bytes_tx"  # noqa: S608
            f" FROM tests WHERE peer_id = :peer AND {_STARTED_WITHIN}",
            _params(now, DAY_SEC, peer=peer_id),
        ).fetchall()
        records = sorted(
            ((age_seconds(Instant(w, b, t), now), n) for w, b, t, n in started), reverse=True
        )
        ended = self._execute(
            "SELECT ended_wall, ended_boot, ended_boottime"  # noqa: S608
            f" FROM tests WHERE peer_id = :peer AND {_ENDED_WITHIN}",
            _params(now, DAY_SEC, peer=peer_id),
        ).fetchall()
        end_ages = [age_seconds(Instant(w, b, t), now) for w, b, t in ended]
        return PeerUsage(
            start_ages=tuple(age for age, _ in records if age < HOUR_SEC),
            byte_records=tuple(records),
            last_end_age=min(end_ages) if end_ages else None,
        )

    def peers_seen(self, now: Instant, within: float = DAY_SEC) -> list[str]:
        """Peers that started a test in the last `within` seconds (for `reflector status`)."""
        rows = self._execute(
            f"SELECT DISTINCT peer_id FROM tests WHERE {_STARTED_WITHIN} ORDER BY peer_id",  # noqa: S608
            _params(now, within),
        ).fetchall()
        return [peer for (peer,) in rows]

    def unfinished(self) -> list[tuple[str, str, str]]:
        """(session_id, peer_id, test_type) of every test still open in the ledger."""
        rows = self._execute(
            "SELECT session_id, peer_id, test_type FROM tests WHERE ended_wall IS NULL"
        ).fetchall()
        return [(str(a), str(b), str(c)) for a, b, c in rows]

    def close_unfinished(self, now: Instant, outcome: str) -> int:
        """End every test a previous process left open (it crashed or was killed).

        `now` is the latest moment such a test can have ended, so cooldowns count from it:
        over-estimating by the length of an outage errs on the side of the quota.
        """
        cursor = self._execute(
            "UPDATE tests SET ended_wall = ?, ended_boot = ?, ended_boottime = ?, outcome = ?"
            " WHERE ended_wall IS NULL",
            (now.wall, now.boot_id, now.boottime, outcome),
        )
        return cursor.rowcount

    def prune(self, now: Instant) -> int:
        """Delete tests that started more than `RETENTION_SEC` ago; return how many."""
        cursor = self._execute(
            f"DELETE FROM tests WHERE NOT {_STARTED_WITHIN}",  # noqa: S608
            _params(now, RETENTION_SEC),
        )
        return cursor.rowcount


def _params(now: Instant, window: float, **extra: str) -> dict[str, object]:
    return {
        "boot": now.boot_id,
        "boottime": now.boottime,
        "wall": now.wall,
        "window": window,
        **extra,
    }


def _create_private_file(path: Path) -> None:
    """Create the database file owner-only before sqlite touches it (sqlite would use the
    umask), or tighten an existing one; sqlite gives its -wal and -shm files the same mode."""
    flags = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
    fd = open_owned(path, flags, DB_FILE_MODE)  # root-created: still the state dir owner's
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ReflectorError(f"{path} exists but is not a regular file")
        if stat.S_IMODE(info.st_mode) != DB_FILE_MODE:
            os.fchmod(fd, DB_FILE_MODE)
    finally:
        os.close(fd)


def _configure(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        # NORMAL, not FULL: in WAL mode NORMAL never corrupts the database and loses nothing
        # when the process dies; only a power cut can drop the last few commits. At worst that
        # forgets a test or a few seconds of byte counts, while FULL would fsync on every
        # counter update of every running test.
        conn.execute("PRAGMA synchronous = NORMAL")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version == 0:
            _create_schema(conn)
        else:
            _check_version(version, path)
    except sqlite3.Error as exc:
        raise ReflectorError(f"cannot use accounting database {path}: {exc}") from exc
    if str(mode).lower() != "wal":
        raise ReflectorError(f"{path}: sqlite refused WAL mode (got {mode!r})")


def _check_readable(conn: sqlite3.Connection, path: Path) -> None:
    try:
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
    except sqlite3.Error as exc:
        raise ReflectorError(f"cannot read usage ledger {path}: {exc}") from exc
    _check_version(version, path)


def _check_version(version: object, path: Path) -> None:
    if version != SCHEMA_VERSION:
        raise ReflectorError(
            f"usage ledger {path}: schema version {version}, not the supported"
            f" {SCHEMA_VERSION} (written by another reflector version?)"
        )


def _create_schema(conn: sqlite3.Connection) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        for statement in _statements(_SCHEMA):
            conn.execute(statement)
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


def _statements(script: str) -> Iterable[str]:
    return (s.strip() for s in script.split(";") if s.strip())
