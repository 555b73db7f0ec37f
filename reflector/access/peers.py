"""The allowlist: which appliance IDs may use this endpoint (spec §5.3).

Two sources: `access.authorized_peers` in the config (read-only here) and an append-only log,
`peers.jsonl` in the state dir, written by `reflector peers add|remove` and by pairing. The log is
replayed to get the current set, so every change stays on record. Created by root, it still
belongs to the state dir's owner, the service user (`fsutil.open_owned`). The running server
re-reads the log when its size or mtime changes (a cheap `stat` per request), so `peers remove`
takes effect on live connections without a restart.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from reflector.endpoint_id import parse_id
from reflector.errors import EndpointIdError, ReflectorError
from reflector.fsutil import open_owned

PEERS_FILE_NAME = "peers.jsonl"
# The log only grows by operator action or pairing; a file this large is corruption or abuse.
MAX_PEERS_FILE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, kw_only=True)
class PeerChange:
    """One line of the log."""

    op: str  # "add" | "remove"
    peer_id: str
    ts: str
    via: str  # "cli" | "pairing"
    note: str = ""


class PeerStore:
    """The effective allowlist: config peers plus log adds, minus log removes (in log order)."""

    def __init__(self, state_dir: Path, config_peers: Iterable[str] = ()) -> None:
        self.path = state_dir / PEERS_FILE_NAME
        self._config_peers = frozenset(config_peers)
        self._stamp: tuple[int, int] | None = None
        self._logged: frozenset[str] = frozenset()
        self._removed: frozenset[str] = frozenset()

    def refresh(self) -> None:
        """Re-read the log if it changed since the last read (cheap when it did not)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            self._stamp, self._logged, self._removed = None, frozenset(), frozenset()
            return
        except OSError as exc:
            raise ReflectorError(f"{self.path}: cannot read peers: {exc.strerror}") from None
        stamp = (st.st_size, st.st_mtime_ns)
        if stamp != self._stamp:
            self._logged, self._removed = _replay(read_changes(self.path))
            self._stamp = stamp

    def current(self) -> frozenset[str]:
        """Every authorized peer ID right now."""
        self.refresh()
        return (self._config_peers - self._removed) | self._logged

    def is_authorized(self, peer_id: str) -> bool:
        return peer_id in self.current()

    def sources(self) -> dict[str, str]:
        """peer ID → where its authorization comes from ("config" or "peers.jsonl")."""
        self.refresh()
        out = {p: "config" for p in self._config_peers - self._removed}
        out.update({p: PEERS_FILE_NAME for p in self._logged})
        return out

    def add(self, peer_id: str, *, via: str, note: str = "") -> bool:
        """Authorize `peer_id`; False if it already was. Validates the check characters."""
        canonical = _canonical(peer_id)
        if self.is_authorized(canonical):
            return False
        self._append(PeerChange(op="add", peer_id=canonical, ts=_now(), via=via, note=note))
        return True

    def remove(self, peer_id: str, *, via: str) -> bool:
        """Revoke `peer_id`; False if it was not authorized."""
        canonical = _canonical(peer_id)
        if not self.is_authorized(canonical):
            return False
        self._append(PeerChange(op="remove", peer_id=canonical, ts=_now(), via=via))
        return True

    def _append(self, change: PeerChange) -> None:
        line = json.dumps(change.__dict__, sort_keys=True) + "\n"
        try:
            fd = open_owned(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise ReflectorError(f"{self.path}: cannot write peers: {exc.strerror}") from None
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self._stamp = None


def read_changes(path: Path) -> list[PeerChange]:
    """Parse the log; a bad line is an error naming the line (never silently skipped)."""
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_PEERS_FILE_BYTES + 1)
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ReflectorError(f"{path}: cannot read peers: {exc.strerror}") from None
    if len(raw) > MAX_PEERS_FILE_BYTES:
        raise ReflectorError(f"{path}: larger than {MAX_PEERS_FILE_BYTES} bytes; refusing")
    changes = []
    for number, line in enumerate(raw.decode("utf-8", "replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            change = PeerChange(**doc)
            if change.op not in ("add", "remove"):
                raise ValueError(f"unknown op {change.op!r}")
            parse_id(change.peer_id)
        except (ValueError, TypeError, EndpointIdError) as exc:
            raise ReflectorError(f"{path}:{number}: corrupt peers record: {exc}") from None
        changes.append(change)
    return changes


def _replay(changes: list[PeerChange]) -> tuple[frozenset[str], frozenset[str]]:
    """(added and still present, removed and not re-added) after applying the log in order."""
    added: set[str] = set()
    removed: set[str] = set()
    for change in changes:
        if change.op == "add":
            added.add(change.peer_id)
            removed.discard(change.peer_id)
        else:
            added.discard(change.peer_id)
            removed.add(change.peer_id)
    return frozenset(added), frozenset(removed)


def _canonical(peer_id: str) -> str:
    try:
        return parse_id(peer_id)
    except EndpointIdError as exc:
        raise ReflectorError(f"not a valid peer ID {peer_id!r}: {exc}") from None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
