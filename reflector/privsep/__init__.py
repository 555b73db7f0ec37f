"""Privilege separation: the parent's `EngineHost` and the small root helper behind it.

- `protocol`: the request table, framing and validation (pure).
- `scope`: engine command lines and transient-scope properties (pure).
- `supervisor`: engines and holes of running tests (shared by both hosts).
- `helper`: the socket-activated root daemon (`python -m reflector.privsep.helper`).
- `client`: `PrivsepClient`, `select_engine_host`; `local`: the fallback without systemd.

SECURITY.md describes the boundary.
"""

from reflector.privsep.client import (
    DEFAULT_HELPER_SOCKET,
    HELPER_UNAVAILABLE,
    EngineHost,
    HelperMissing,
    PrivsepClient,
    open_reader,
    select_engine_host,
)
from reflector.privsep.local import LocalEngineHost
from reflector.privsep.protocol import (
    EngineExit,
    EngineHandle,
    EngineLimits,
    FirewallUnavailable,
    PrivsepError,
)

__all__ = [
    "DEFAULT_HELPER_SOCKET",
    "HELPER_UNAVAILABLE",
    "EngineExit",
    "EngineHandle",
    "EngineHost",
    "EngineLimits",
    "FirewallUnavailable",
    "HelperMissing",
    "LocalEngineHost",
    "PrivsepClient",
    "PrivsepError",
    "open_reader",
    "select_engine_host",
]
