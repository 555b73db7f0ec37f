"""The audit event model (spec §8.3): what is recorded, with which stable identifiers and bounds.

Pure: no I/O and no clock (the timestamp is passed in). Every event kind has a fixed 128-bit
``MESSAGE_ID``, generated once and written down here, as systemd's message catalogs do, so
``journalctl MESSAGE_ID=...`` keeps finding an event kind across releases. Never change one.

Two kinds of bad input are treated differently, on purpose:

* Values a programmer chooses (the event kind, field names, counters, pids, the decision) are
  validated strictly and raise ``ValueError``/``TypeError``: the unit tests catch those bugs.
* Free text (reason, message, addresses, IDs, test types) may carry strings a peer controls: an
  ID from an unknown certificate, a TLS alert, an error text. It is *bounded*, not rejected:
  control characters (newlines included) are escaped as ``\\xNN`` and over-long text is cut to a
  named limit, so a hostile string can neither forge extra log lines nor make us lose the record
  of the very connection that sent it.

Redaction (``redact``): any params key that names a secret (``token``, ``secret``, ``key``,
``password``, ``passphrase``, ``hmac_key``, ``cookie``, case-insensitive, ``-`` read as ``_``,
also as a ``_suffix`` such as ``pairing_token`` or ``auth_cookie``) has its value replaced by
``"[redacted]"`` at any nesting depth, before the event exists. Values under other names are not
inspected, so callers must keep secrets under such names.
"""

from __future__ import annotations

import json
import math
import unicodedata
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, Final

__all__ = [
    "INT_FIELDS",
    "MAX_MESSAGE_CHARS",
    "MAX_PARAMS_BYTES",
    "MAX_REASON_CHARS",
    "MESSAGE_IDS",
    "OPTIONAL_FIELDS",
    "REDACTED",
    "AuditEvent",
    "Decision",
    "EventKind",
    "format_ts",
    "journal_fields",
    "priority",
    "redact",
    "to_record",
]


class EventKind(StrEnum):
    """Everything the audit trail records; the value is the ``REFLECTOR_EVENT`` field."""

    CONNECTION_ACCEPT = "connection_accept"
    CONNECTION_DENY = "connection_deny"
    PAIRING_OPEN = "pairing_open"
    PAIRING_ENROLL = "pairing_enroll"
    PAIRING_DENY = "pairing_deny"
    PEER_ADDED = "peer_added"
    PEER_REMOVED = "peer_removed"
    IDENTITY_CREATED = "identity_created"
    IDENTITY_ROTATED = "identity_rotated"
    SESSION_GRANT = "session_grant"
    SESSION_DENY = "session_deny"
    REQUEST_DENY = "request_deny"
    SESSION_CLOSE = "session_close"
    ENGINE_START = "engine_start"
    ENGINE_EXIT = "engine_exit"
    ACCOUNTING = "accounting"
    SERVICE_START = "service_start"
    SERVICE_STOP = "service_stop"
    HOLE_OPEN = "hole_open"
    HOLE_CLOSE = "hole_close"


class Decision(StrEnum):
    """The outcome recorded for every authorization decision (``DECISION`` field)."""

    GRANT = "grant"
    DENY = "deny"


# Generated once with uuid4 and frozen: these identify the event kinds forever (see module doc).
MESSAGE_IDS: Final[Mapping[EventKind, uuid.UUID]] = {
    EventKind.CONNECTION_ACCEPT: uuid.UUID("504530ca9b64454882717435d7867c51"),
    EventKind.CONNECTION_DENY: uuid.UUID("ccc45d42fe7d4879b04ff00be17eceed"),
    EventKind.PAIRING_OPEN: uuid.UUID("02a0a0860ba74d9cad26e577ea32b635"),
    EventKind.PAIRING_ENROLL: uuid.UUID("a1c2e21e4d364f6ca6cc7af97caadc55"),
    EventKind.PAIRING_DENY: uuid.UUID("00ef5e51117f447088834041ea51dc69"),
    EventKind.PEER_ADDED: uuid.UUID("f045fbcb2dee4726b6fd85c9ac18db5a"),
    EventKind.PEER_REMOVED: uuid.UUID("edd587ff1c36481d9a2c2f510d7ac9c2"),
    EventKind.IDENTITY_CREATED: uuid.UUID("3b825986bd8f467280a7fa6a7c6c8115"),
    EventKind.IDENTITY_ROTATED: uuid.UUID("75b69b821565491899dcbd0164a627c8"),
    EventKind.SESSION_GRANT: uuid.UUID("8ac3ef09fdc34202b19d78e19f5f29eb"),
    EventKind.SESSION_DENY: uuid.UUID("0316c5fc4de64533bba53ab831af49ac"),
    EventKind.REQUEST_DENY: uuid.UUID("53d956f98f204aa69db0924bc52dde6b"),
    EventKind.SESSION_CLOSE: uuid.UUID("6247d05c46254efa8dff7d0927c9d630"),
    EventKind.ENGINE_START: uuid.UUID("0ca352d1d29442079f9e257852ba0ac2"),
    EventKind.ENGINE_EXIT: uuid.UUID("15f4ce6e98b640c79247824efded0fe5"),
    EventKind.ACCOUNTING: uuid.UUID("c91cca61b560471cb197965630c69369"),
    EventKind.SERVICE_START: uuid.UUID("2d50b40872af40c68c9c66ece92f47d2"),
    EventKind.SERVICE_STOP: uuid.UUID("3aaabb34fb2244ffa8f96fb85d56c84e"),
    EventKind.HOLE_OPEN: uuid.UUID("d8fa3b7448e049999c65b9173ef23f60"),
    EventKind.HOLE_CLOSE: uuid.UUID("e75bac2753414397afff04105e7fda55"),
}

# syslog priorities (journald's PRIORITY field).
_LOG_NOTICE: Final = 5
_LOG_INFO: Final = 6

# Kinds that *are* a decision: the decision is implied, and a deny must say why (spec §8.3).
_IMPLIED_DECISION: Final[Mapping[EventKind, Decision]] = {
    EventKind.CONNECTION_ACCEPT: Decision.GRANT,
    EventKind.CONNECTION_DENY: Decision.DENY,
    EventKind.PAIRING_ENROLL: Decision.GRANT,
    EventKind.PAIRING_DENY: Decision.DENY,
    EventKind.SESSION_GRANT: Decision.GRANT,
    EventKind.SESSION_DENY: Decision.DENY,
    EventKind.REQUEST_DENY: Decision.DENY,
}

# Notice rather than info: changes of who is trusted, and refusals, are what an operator scans for.
_NOTICE_KINDS: Final = frozenset(
    {
        EventKind.CONNECTION_DENY,
        EventKind.PAIRING_OPEN,
        EventKind.PAIRING_ENROLL,
        EventKind.PAIRING_DENY,
        EventKind.PEER_ADDED,
        EventKind.PEER_REMOVED,
        EventKind.IDENTITY_CREATED,
        EventKind.IDENTITY_ROTATED,
        EventKind.SESSION_DENY,
        EventKind.REQUEST_DENY,
    }
)

# Endpoint IDs are 37 characters and test IDs UUIDs (36); 128 leaves room for any future format
# while keeping a hostile certificate's "ID" from bloating every record.
MAX_ID_CHARS: Final = 128
# Test types and modes are short enum-like words ("throughput", "direct_ephemeral").
MAX_WORD_CHARS: Final = 64
# "[ffff:ffff:...:ffff%ifname]:65535" is about 60 characters.
MAX_ADDR_CHARS: Final = 72
# A reason is one sentence ("rate limit: 10 tests/hour exceeded"); 512 fits any error text worth
# keeping and keeps a record far below journald's and our line limits.
MAX_REASON_CHARS: Final = 512
# The one-line human summary: a terminal line or two.
MAX_MESSAGE_CHARS: Final = 1024
# Session params are a handful of small values (duration, streams, protocol); 4 KiB holds any
# honest request and bounds what a peer can make us store per record.
MAX_PARAMS_BYTES: Final = 4096
# Honest params are one or two levels deep; deeper is abuse, cut off rather than recursed into.
MAX_PARAMS_DEPTH: Final = 8
# Byte counters fit a signed 64-bit integer: what journald consumers and spreadsheets handle.
MAX_COUNTER: Final = 2**63 - 1
# Linux PID_MAX_LIMIT (include/linux/threads.h).
MAX_PID: Final = 4_194_304
# Exit codes are 0..255; Python reports death by signal N as -N, and SIGRTMAX is 64.
MIN_EXIT_CODE: Final = -64
MAX_EXIT_CODE: Final = 255

REDACTED: Final = "[redacted]"
_TOO_DEEP: Final = "[too deep]"
# Key names (and `_name` suffixes) whose values are secrets; see the module docstring.
_SECRET_KEY_NAMES: Final = frozenset(
    {"token", "secret", "key", "password", "passphrase", "hmac_key", "cookie"}
)


def redact(value: object) -> object:
    """Return a JSON-ready copy of `value` with every secret-named key's value replaced.

    Mappings and sequences are copied recursively (to at most MAX_PARAMS_DEPTH levels); keys
    become strings; non-finite floats and non-JSON objects become their ``str``. The input is
    never modified.
    """
    return _redact(value, 0)


def _redact(value: object, depth: int) -> object:
    if depth > MAX_PARAMS_DEPTH:
        return _TOO_DEEP
    if isinstance(value, Mapping):
        return {
            str(k): REDACTED if _is_secret_key(str(k)) else _redact(v, depth + 1)
            for k, v in value.items()
        }
    if isinstance(value, list | tuple):
        return [_redact(item, depth + 1) for item in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return value
    return str(value)


def _is_secret_key(name: str) -> bool:
    norm = name.lower().replace("-", "_")
    return norm in _SECRET_KEY_NAMES or any(norm.endswith("_" + s) for s in _SECRET_KEY_NAMES)


def bound_text(value: str, limit: int) -> str:
    """Make `value` one printable line of at most `limit` characters (see module docstring)."""
    if not isinstance(value, str):
        raise TypeError(f"expected str, got {type(value).__name__}")
    safe = "".join(_escape_char(c) for c in value)
    return safe if len(safe) <= limit else safe[: limit - 1] + "\u2026"


def _escape_char(char: str) -> str:
    # Cc: C0/C1 controls incl. \n \r \t; Zl/Zp: U+2028/U+2029, which some viewers break lines on.
    if unicodedata.category(char) in ("Cc", "Zl", "Zp"):
        code = ord(char)
        return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"
    return char


def _bounded_params(params: Mapping[str, object]) -> Mapping[str, object]:
    """Redact, then cap the serialized size: oversized params become a marker with their size."""
    cleaned = redact(params)
    assert isinstance(cleaned, dict)
    size = len(_params_json(cleaned).encode())
    if size > MAX_PARAMS_BYTES:
        return {"truncated_bytes": size}
    return cleaned


def _params_json(params: Mapping[str, object]) -> str:
    # Sorted and compact: the same params always give the same bytes in every sink.
    return json.dumps(params, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _check_int(name: str, value: object, low: int, high: int) -> None:
    # bool is an int subclass; True bytes is always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"audit field {name} must be an int, got {type(value).__name__}")
    if not low <= value <= high:
        raise ValueError(f"audit field {name}={value} outside {low}..{high}")


def format_ts(when: datetime) -> str:
    """UTC ISO-8601 with microseconds and a ``Z``: one fixed width, sortable as text."""
    if when.tzinfo is None:
        raise ValueError("audit timestamps must be timezone-aware")
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# (attribute, text limit) of the optional free-text fields, in record order.
_TEXT_FIELDS: Final = (
    ("peer_id", MAX_ID_CHARS),
    ("test_id", MAX_ID_CHARS),
    ("test_type", MAX_WORD_CHARS),
    ("mode", MAX_WORD_CHARS),
    ("source_addr", MAX_ADDR_CHARS),
    ("reason", MAX_REASON_CHARS),
)
# (attribute, low, high) of the optional integer fields, in record order.
_INT_FIELDS: Final = (
    ("pid", 1, MAX_PID),
    ("exit_code", MIN_EXIT_CODE, MAX_EXIT_CODE),
    ("runtime_ms", 0, MAX_COUNTER),
    ("bytes_rx", 0, MAX_COUNTER),
    ("bytes_tx", 0, MAX_COUNTER),
)
# Summary fields for the default MESSAGE, most telling first.
_SUMMARY_FIELDS: Final = (
    "peer_id",
    "source_addr",
    "test_type",
    "test_id",
    "mode",
    "decision",
    "reason",
    "pid",
    "exit_code",
    "runtime_ms",
    "bytes_rx",
    "bytes_tx",
)


@dataclass(frozen=True, kw_only=True)
class AuditEvent:
    """One audit record. Construction validates and bounds every field (see module docstring).

    `params` is stored already redacted and size-capped; `message` defaults to a one-line
    summary built from the other fields.
    """

    kind: EventKind
    ts: datetime
    endpoint_id: str
    peer_id: str | None = None
    test_id: str | None = None
    test_type: str | None = None
    params: Mapping[str, object] | None = None
    decision: Decision | None = None
    reason: str | None = None
    bytes_rx: int | None = None
    bytes_tx: int | None = None
    pid: int | None = None
    exit_code: int | None = None
    runtime_ms: int | None = None
    source_addr: str | None = None
    mode: str | None = None
    message: str = field(default="")

    def __post_init__(self) -> None:
        setter = object.__setattr__  # frozen: normalize in place once, here
        setter(self, "kind", EventKind(self.kind))
        format_ts(self.ts)  # rejects naive datetimes
        setter(self, "endpoint_id", bound_text(self.endpoint_id, MAX_ID_CHARS))
        for name, limit in _TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                setter(self, name, bound_text(value, limit))
        for name, low, high in _INT_FIELDS:
            value = getattr(self, name)
            if value is not None:
                _check_int(name, value, low, high)
        if self.params is not None:
            if not isinstance(self.params, Mapping):
                raise TypeError("audit field params must be a mapping")
            setter(self, "params", _bounded_params(self.params))
        setter(self, "decision", _decision_for(self.kind, self.decision))
        if self.decision is Decision.DENY and not self.reason:
            raise ValueError(f"audit event {self.kind} denies without a reason")
        summary = self.message or _summary(self)
        setter(self, "message", bound_text(summary, MAX_MESSAGE_CHARS))

    @property
    def message_id(self) -> uuid.UUID:
        return MESSAGE_IDS[self.kind]

    @property
    def params_json(self) -> str | None:
        return None if self.params is None else _params_json(self.params)


def _decision_for(kind: EventKind, given: Decision | str | None) -> Decision | None:
    decision = None if given is None else Decision(given)
    implied = _IMPLIED_DECISION.get(kind)
    if implied is None:
        return decision
    if decision is not None and decision is not implied:
        raise ValueError(f"audit event {kind} cannot carry decision={decision}")
    return implied


def _summary(event: AuditEvent) -> str:
    parts = [str(event.kind)]
    for name in _SUMMARY_FIELDS:
        value = getattr(event, name)
        if value is not None:
            parts.append(f"{name}={value}")
    return " ".join(parts)


def priority(kind: EventKind) -> int:
    """The syslog priority a kind is logged at (notice for trust changes and refusals)."""
    return _LOG_NOTICE if kind in _NOTICE_KINDS else _LOG_INFO


# Attribute order of the optional fields in records and journal entries.
OPTIONAL_FIELDS: Final = tuple(
    f.name for f in fields(AuditEvent) if f.name not in ("kind", "ts", "endpoint_id", "message")
)
INT_FIELDS: Final = frozenset(name for name, _, _ in _INT_FIELDS)


def to_record(event: AuditEvent) -> dict[str, Any]:
    """The event as the JSON-lines record body: lower-case keys, absent fields omitted.

    `params` is a JSON object here (and in exports); the chain adds ``seq`` and ``prev``.
    """
    record: dict[str, Any] = {
        "ts": format_ts(event.ts),
        "reflector_event": str(event.kind),
        "message_id": event.message_id.hex,
        "message": event.message,
        "endpoint_id": event.endpoint_id,
    }
    for name in OPTIONAL_FIELDS:
        value = getattr(event, name)
        if value is not None:
            record[name] = str(value) if isinstance(value, Decision) else value
    return record


def journal_fields(event: AuditEvent) -> dict[str, str]:
    """The event's own journald fields (upper case), without MESSAGE, MESSAGE_ID and PRIORITY.

    journald stores text, so integers are written in decimal and params as compact JSON.
    """
    out = {"REFLECTOR_EVENT": str(event.kind), "ENDPOINT_ID": event.endpoint_id}
    for name in OPTIONAL_FIELDS:
        value = getattr(event, name)
        if value is None:
            continue
        out[name.upper()] = _params_json(value) if name == "params" else str(value)
    return out
