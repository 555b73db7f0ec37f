"""Reading the audit trail back for ``reflector audit export`` (spec §1.1: export for support).

Both sources give the same record shape, that of the JSON-lines file: lower-case keys, ``ts``
as UTC ISO-8601 text, integers as ints, ``params`` as an object, absent fields omitted. Journal
records have no ``seq``/``prev`` (journald keeps its own sequence numbers and cursors).

Filters: `since` is inclusive and `until` exclusive; a naive datetime means local time, as in
``journalctl --since``. `peer` is compared in canonical Endpoint-ID form when it parses as one
(so a typed ``pp5r 6q2m ...`` finds it), otherwise exactly.

Trust: any local process can write journal entries claiming ``SYSLOG_IDENTIFIER=reflector``, so
a journal export is a convenience view; the tamper-evident copy is the hash-chained file (check
it with ``verify_chain``). Values in journal entries that do not parse as their type are left
out rather than failing the export.
"""

from __future__ import annotations

import csv
import io
import json
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final

from reflector.audit.chain import read_raw_lines
from reflector.audit.events import INT_FIELDS, OPTIONAL_FIELDS, EventKind, format_ts
from reflector.audit.sinks import SYSLOG_IDENTIFIER
from reflector.endpoint_id import is_valid_id, parse_id
from reflector.errors import ConfigError, ReflectorError

__all__ = [
    "CSV_COLUMNS",
    "EXPORT_FORMATS",
    "format_records",
    "normalize_journal_entry",
    "read_journal",
    "read_jsonl",
]

_log = logging.getLogger(__name__)

EXPORT_FORMATS: Final = ("jsonl", "csv")
# Fixed column order for spreadsheets: when/what/who first, free text last. `prev` and
# `message_id` are for machines and stay in the jsonl export only.
CSV_COLUMNS: Final = (
    "ts",
    "seq",
    "reflector_event",
    "endpoint_id",
    "peer_id",
    "source_addr",
    "test_id",
    "test_type",
    "mode",
    "decision",
    "reason",
    "pid",
    "exit_code",
    "runtime_ms",
    "bytes_rx",
    "bytes_tx",
    "params",
    "message",
)
# Seeking takes float seconds, which can land a microsecond past `since`; seek a little
# earlier and let the filter make the exact cut.
_SEEK_SLACK_S: Final = 1.0
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
# Leading characters that make spreadsheet programs evaluate a cell as a formula (OWASP "CSV
# injection"); peer-influenced text such as a reason could start with one.
_FORMULA_STARTS: Final = ("=", "+", "-", "@", "\t", "\r")


@dataclass(frozen=True, kw_only=True)
class _Filter:
    since: datetime | None
    until: datetime | None
    peer: str | None
    kind: EventKind | None

    def matches(self, record: Mapping[str, Any]) -> bool:
        if self.kind is not None and record.get("reflector_event") != self.kind:
            return False
        if self.peer is not None and record.get("peer_id") != self.peer:
            return False
        if self.since is None and self.until is None:
            return True
        when = _parse_ts(record.get("ts"))
        if when is None:
            return False
        return (self.since is None or when >= self.since) and (
            self.until is None or when < self.until
        )


def _make_filter(
    since: datetime | None, until: datetime | None, peer: str | None, kind: EventKind | str | None
) -> _Filter:
    if kind is not None:
        try:
            kind = EventKind(kind)
        except ValueError:
            known = ", ".join(k.value for k in EventKind)
            raise ConfigError(f"unknown audit event {kind!r}; known: {known}") from None
    if peer is not None and is_valid_id(peer):
        peer = parse_id(peer)
    return _Filter(since=_as_utc(since), until=_as_utc(until), peer=peer, kind=kind)


def _as_utc(when: datetime | None) -> datetime | None:
    # astimezone() reads a naive datetime as local time.
    return None if when is None else when.astimezone(UTC)


def _parse_ts(value: object) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return when if when.tzinfo is not None else None


def read_jsonl(
    path: Path,
    since: datetime | None = None,
    until: datetime | None = None,
    peer: str | None = None,
    kind: EventKind | str | None = None,
) -> Iterator[dict[str, Any]]:
    """Records of the JSON-lines file that pass the filters, in file order.

    Lines that are not JSON objects (a torn last line, damage) are skipped with a warning naming
    them: an export for support should still deliver everything readable. Raises ConfigError
    for an unknown `kind`, ReflectorError if the file cannot be read.
    """
    selector = _make_filter(since, until, peer, kind)
    try:
        for number, raw in enumerate(read_raw_lines(path), start=1):
            record = _load_object(raw)
            if record is None:
                _log.warning("audit log %s: line %d is not a record; skipped", path, number)
            elif selector.matches(record):
                yield record
    except OSError as exc:
        raise ReflectorError(f"cannot read audit log {path}: {exc.strerror or exc}") from exc


def _load_object(raw: bytes) -> dict[str, Any] | None:
    if not raw.endswith(b"\n"):
        return None
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def read_journal(
    since: datetime | None = None,
    until: datetime | None = None,
    peer: str | None = None,
    kind: EventKind | str | None = None,
    *,
    directory: Path | None = None,
) -> Iterator[dict[str, Any]]:
    """Audit records from journald that pass the filters, oldest first.

    `directory` reads journal files from there instead of the local journal (for example a
    container's /var/log/journal copied off for support). Raises ConfigError for an unknown
    `kind`, ReflectorError if python-systemd is missing.
    """
    selector = _make_filter(since, until, peer, kind)
    try:
        from systemd import journal
    except ImportError as exc:
        raise ReflectorError("reading the journal needs python-systemd (systemd-python)") from exc
    exact = {"__REALTIME_TIMESTAMP": _usec_to_datetime}
    reader = (
        journal.Reader(path=str(directory), converters=exact)
        if directory is not None
        else journal.Reader(converters=exact)
    )
    with reader:
        # Same field: OR; different fields: AND. Listing every kind selects only audit entries,
        # not Reflector's ordinary log lines, which share the SYSLOG_IDENTIFIER.
        kinds = [selector.kind] if selector.kind is not None else list(EventKind)
        for each in kinds:
            reader.add_match(REFLECTOR_EVENT=str(each))
        reader.add_match(SYSLOG_IDENTIFIER=SYSLOG_IDENTIFIER)
        if selector.peer is not None:
            reader.add_match(PEER_ID=selector.peer)
        if selector.since is not None:
            reader.seek_realtime(selector.since.timestamp() - _SEEK_SLACK_S)
        # No early stop at `until`: entries from different boots or clock steps need not be in
        # time order, and exports are rare enough to filter every matching entry.
        for entry in reader:
            record = normalize_journal_entry(entry)
            if record is not None and selector.matches(record):
                yield record


def _usec_to_datetime(usec: int) -> datetime:
    # python-systemd's own converter divides by 1e6 in floating point and can be a microsecond
    # off; records must carry journald's timestamp exactly.
    return _EPOCH + timedelta(microseconds=usec)


def normalize_journal_entry(entry: Mapping[str, Any]) -> dict[str, Any] | None:
    """A `systemd.journal.Reader` entry in the JSON-lines record shape; None if not an event.

    Expects the Reader's default conversions: ``__REALTIME_TIMESTAMP`` a datetime,
    ``MESSAGE_ID`` a UUID, other fields str (bytes when not UTF-8).
    """
    kind, when = entry.get("REFLECTOR_EVENT"), entry.get("__REALTIME_TIMESTAMP")
    if not isinstance(kind, str) or not isinstance(when, datetime):
        return None
    message_id = entry.get("MESSAGE_ID")
    record: dict[str, Any] = {
        "ts": format_ts(when if when.tzinfo is not None else when.astimezone()),
        "reflector_event": kind,
        "message_id": getattr(message_id, "hex", message_id),
        "message": entry.get("MESSAGE"),
        "endpoint_id": entry.get("ENDPOINT_ID"),
    }
    for name in OPTIONAL_FIELDS:
        value = _convert(name, entry.get(name.upper()))
        if value is not None:
            record[name] = value
    return {k: v for k, v in record.items() if isinstance(v, str | int | dict)}


def _convert(name: str, value: object) -> object:
    if not isinstance(value, str):  # absent, undecodable bytes, or a repeated (forged) field
        return None
    if name in INT_FIELDS:
        try:
            return int(value)
        except ValueError:
            return None
    if name == "params":
        try:
            params = json.loads(value)
        except ValueError:
            return None
        return params if isinstance(params, dict) else None
    return value


def format_records(records: Iterable[Mapping[str, Any]], fmt: str) -> Iterator[str]:
    """Render records as JSON lines or CSV (header, then CSV_COLUMNS in order); each str ends
    with its line terminator. Raises ConfigError for an unknown format."""
    if fmt == "jsonl":
        return _jsonl_lines(records)
    if fmt == "csv":
        return _csv_lines(records)
    raise ConfigError(f"unknown export format {fmt!r}; use {' or '.join(EXPORT_FORMATS)}")


def _jsonl_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    for record in records:
        yield json.dumps(record, ensure_ascii=False, separators=(",", ":")) + "\n"


def _csv_lines(records: Iterable[Mapping[str, Any]]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)  # RFC 4180: quoted as needed, CRLF line ends
    writer.writerow(CSV_COLUMNS)
    yield _drain(buffer)
    for record in records:
        writer.writerow([_csv_cell(record.get(column)) for column in CSV_COLUMNS])
        yield _drain(buffer)


def _drain(buffer: io.StringIO) -> str:
    text = buffer.getvalue()
    buffer.seek(0)
    buffer.truncate()
    return text


def _csv_cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if isinstance(value, str):
        return "'" + value if value.startswith(_FORMULA_STARTS) else value
    return str(value)
