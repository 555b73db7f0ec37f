"""The session manager: who holds which test session, with which secret and port, until when.

Stateful but pure: it never reads the clock (every call takes `now`) and never touches the
network; its one side effect is the `Ledger` (accounting that must survive restarts). The
asyncio shell drives it the way aioquic's adapter drives a connection: call `request`/`close`/
`check_token` as messages arrive, then arm ONE timer for `next_timeout(now)` seconds and call
`expire(now)` when it fires; whatever sessions that returns must have their engines stopped.

Deadlines are CLOCK_BOOTTIME values (see `clock`), so a wall-clock step neither cuts a test
short nor extends it; `expires_at` in a grant is the same deadline in wall time, for the peer.
A token is valid only while its session is active: closing or expiring a session removes it,
so its token can never validate again.
"""

from __future__ import annotations

import base64
import dataclasses
import hmac
import logging
import secrets
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from reflector.config import Config, Iperf3Config, NetworkConfig, QuotaConfig
from reflector.errors import ConfigError
from reflector.link.messages import ThroughputParams, UdpEchoParams
from reflector.sessions.accounting import HOUR_SEC, Ledger, LedgerError
from reflector.sessions.clock import Instant
from reflector.sessions.policy import (
    ActiveTest,
    Deny,
    DenyReason,
    TestRequest,
    TestType,
    decide,
    quota_status,
    retry_after_seconds,
)
from reflector.sessions.windows import parse_window

__all__ = [
    "HMAC_KEY_BYTES",
    "SESSION_ID_BYTES",
    "SETUP_SLACK_SEC",
    "TOKEN_BYTES",
    "CloseError",
    "CloseErrorCode",
    "Outcome",
    "Session",
    "SessionManager",
]

# 12 random bytes = 16 URL-safe characters: short in logs, and 96 bits cannot be guessed.
SESSION_ID_BYTES: Final = 12
# The data-plane secret: 256 bits, far beyond the 128 bits needed against guessing.
TOKEN_BYTES: Final = 32
# HMAC-SHA256 key for signing UDP echo probes: the hash's block-size-safe, full-strength length.
HMAC_KEY_BYTES: Final = 32
# A session outlives its test by this much: time for the peer to connect after the grant and
# for the engine to finish its last interval and report (iperf3 needs a few seconds for both).
SETUP_SLACK_SEC: Final = 15
# Old accounting rows are pruned at most this often (on a request), not on every request.
PRUNE_INTERVAL_SEC: Final = HOUR_SEC
# The parsed `params` of a SessionRequest, one type per test_type.
SessionParams = ThroughputParams | UdpEchoParams
# The one data port a grant names (SessionGrant.ports maps a role to a port).
DATA_PORT_ROLE: Final = "data"

_log = logging.getLogger(__name__)


class Outcome(StrEnum):
    """How a session ended; stored in the ledger and reported to the audit log."""

    CLOSED = "closed"  # the peer sent SessionClose
    EXPIRED = "expired"  # its deadline passed
    PEER_GONE = "peer_gone"  # the peer disconnected and did not return within the grace
    FAILED = "failed"  # the engine could not start or died
    SHUTDOWN = "shutdown"  # the service stopped
    INTERRUPTED = "interrupted"  # found unfinished at start-up: the previous process died


class CloseErrorCode(StrEnum):
    UNKNOWN_SESSION = "unknown_session"
    NOT_YOUR_SESSION = "not_your_session"


@dataclass(frozen=True, kw_only=True)
class CloseError:
    """Why a close was refused; `code` is the wire error code."""

    code: CloseErrorCode
    message: str


@dataclass(frozen=True, kw_only=True)
class Session:
    """One granted test. Secrets are left out of repr so they never reach a log by accident."""

    session_id: str
    peer_id: str
    test_type: TestType
    params: SessionParams
    mode: str
    port: int
    token: str = field(repr=False)
    hmac_key: bytes | None = field(repr=False)
    started: Instant
    expires_at: float  # wall clock, for the peer
    deadline: float  # CLOCK_BOOTTIME, what actually governs expiry
    duration_sec: int
    streams: int | None
    bitrate_cap_bps: int | None
    max_pps: int | None  # UDP echo rate clamp
    bytes_rx: int = 0
    bytes_tx: int = 0
    ended: Instant | None = None
    outcome: Outcome | None = None

    @property
    def ports(self) -> dict[str, int]:
        return {DATA_PORT_ROLE: self.port}

    def grant_fields(self) -> dict[str, Any]:
        """The fields of the SessionGrant message for this session (secrets included)."""
        extra: dict[str, Any] = {"duration_sec": self.duration_sec}
        if self.streams is not None:
            extra["streams"] = self.streams
        if self.bitrate_cap_bps is not None:
            extra["max_bitrate_bps"] = self.bitrate_cap_bps
        if self.max_pps is not None:
            extra["max_pps"] = self.max_pps
        if self.hmac_key is not None:
            extra["hmac_key"] = base64.urlsafe_b64encode(self.hmac_key).decode("ascii")
        return {
            "session_id": self.session_id,
            "test_id": self.session_id,  # the spec's name for it (§6.3)
            "test_type": self.test_type.value,
            "mode": self.mode,
            "ports": self.ports,
            "token": self.token,
            "expires_at": self.expires_at,
            "extra": extra,
        }

    def public_view(self, now: Instant) -> dict[str, Any]:
        """JSON-able facts about the session without its secrets (status and snapshots)."""
        view: dict[str, Any] = {
            "session_id": self.session_id,
            "test_type": self.test_type.value,
            "mode": self.mode,
            "ports": self.ports,
            "duration_sec": self.duration_sec,
            "expires_at": self.expires_at,
            "seconds_left": max(0.0, round(self.deadline - now.boottime, 3)),
            "bytes_rx": self.bytes_rx,
            "bytes_tx": self.bytes_tx,
        }
        if self.outcome is not None:
            view["outcome"] = self.outcome.value
        return view


class SessionManager:
    """Active sessions, ports, tokens and disconnect grace; decisions via `policy.decide`."""

    def __init__(
        self,
        *,
        quotas: QuotaConfig,
        iperf3: Iperf3Config,
        network: NetworkConfig,
        ledger: Ledger,
        now: Instant,
    ) -> None:
        """Check the quota windows and time zone (ConfigError), then settle the ledger: tests
        a previous process left running are ended as `interrupted` and old rows pruned."""
        _check_schedule(quotas)
        self._quotas = quotas
        self._iperf3 = iperf3
        self._network = network
        self._ledger = ledger
        self._sessions: dict[str, Session] = {}
        self._grace: dict[str, float] = {}  # peer_id -> boottime its sessions expire
        self._last_port = network.data_port_range_end  # so the first pick is the range start
        ledger.close_unfinished(now, Outcome.INTERRUPTED)
        ledger.prune(now)
        self._last_prune = now.boottime

    @classmethod
    def from_config(cls, config: Config, ledger: Ledger, now: Instant) -> SessionManager:
        return cls(
            quotas=config.quotas,
            iperf3=config.iperf3,
            network=config.network,
            ledger=ledger,
            now=now,
        )

    # --- Granting and checking

    def request(
        self, peer_id: str, test_type: str, params: SessionParams, now: Instant
    ) -> Session | Deny:
        """Decide on a session request; on grant, record it in the ledger and return it.

        `params` must be the parsed params of `test_type` (ValueError otherwise: a caller bug).
        """
        self._maybe_prune(now)
        request = _to_request(test_type, params)
        decision = decide(
            request,
            peer_id,
            now,
            self._quotas,
            self._iperf3,
            self._ledger.peer_usage(peer_id, now),
            self._active_tests(now),
        )
        if isinstance(decision, Deny):
            return decision
        port = self._pick_port(exclude=())
        if port is None:
            return self._no_port(now)
        lifetime = decision.duration_sec + SETUP_SLACK_SEC
        udp = decision.test_type is TestType.UDP_ECHO
        session = Session(
            session_id=self._new_session_id(),
            peer_id=peer_id,
            test_type=decision.test_type,
            params=params,
            mode=self._network.mode,
            port=port,
            token=secrets.token_urlsafe(TOKEN_BYTES),
            hmac_key=secrets.token_bytes(HMAC_KEY_BYTES) if udp else None,
            started=now,
            expires_at=now.wall + lifetime,
            deadline=now.boottime + lifetime,
            duration_sec=decision.duration_sec,
            streams=decision.streams,
            bitrate_cap_bps=decision.bitrate_cap_bps,
            max_pps=self._quotas.max_udp_echo_pps if udp else None,
        )
        # Ledger first: if the record cannot be written, nothing is granted.
        self._ledger.record_start(
            session_id=session.session_id,
            peer_id=peer_id,
            test_type=session.test_type.value,
            started=now,
        )
        self._sessions[session.session_id] = session
        self._last_port = port
        return session

    def check_token(
        self, session_id: str | None, token: str, peer_id: str, now: Instant
    ) -> Session | None:
        """The active session `token` belongs to, if `peer_id` may use it now; else None.

        With `session_id` None every active session is tried (for data planes that carry only
        the token). A closed or expired session's token, or another peer's, never validates.
        """
        if session_id is not None:
            candidate = self._sessions.get(session_id)
            candidates = [candidate] if candidate is not None else []
        else:
            candidates = list(self._sessions.values())
        offered = token.encode("utf-8", "surrogatepass")
        match = None
        for session in candidates:  # compare with every one: timing says nothing of which
            if hmac.compare_digest(offered, session.token.encode("ascii")):
                match = session
        if match is None or match.peer_id != peer_id or self._is_over(match, now):
            return None
        return match

    def session(self, session_id: str) -> Session | None:
        """The active session with this id, if any."""
        return self._sessions.get(session_id)

    @property
    def active_sessions(self) -> list[Session]:
        return list(self._sessions.values())

    def record_bytes(self, session_id: str, rx: int, tx: int) -> Session | None:
        """Add data-plane counter deltas to a session (active or already closed).

        Returns the updated active session, or None when it is no longer active (the bytes
        still count against the peer's daily quota if the ledger knows the session).
        """
        self._ledger.record_bytes(session_id, rx, tx)
        session = self._sessions.get(session_id)
        if session is None:
            return None
        session = dataclasses.replace(
            session, bytes_rx=session.bytes_rx + rx, bytes_tx=session.bytes_tx + tx
        )
        self._sessions[session_id] = session
        return session

    # --- Ending sessions

    def close(
        self, session_id: str, peer_id: str, now: Instant, reason: Outcome = Outcome.CLOSED
    ) -> Session | CloseError:
        """End a session on behalf of `peer_id`; returns it with its outcome and accounting."""
        session = self._sessions.get(session_id)
        if session is None:
            return CloseError(
                code=CloseErrorCode.UNKNOWN_SESSION,
                message=f"no active session {session_id!r} (already closed or expired?)",
            )
        if session.peer_id != peer_id:
            return CloseError(
                code=CloseErrorCode.NOT_YOUR_SESSION,
                message=f"session {session_id!r} belongs to another peer",
            )
        return self._finish(session, now, reason)

    def expire(self, now: Instant) -> list[Session]:
        """End every session past its deadline or its peer's disconnect grace; return them."""
        due = [s for s in self._sessions.values() if self._is_over(s, now)]
        return [
            self._finish(
                s, now, Outcome.EXPIRED if now.boottime >= s.deadline else Outcome.PEER_GONE
            )
            for s in due
        ]

    def shutdown(self, now: Instant) -> list[Session]:
        """End every active session because the service is stopping."""
        return [self._finish(s, now, Outcome.SHUTDOWN) for s in list(self._sessions.values())]

    def next_deadline(self) -> float | None:
        """The CLOCK_BOOTTIME at which `expire` next has work, or None if never."""
        deadlines = [s.deadline for s in self._sessions.values()]
        deadlines.extend(self._grace.values())
        return min(deadlines, default=None)

    def next_timeout(self, now: Instant) -> float | None:
        """Seconds from `now` until `expire` should be called (never negative), or None."""
        deadline = self.next_deadline()
        return None if deadline is None else max(0.0, deadline - now.boottime)

    def peer_disconnected(self, peer_id: str, now: Instant) -> None:
        """Start the grace (`quotas.session_grace_sec`) after which the peer's sessions end.

        A second disconnect does not extend a grace already running.
        """
        if any(s.peer_id == peer_id for s in self._sessions.values()):
            self._grace.setdefault(peer_id, now.boottime + self._quotas.session_grace_sec)

    def peer_reconnected(self, peer_id: str) -> None:
        """Cancel the peer's disconnect grace: its sessions live on to their own deadlines."""
        self._grace.pop(peer_id, None)

    # --- Ports

    def allocate_port(self, session_id: str, exclude: Collection[int] = ()) -> Session | None:
        """Move an active session to another free data port (the shell could not bind its
        current one); `exclude` lists ports known to be unusable. None if no port is left or
        the session is not active; the session then keeps its old port."""
        session = self._sessions.get(session_id)
        if session is None:
            return None
        port = self._pick_port(exclude={*exclude, session.port})
        if port is None:
            return None
        session = dataclasses.replace(session, port=port)
        self._sessions[session_id] = session
        self._last_port = port
        return session

    # --- Reporting

    def status(self, peer_id: str, now: Instant) -> dict[str, Any]:
        """The peer's own sessions and remaining quota (the GetStatus reply), JSON-able."""
        own = [s.public_view(now) for s in self._sessions.values() if s.peer_id == peer_id]
        usage = self._ledger.peer_usage(peer_id, now)
        return {"sessions": own, "quota": quota_status(peer_id, self._quotas, usage, now)}

    def snapshot(self, now: Instant) -> dict[str, Any]:
        """Everything for the operator's `reflector status`: all sessions, usage per peer."""
        active = [{"peer_id": s.peer_id, **s.public_view(now)} for s in self._sessions.values()]
        peers = set(self._ledger.peers_seen(now)) | {s.peer_id for s in self._sessions.values()}
        usage = {
            peer: quota_status(peer, self._quotas, self._ledger.peer_usage(peer, now), now)
            for peer in sorted(peers)
        }
        grace = {
            peer: max(0.0, round(deadline - now.boottime, 3))
            for peer, deadline in self._grace.items()
        }
        return {
            "active_sessions": active,
            "max_concurrent_tests": self._quotas.max_concurrent_tests,
            "peers": usage,
            "disconnected_peers_grace_sec": grace,
        }

    # --- Internals

    def _finish(self, session: Session, now: Instant, outcome: Outcome) -> Session:
        # Revoke first: even if the ledger write fails, the token is dead.
        del self._sessions[session.session_id]
        if not any(s.peer_id == session.peer_id for s in self._sessions.values()):
            self._grace.pop(session.peer_id, None)
        try:
            self._ledger.record_end(session.session_id, now, outcome.value)
        except LedgerError as exc:
            # The session is over all the same (engine stopped, token dead); the next start
            # marks the unfinished row `interrupted`, so the test still counts.
            _log.error("cannot record the end of session %s: %s", session.session_id, exc)
        return dataclasses.replace(session, ended=now, outcome=outcome)

    def _is_over(self, session: Session, now: Instant) -> bool:
        grace = self._grace.get(session.peer_id)
        return now.boottime >= session.deadline or (grace is not None and now.boottime >= grace)

    def _active_tests(self, now: Instant) -> list[ActiveTest]:
        return [
            ActiveTest(
                peer_id=s.peer_id,
                test_type=s.test_type,
                seconds_left=max(0.0, s.deadline - now.boottime),
            )
            for s in self._sessions.values()
        ]

    def _pick_port(self, exclude: Collection[int]) -> int | None:
        """The next free port after the last one handed out, wrapping around the range.

        Rotating rather than reusing the lowest free port keeps a just-closed session's port
        idle for a while, so its stray packets (or a stale firewall rule in direct mode) do not
        meet the next session.
        """
        lo, hi = self._network.data_port_range_start, self._network.data_port_range_end
        used = {s.port for s in self._sessions.values()} | set(exclude)
        size = hi - lo + 1
        first = (self._last_port - lo + 1) % size
        for step in range(size):
            port = lo + (first + step) % size
            if port not in used:
                return port
        return None

    def _no_port(self, now: Instant) -> Deny:
        left = [a.seconds_left for a in self._active_tests(now)]
        return Deny(
            reason=DenyReason.NO_PORT_AVAILABLE,
            message="every data port of this endpoint is in use",
            retry_after=retry_after_seconds(min(left)) if left else None,
        )

    def _new_session_id(self) -> str:
        while True:  # a collision is practically impossible, but costs nothing to rule out
            candidate = secrets.token_urlsafe(SESSION_ID_BYTES)
            # The ID keys nftables holes and engine scopes, whose validators refuse a leading
            # '-' or '_' (as an option or a hidden name would start): token_urlsafe gives one
            # 1 time in 32, which would fail that session's hole in direct mode.
            if candidate[0].isalnum() and candidate not in self._sessions:
                return candidate

    def _maybe_prune(self, now: Instant) -> None:
        if now.boottime - self._last_prune >= PRUNE_INTERVAL_SEC:
            self._ledger.prune(now)
            self._last_prune = now.boottime


def _to_request(test_type: str, params: SessionParams) -> TestRequest:
    kind = TestType(test_type)
    if kind is TestType.THROUGHPUT and isinstance(params, ThroughputParams):
        return TestRequest(
            test_type=kind,
            duration_sec=params.duration_sec,
            streams=params.streams,
            bitrate_bps=params.bitrate_bps,
        )
    if kind is TestType.UDP_ECHO and isinstance(params, UdpEchoParams):
        return TestRequest(test_type=kind, duration_sec=params.duration_sec)
    raise ValueError(f"params {type(params).__name__} do not belong to test_type {test_type!r}")


def _check_schedule(quotas: QuotaConfig) -> None:
    """Refuse at start-up what `decide` could not use later (ConfigError names the key)."""
    try:
        ZoneInfo(quotas.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"quotas.timezone: unknown time zone {quotas.timezone!r}") from None
    keyed = [("quotas.heavy_tests_window", quotas.heavy_tests_window)]
    keyed += [
        (f'quotas.peers."{peer}".heavy_tests_window', p.heavy_tests_window)
        for peer, p in quotas.peers.items()
    ]
    for key, text in keyed:
        if text:
            try:
                parse_window(text)
            except ValueError as exc:
                raise ConfigError(f"{key}: {exc}") from None
