"""Where audit events go: journald, a hash-chained JSON-lines file, or both; and `AuditLog`.

`AuditLog.emit` is fail-safe: a sink that cannot write (journald gone, disk full, file removed)
never raises into the caller. The caller is the server deciding about a peer: letting an audit
write failure crash it would turn a full disk into a denial of service for every peer, and
would kill running tests mid-way without their close/accounting records either. Instead the
first failure of a sink is reported through `logging` (journald or stderr, where an operator
sees it), later ones are only counted (`AuditLog.failures`) so a broken disk cannot flood the
log, and a recovery is reported once. Opening a log, by contrast, fails loudly (fail closed at
startup, when an operator is there to fix it).

Programming errors in an `emit` call (unknown kind or field, a counter that is not an int, a
deny without a reason) still raise: see events.py.

The JSON-lines file, ``audit.jsonl`` in the state directory:

* mode 0600, opened with O_APPEND (every write lands at the current end) and O_NOFOLLOW;
* each record is written with one write(2) and fsync'ed before `emit` returns. Audit events are
  a few per connection or session, not per packet, so one fsync each is affordable, and a
  record the server acted on is then on disk;
* an exclusive flock(2) is held around each append, and the writer re-reads the tail when the
  file grew under it, so several processes (the server and a ``reflector pair`` command) can
  append to one chain;
* after a crash mid-write, the incomplete final line (which never finished, so was never a
  record) is cut off when the file is next opened for writing; complete records are never
  removed or rewritten. ``verify_chain`` reports such a torn line if run before that.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, Protocol

from reflector.audit.chain import (
    GENESIS_PREV,
    MAX_RECORD_BYTES,
    encode_line,
    line_digest,
    parse_record,
)
from reflector.audit.events import (
    AuditEvent,
    EventKind,
    journal_fields,
    priority,
    to_record,
)
from reflector.errors import ConfigError, ReflectorError
from reflector.fsutil import open_owned

__all__ = [
    "AUDIT_FILE_NAME",
    "JOURNAL_SOCKET",
    "AuditLog",
    "AuditSink",
    "JournalSink",
    "JsonlSink",
    "open_audit_log",
]

_log = logging.getLogger(__name__)

AUDIT_FILE_NAME: Final = "audit.jsonl"
# journald's native-protocol socket: its presence means journald is running (sd_booted-style).
JOURNAL_SOCKET: Final = Path("/run/systemd/journal/socket")
SYSLOG_IDENTIFIER: Final = "reflector"
# Owner-only: the trail names peers and addresses.
AUDIT_FILE_MODE: Final = 0o600
_OPEN_FLAGS: Final = (
    os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NOCTTY
)
# Enough to hold the last complete record plus a torn fragment after it.
_TAIL_WINDOW: Final = 2 * (MAX_RECORD_BYTES + 1)

JournaldSetting = Literal["auto", "on", "off"]


class AuditSink(Protocol):
    """Something that durably records events. `write` may raise; `AuditLog` contains it."""

    name: str

    def write(self, event: AuditEvent) -> None: ...

    def close(self) -> None: ...


class JournalSink:
    """Sends each event to journald with its fields upper-case and a per-kind MESSAGE_ID."""

    name = "journald"

    def __init__(self, *, socket: Path = JOURNAL_SOCKET) -> None:
        try:
            from systemd import journal
        except ImportError as exc:
            raise ReflectorError("journald audit needs python-systemd (systemd-python)") from exc
        self._send: Callable[..., object] = journal.send
        self._socket = socket

    def write(self, event: AuditEvent) -> None:
        # libsystemd drops messages *silently* when journald's socket is missing (ENOENT is
        # "journal not available", by design). An audit record must not vanish unnoticed, so
        # check first and fail loudly: AuditLog then reports it.
        if not self._socket.exists():
            raise FileNotFoundError(errno.ENOENT, "journald is not running", str(self._socket))
        # CODE_* fields passed explicitly: otherwise python-systemd walks the stack on every call
        # and records this line, which tells a reader nothing.
        self._send(
            MESSAGE=event.message,
            MESSAGE_ID=event.message_id.hex,
            PRIORITY=str(priority(event.kind)),
            SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER,
            CODE_FILE=__file__,
            CODE_FUNC="JournalSink.write",
            **journal_fields(event),
        )

    def close(self) -> None:
        """Nothing to release: every send is one datagram."""


@dataclass(frozen=True, kw_only=True)
class _Tail:
    """Where the chain ends: file size after the last complete line, its seq and hash."""

    end: int
    seq: int
    digest: str


class JsonlSink:
    """Appends events to a hash-chained JSON-lines file (see the module docstring)."""

    name = "jsonl"

    def __init__(self, path: Path) -> None:
        """Open (creating if needed) and find the chain's end; ReflectorError if unusable."""
        self.path = path
        self._lock = threading.Lock()
        self._fd = _open_audit_file(path)
        try:
            with _flocked(self._fd):
                self._tail = _find_tail(self._fd, path)
        except BaseException:
            os.close(self._fd)
            raise

    def write(self, event: AuditEvent) -> None:
        with self._lock, _flocked(self._fd):
            size = os.fstat(self._fd).st_size
            if size != self._tail.end:  # another writer appended, or the file was cut
                self._tail = _find_tail(self._fd, self.path)
            line = encode_line(to_record(event), seq=self._tail.seq + 1, prev=self._tail.digest)
            try:
                _write_all(self._fd, line + b"\n")
                os.fsync(self._fd)
            except OSError:
                # A full disk may have taken part of the line: cut it off now, so the chain
                # stays whole even if nothing else is ever written (truncating needs no space).
                with contextlib.suppress(OSError):
                    os.ftruncate(self._fd, self._tail.end)
                raise
            self._tail = _Tail(
                end=self._tail.end + len(line) + 1, seq=self._tail.seq + 1, digest=line_digest(line)
            )

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


def _open_audit_file(path: Path) -> int:
    try:
        # Created by root (a CLI command before the service ever ran), it still belongs to
        # the state dir's owner, so the service can append to it.
        fd = open_owned(path, _OPEN_FLAGS, AUDIT_FILE_MODE)
    except OSError as exc:
        raise ReflectorError(f"cannot open audit log {path}: {exc.strerror or exc}") from exc
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ReflectorError(f"audit log {path} is not a regular file")
    if stat.S_IMODE(info.st_mode) != AUDIT_FILE_MODE:
        # Created wider by an old umask or by hand; the records name peers and addresses.
        os.fchmod(fd, AUDIT_FILE_MODE)
    return fd


@contextlib.contextmanager
def _flocked(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _find_tail(fd: int, path: Path) -> _Tail:
    """Locate the last complete record (cutting off a torn final line, see module docstring)."""
    size = os.fstat(fd).st_size
    if size == 0:
        return _Tail(end=0, seq=0, digest=GENESIS_PREV)
    start = max(0, size - _TAIL_WINDOW)
    window = os.pread(fd, size - start, start)
    if not window.endswith(b"\n"):
        if start > 0 and b"\n" not in window:
            raise ReflectorError(
                f"audit log {path}: last line longer than {MAX_RECORD_BYTES} bytes"
            )
        size = start + window.rfind(b"\n") + 1  # 0 when the file holds only a fragment
        _log.warning("audit log %s: cutting off an incomplete last line (crash mid-write)", path)
        os.ftruncate(fd, size)
        os.fsync(fd)
        window = window[: size - start]
        if size == 0:
            return _Tail(end=0, seq=0, digest=GENESIS_PREV)
    body = window[:-1]
    line_start = body.rfind(b"\n") + 1
    if line_start == 0 and start > 0:
        raise ReflectorError(f"audit log {path}: last line longer than {MAX_RECORD_BYTES} bytes")
    last = body[line_start:]
    record = parse_record(last)
    if record is None:
        raise ReflectorError(
            f"audit log {path}: last line is not an audit record; "
            "run `reflector audit verify` and move the file aside"
        )
    return _Tail(end=size, seq=record["seq"], digest=line_digest(last))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    """Builds events and hands them to every sink, fail-safe (see the module docstring)."""

    def __init__(
        self,
        sinks: Sequence[AuditSink],
        endpoint_id: str,
        *,
        clock: Callable[[], datetime] = _utc_now,
    ) -> None:
        self.sinks = tuple(sinks)
        self.endpoint_id = endpoint_id
        self._clock = clock
        self._lock = threading.Lock()
        self._failures: dict[str, int] = {}

    @property
    def failures(self) -> dict[str, int]:
        """Failed writes per sink name since the sink last succeeded (for status reporting)."""
        with self._lock:
            return {k: v for k, v in self._failures.items() if v}

    def emit(self, kind: EventKind | str, **fields: Any) -> AuditEvent:
        """Record one event in every sink and return it.

        Raises only for a malformed call (see events.py); a sink failure is logged, not raised.
        """
        event = AuditEvent(
            kind=EventKind(kind), ts=self._clock(), endpoint_id=self.endpoint_id, **fields
        )
        for sink in self.sinks:
            try:
                sink.write(event)
            except Exception as exc:  # fail-safe by design: see the module docstring
                self._record_failure(sink.name, exc)
            else:
                self._record_success(sink.name)
        return event

    def _record_failure(self, name: str, exc: Exception) -> None:
        with self._lock:
            count = self._failures.get(name, 0) + 1
            self._failures[name] = count
        if count == 1:
            _log.error(
                "audit sink %s failed; further failures are counted, not logged: %s",
                name,
                exc,
                exc_info=exc,
            )

    def _record_success(self, name: str) -> None:
        with self._lock:
            count = self._failures.pop(name, 0)
        if count:
            _log.warning("audit sink %s works again after %d failed writes", name, count)

    def close(self) -> None:
        for sink in self.sinks:
            with contextlib.suppress(Exception):
                sink.close()


def open_audit_log(
    state_dir: Path,
    endpoint_id: str,
    journald: JournaldSetting,
    jsonl: bool,
    *,
    journal_socket: Path = JOURNAL_SOCKET,
) -> AuditLog:
    """The configured audit log: journald ("on", or "auto" when its socket exists) and the file.

    Without journald the JSON-lines file is used even if `jsonl` is false: an audit trail with
    no sink at all is never what anyone wants. Raises ConfigError for a bad `journald` value or
    "on" without journald, and ReflectorError if the file cannot be opened.
    """
    if journald not in ("auto", "on", "off"):
        raise ConfigError(f"audit journald must be auto, on or off, not {journald!r}")
    present = journal_socket.exists()
    if journald == "on" and not present:
        raise ConfigError(f"audit journald = on, but journald is not running ({journal_socket})")
    sinks: list[AuditSink] = []
    if journald == "on" or (journald == "auto" and present):
        sinks.append(JournalSink(socket=journal_socket))
    if jsonl or not sinks:
        sinks.append(JsonlSink(state_dir / AUDIT_FILE_NAME))
    return AuditLog(sinks, endpoint_id)
