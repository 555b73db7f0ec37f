"""`reflector status`: what the local endpoint is doing, for its operator.

Three sources, each read as of now:
- `status.json`, which the running server writes in the state dir whenever a session starts or
  ends (never on a timer, so an idle endpoint stays idle): who is running, its mode and its
  active sessions. Countdowns in it are recomputed for now (`seconds_left` from each session's
  `expires_at`), and its sessions are dropped when the process that wrote it is gone.
- the usage ledger (`accounting.sqlite3`), opened read-only (sqlite's WAL lets us read while the
  server writes): the quota per peer, computed by the same `policy.quota_status` the server
  answers GetStatus with. The copy in `status.json` would be stale on an idle endpoint (tests
  age out of the hourly window with nobody rewriting the file), so it is never shown.
- the audit trail: the recent denies.

A source that cannot be read is named in the output (`note`, `quota_error`), never a crash.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from reflector.audit import AUDIT_FILE_NAME, read_journal, read_jsonl
from reflector.config import Config
from reflector.errors import ReflectorError
from reflector.sessions import clock
from reflector.sessions.accounting import (
    DB_FILE_NAME,
    UsageStore,
)
from reflector.sessions.clock import Instant
from reflector.sessions.policy import quota_status

STATUS_FILE_NAME = "status.json"
DENY_KINDS = ("session_deny", "connection_deny", "pairing_deny")
# How far back "recent" denies reach.
RECENT_WINDOW = timedelta(days=1)
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
# Fields of status.json that were true only when it was written; the ledger answers them now.
_STALE_FIELDS = ("peers", "error")


def collect_status(config: Config, max_denies: int, now: Instant | None = None) -> dict[str, Any]:
    """Everything `reflector status` shows, as JSON-able data, as of `now` (default: now)."""
    at = now if now is not None else clock.now()
    doc = _read_status(config.state_dir / STATUS_FILE_NAME, at.wall)
    doc.update(_quota_per_peer(config, _session_peers(doc), at))
    try:
        doc["recent_denies"] = _recent_denies(config, max_denies)
    except ReflectorError as exc:
        doc["recent_denies"], doc["denies_error"] = [], str(exc)
    return doc


def _read_status(path: Path, wall: float) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"running": False, "note": f"no {path.name}: the endpoint has not run here"}
    except OSError as exc:
        return {"running": False, "note": f"{path}: unreadable: {exc.strerror or exc}"}
    except ValueError as exc:
        return {"running": False, "note": f"{path}: unreadable: {exc}"}
    if not isinstance(doc, dict):
        return {"running": False, "note": f"{path}: not a JSON object"}
    for name in _STALE_FIELDS:
        doc.pop(name, None)
    pid = doc.get("pid")
    alive = isinstance(pid, int) and psutil.pid_exists(pid) and doc.get("running") is True
    if doc.get("running") and not alive:
        doc["note"] = "the endpoint that wrote this is gone (crashed or killed)"
    doc["running"] = alive
    updated = _number(doc.get("updated")) or 0.0
    doc["age_sec"] = round(wall - updated, 1)
    doc["active_sessions"] = _live_sessions(doc.get("active_sessions"), alive, wall)
    grace = doc.get("disconnected_peers_grace_sec")
    if isinstance(grace, dict):
        doc["disconnected_peers_grace_sec"] = _count_down(grace, alive, wall - updated)
    return doc


def _live_sessions(sessions: object, alive: bool, wall: float) -> list[dict[str, Any]]:
    """The recorded sessions with `seconds_left` as of `wall`; none if the writer is gone.

    `expires_at` is the session's deadline on the wall clock; the server itself goes by
    CLOCK_BOOTTIME, so after a wall-clock step this is off by the step until the next rewrite.
    """
    if not alive or not isinstance(sessions, list):
        return []
    live = []
    for session in sessions:
        if not isinstance(session, dict):
            continue
        expires_at = _number(session.get("expires_at"))
        if expires_at is not None:
            session = {**session, "seconds_left": max(0.0, round(expires_at - wall, 1))}
        live.append(session)
    return live


def _count_down(seconds: dict[str, Any], alive: bool, elapsed: float) -> dict[str, float]:
    """Countdowns recorded `elapsed` seconds ago, as they stand now."""
    if not alive:
        return {}
    left = {key: _number(value) for key, value in seconds.items()}
    return {key: max(0.0, round(v - elapsed, 1)) for key, v in left.items() if v is not None}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _session_peers(doc: dict[str, Any]) -> set[str]:
    return {str(s["peer_id"]) for s in doc.get("active_sessions", []) if s.get("peer_id")}


def _quota_per_peer(config: Config, also: Iterable[str], now: Instant) -> dict[str, Any]:
    """{"peers": quota per peer} from the ledger as of `now`, or {"quota_error": why not}.

    The peers are those that started a test in the last day plus those with a live session,
    as in the server's own snapshot.
    """
    path = config.state_dir / DB_FILE_NAME
    try:
        with UsageStore.open_readonly(config.state_dir) as ledger:
            peers = sorted(set(ledger.peers_seen(now)) | set(also))
            usage = {peer: ledger.peer_usage(peer, now) for peer in peers}
    except FileNotFoundError:
        return {"peers": {}, "quota_note": f"no usage ledger yet ({path}): no test has run here"}
    except ReflectorError as exc:
        return {"quota_error": str(exc)}
    return {"peers": {peer: quota_status(peer, config.quotas, u, now) for peer, u in usage.items()}}


def _recent_denies(config: Config, limit: int) -> list[dict[str, Any]]:
    """The last `limit` denies of the last day; ReflectorError if the trail cannot be read."""
    since = datetime.now(UTC) - RECENT_WINDOW
    use_journal = config.audit.journald != "off" and JOURNAL_SOCKET.exists()
    path = config.state_dir / AUDIT_FILE_NAME
    if not use_journal and not _audit_file_exists(path):
        return []
    found: list[dict[str, Any]] = []
    for kind in DENY_KINDS:
        records = (
            read_journal(since, None, None, kind)
            if use_journal
            else read_jsonl(path, since, None, None, kind)
        )
        found.extend(records)
    found.sort(key=lambda r: str(r.get("ts", "")))
    keep = ("ts", "reflector_event", "peer_id", "source_addr", "reason", "test_type")
    return [{k: r.get(k) for k in keep if r.get(k) is not None} for r in found[-limit:]]


def _audit_file_exists(path: Path) -> bool:
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise ReflectorError(f"cannot read audit log {path}: {exc.strerror or exc}") from exc
    return True


def format_status(doc: dict[str, Any]) -> str:
    """The text form of `collect_status`'s document."""
    lines = [
        f"endpoint   {doc.get('endpoint_id', '?')}",
        f"running    {'yes, pid ' + str(doc.get('pid')) if doc.get('running') else 'no'}"
        + (f"  ({doc['note']})" if doc.get("note") else ""),
    ]
    if "mode" in doc:
        lines.append(f"mode       {doc['mode']}")
        lines.append(f"engines    {doc.get('engine_host')}")
    sessions = doc.get("active_sessions") or []
    lines.append(f"sessions   {len(sessions)} active (max {doc.get('max_concurrent_tests', '?')})")
    for s in sessions:
        lines.append(
            f"  {s.get('session_id')}  {s.get('test_type', '?'):<10} peer {s.get('peer_id')}"
            f"  {s.get('seconds_left', 0):.0f} s left"
        )
    lines.extend(_format_quota(doc))
    if doc.get("denies_error"):
        lines.append(f"recent denies unknown: {doc['denies_error']}")
        return "\n".join(lines)
    denies = doc.get("recent_denies") or []
    lines.append(f"recent denies ({len(denies)}):")
    for d in denies:
        who = d.get("peer_id") or d.get("source_addr") or "?"
        lines.append(f"  {d.get('ts')}  {d.get('reflector_event')}  {d.get('reason')}  {who}")
    return "\n".join(lines)


def _format_quota(doc: dict[str, Any]) -> list[str]:
    if doc.get("quota_error"):
        return [f"quota      unknown: {doc['quota_error']}"]
    peers = doc.get("peers") or {}
    if not peers:
        return [f"quota      {doc.get('quota_note') or 'no peer has tested in the last day'}"]
    lines = ["quota used per peer (last hour / last 24 h):"]
    for peer, q in peers.items():
        used = q["tests_per_hour"] - q["tests_left_this_hour"]
        lines.append(
            f"  {peer}  tests {used}/{q['tests_per_hour']}"
            f"  bytes {q['bytes_last_24h']}"
            + (f"/{q['bytes_per_day']}" if q.get("bytes_per_day") else "")
        )
    return lines
