"""Sessions: the policy, quotas, scheduling windows and accounting behind SessionRequest.

Layers, bottom up: `clock` (the only module reading time), `windows` (time-of-day windows),
`accounting` (the sqlite ledger that survives restarts), `policy` (the pure grant/deny decision),
`manager` (active sessions, tokens, ports, expiry). The asyncio server calls `SessionManager`.
"""

from reflector.sessions.accounting import Ledger, LedgerError, PeerUsage, UsageStore
from reflector.sessions.clock import Instant, age_seconds, now
from reflector.sessions.manager import (
    CloseError,
    CloseErrorCode,
    Outcome,
    Session,
    SessionManager,
)
from reflector.sessions.policy import (
    ActiveTest,
    Deny,
    DenyReason,
    Grant,
    TestRequest,
    TestType,
    decide,
    policy_summary,
    quota_status,
)
from reflector.sessions.windows import Window, in_window, parse_window, seconds_until_open

__all__ = [
    "ActiveTest",
    "CloseError",
    "CloseErrorCode",
    "Deny",
    "DenyReason",
    "Grant",
    "Instant",
    "Ledger",
    "LedgerError",
    "Outcome",
    "PeerUsage",
    "Session",
    "SessionManager",
    "TestRequest",
    "TestType",
    "UsageStore",
    "Window",
    "age_seconds",
    "decide",
    "in_window",
    "now",
    "parse_window",
    "policy_summary",
    "quota_status",
    "seconds_until_open",
]
