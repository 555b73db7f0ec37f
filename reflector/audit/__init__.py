"""The audit trail (spec §8.3): every grant, deny and test recorded, exportable for support.

* events.py: the event model, its stable MESSAGE_IDs, field bounds and redaction (pure).
* chain.py: the hash chain of the JSON-lines file and its verification.
* sinks.py: journald and JSON-lines sinks, and the fail-safe `AuditLog`.
* query.py: reading both back with filters, and jsonl/csv export.
"""

from reflector.audit.chain import VerifyResult, verify_chain
from reflector.audit.events import MESSAGE_IDS, REDACTED, AuditEvent, Decision, EventKind, redact
from reflector.audit.query import (
    CSV_COLUMNS,
    EXPORT_FORMATS,
    format_records,
    normalize_journal_entry,
    read_journal,
    read_jsonl,
)
from reflector.audit.sinks import (
    AUDIT_FILE_NAME,
    AuditLog,
    AuditSink,
    JournalSink,
    JsonlSink,
    open_audit_log,
)

__all__ = [
    "AUDIT_FILE_NAME",
    "CSV_COLUMNS",
    "EXPORT_FORMATS",
    "MESSAGE_IDS",
    "REDACTED",
    "AuditEvent",
    "AuditLog",
    "AuditSink",
    "Decision",
    "EventKind",
    "JournalSink",
    "JsonlSink",
    "VerifyResult",
    "format_records",
    "normalize_journal_entry",
    "open_audit_log",
    "read_journal",
    "read_jsonl",
    "redact",
    "verify_chain",
]
