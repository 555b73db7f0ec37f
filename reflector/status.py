"""`reflector status`: what the local endpoint is doing, for its operator.

The running server writes `status.json` in the state dir whenever a session starts or ends
(no timer); this module reads it, checks the server is really alive, and adds the recent
denies from the audit trail.
"""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil

from reflector.audit import AUDIT_FILE_NAME, read_journal, read_jsonl
from reflector.config import Config

STATUS_FILE_NAME = "status.json"
DENY_KINDS = ("session_deny", "connection_deny", "pairing_deny")
# How far back "recent" denies reach.
RECENT_WINDOW = timedelta(days=1)
JOURNAL_SOCKET = Path("/run/systemd/journal/socket")


def collect_status(config: Config, max_denies: int) -> dict[str, Any]:
    doc = _read_status(config.state_dir / STATUS_FILE_NAME)
    doc["recent_denies"] = _recent_denies(config, max_denies)
    return doc


def _read_status(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return {"running": False, "note": f"no {path.name}: the endpoint has not run here"}
    except (OSError, ValueError) as exc:
        return {"running": False, "note": f"{path}: unreadable: {exc}"}
    if not isinstance(doc, dict):
        return {"running": False, "note": f"{path}: not a JSON object"}
    pid = doc.get("pid")
    alive = isinstance(pid, int) and psutil.pid_exists(pid) and doc.get("running") is True
    if doc.get("running") and not alive:
        doc["note"] = "the endpoint that wrote this is gone (crashed or killed)"
    doc["running"] = alive
    doc["age_sec"] = round(time.time() - float(doc.get("updated", 0)), 1)
    return doc


def _recent_denies(config: Config, limit: int) -> list[dict[str, Any]]:
    since = datetime.now(UTC) - RECENT_WINDOW
    use_journal = config.audit.journald != "off" and JOURNAL_SOCKET.exists()
    found: list[dict[str, Any]] = []
    if not use_journal and not (config.state_dir / AUDIT_FILE_NAME).exists():
        return found
    for kind in DENY_KINDS:
        records = (
            read_journal(since, None, None, kind)
            if use_journal
            else read_jsonl(config.state_dir / AUDIT_FILE_NAME, since, None, None, kind)
        )
        found.extend(records)
    found.sort(key=lambda r: str(r.get("ts", "")))
    keep = ("ts", "reflector_event", "peer_id", "source_addr", "reason", "test_type")
    return [{k: r.get(k) for k in keep if r.get(k) is not None} for r in found[-limit:]]


def format_status(doc: dict[str, Any]) -> str:
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
            f"  {s['session_id']}  {s['test_type']:<10} peer {s['peer_id']}"
            f"  {s.get('seconds_left', 0):.0f} s left"
        )
    peers = doc.get("peers") or {}
    if peers:
        lines.append("quota used per peer (last hour / last 24 h):")
        for peer, q in peers.items():
            used = q["tests_per_hour"] - q["tests_left_this_hour"]
            lines.append(
                f"  {peer}  tests {used}/{q['tests_per_hour']}"
                f"  bytes {q['bytes_last_24h']}"
                + (f"/{q['bytes_per_day']}" if q.get("bytes_per_day") else "")
            )
    denies = doc.get("recent_denies") or []
    lines.append(f"recent denies ({len(denies)}):")
    for d in denies:
        who = d.get("peer_id") or d.get("source_addr") or "?"
        lines.append(f"  {d.get('ts')}  {d.get('reflector_event')}  {d.get('reason')}  {who}")
    return "\n".join(lines)
