"""Sessions and test engines behind the control plane (spec §7, §8).

`EndpointService` extends the control-plane `Service` with what a granted session needs: the
pure `SessionManager` decides, this shell acts. On a grant it starts the engine (an iperf3
server or the built-in STAMP echo), on close or expiry it stops it, counts the bytes the data
plane carried (never what the peer claims), keeps the result for `get_result`, and audits
every step. Expiry runs on one timer armed for the next deadline: nothing wakes up while no
session exists.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import dataclasses
import functools
import json
import logging
import os
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from reflector.audit import AuditLog
from reflector.config import Config
from reflector.engines.iperf import EngineError
from reflector.engines.throughput_result import grant_mismatches
from reflector.engines.udp_echo import UdpEchoReflector, normalize_ip
from reflector.errors import ReflectorError
from reflector.firewall import hole_ttl_s
from reflector.fsutil import atomic_write
from reflector.identity import Identity
from reflector.link.messages import (
    ErrorResponse,
    GetResult,
    GetStatus,
    Ok,
    Request,
    Response,
    Result,
    SessionClose,
    SessionGrant,
    SessionRequest,
    StatusSnapshot,
    ThroughputParams,
)
from reflector.privsep import EngineLimits, PrivsepError, select_engine_host
from reflector.server.hosted_iperf import HostedIperf
from reflector.server.link_protocol import LinkProtocol
from reflector.server.service import Service, ServiceDeps
from reflector.sessions import (
    Deny,
    DenyReason,
    LedgerError,
    Outcome,
    Session,
    SessionManager,
    TestType,
    UsageStore,
)
from reflector.sessions import clock as session_clock
from reflector.status import STATUS_FILE_NAME
from reflector.tunnel.relay import TunnelCounters
from reflector.tunnel.server_end import (
    TunnelGrant,
    TunnelRefusal,
    TunnelRefused,
    TunnelServerProtocol,
    connections_for_streams,
)

_log = logging.getLogger(__name__)

# Finished results kept for `get_result`; an appliance fetches its result right after the
# test, so a few dozen cover every peer's latest run without unbounded memory.
MAX_KEPT_RESULTS = 64
# A port the OS refuses (someone else bound it) is retried with another one from the range.
MAX_PORT_ATTEMPTS = 3
# After the engine of a closed session is told to stop, how long we wait for its report.
ENGINE_STOP_TIMEOUT_SEC = 10.0
# On a peer's SessionClose, iperf3 (--one-off) is usually finishing on its own: give it this
# long to write its JSON before it is stopped. Expiry does not wait.
ENGINE_EXIT_GRACE_SEC = 3.0
# The latency-under-load probe key of a throughput session, like the UDP echo's (256 bits).
ECHO_KEY_BYTES = 32
# The state dir failing (disk full, I/O errors): refuse, and suggest retrying after a minute.
STATE_UNAVAILABLE = DenyReason.STATE_UNAVAILABLE.value
STATE_RETRY_AFTER_SEC = 60
# get_result while the engine still runs: ask again this soon.
RESULT_PENDING_RETRY_SEC = 1
# While sessions run, the bytes the relay and the echo have counted so far (in direct mode: the
# kernel's counters of the session's holes, read through the helper) are written to the ledger
# this often, so a crash or kill -9 of the parent loses at most this much of a peer's usage.
# One small sqlite UPDATE (and in direct mode one helper request) per session each time, and no
# timer at all when nothing runs.
ACCOUNTING_CHECKPOINT_SEC = 5.0


@dataclass
class _Run:
    """The engine side of one active session."""

    session: Session
    counters: TunnelCounters = field(default_factory=TunnelCounters)
    iperf: HostedIperf | None = None
    iperf_task: asyncio.Task[None] | None = None
    echo: UdpEchoReflector | None = None
    echo_key: tuple[str, int] | None = None
    echo_secret: bytes | None = None  # throughput sessions: the latency-under-load probe key
    holes: bool = False  # direct mode: the engine host opened holes for this session
    started_mono: float = field(default_factory=time.monotonic)
    # What the ledger already holds for this session (written by checkpoints).
    charged_rx: int = 0
    charged_tx: int = 0

    def live_bytes(self) -> tuple[int, int]:
        """(rx, tx) the data plane has counted so far, from the counters it owns."""
        rx = tx = 0
        if self.iperf is not None and self.session.mode == "tunneled":
            rx, tx = self.counters.upstream_bytes, self.counters.downstream_bytes
        if self.echo is not None and self.session.session_id in self.echo.session_ids():
            stats = self.echo.stats(self.session.session_id)
            rx, tx = rx + stats.rx_bytes, tx + stats.tx_bytes
        return rx, tx

    def charge(self, store: UsageStore, rx: int, tx: int) -> None:
        """Bring the ledger up to the totals (rx, tx); counters only grow, so never down."""
        delta_rx, delta_tx = max(0, rx - self.charged_rx), max(0, tx - self.charged_tx)
        if delta_rx or delta_tx:
            store.record_bytes(self.session.session_id, delta_rx, delta_tx)
        self.charged_rx, self.charged_tx = self.charged_rx + delta_rx, self.charged_tx + delta_tx


class EndpointService(Service):
    """The control plane plus sessions, engines, tunnel and accounting."""

    def __init__(
        self,
        config: Config,
        identity: Identity,
        audit: AuditLog,
        deps: ServiceDeps | None = None,
    ) -> None:
        super().__init__(config, identity, audit, deps)
        self.store = UsageStore.open(config.state_dir)
        # Tests a crashed or killed predecessor left open: the manager closes them as
        # interrupted (they still count against quotas); the audit trail says so, once each.
        interrupted = self.store.unfinished()
        self.manager = SessionManager.from_config(config, self.store, session_clock.now())
        for session_id, peer_id, test_type in interrupted:
            audit.emit(
                "session_close",
                peer_id=peer_id,
                test_id=session_id,
                test_type=test_type,
                reason=Outcome.INTERRUPTED.value,
            )
        self.runs: dict[str, _Run] = {}
        self.results: collections.OrderedDict[str, tuple[str, dict[str, Any]]] = (
            collections.OrderedDict()
        )
        self._echoes: dict[tuple[str, int], UdpEchoReflector] = {}
        # Engines and direct-mode holes go through the engine host: the privileged helper
        # (transient scopes, nftables) when its socket exists, else local child processes.
        self.engine_host = select_engine_host(config)
        self.engine_limits = EngineLimits.from_config(config)
        self._timer: asyncio.TimerHandle | None = None
        self._checkpoint_timer: asyncio.TimerHandle | None = None
        self._checkpointing: asyncio.Task[None] | None = None
        # Sessions ended by expiry, a dropped link or a failed engine, being finished.
        self._finishing: dict[str, asyncio.Task[None]] = {}
        self._ending: dict[str, _Run] = {}  # sessions being finished, until their result is kept

    async def prepare(self) -> None:
        """Before READY=1: in direct mode, Reflector's nftables table must be in place.

        Raises ReflectorError with the reason otherwise, so a direct-mode endpoint never serves
        (or tells systemd it is ready) without the drop rule over its data ports.
        """
        if self.config.network.mode != "direct_ephemeral":
            return
        try:
            await self.engine_host.prepare_firewall()
        except PrivsepError as exc:
            raise ReflectorError(
                f"direct mode needs Reflector's nftables table, which cannot be set up: {exc}"
            ) from None

    # --- control-plane hooks

    async def handle_session_request(self, link: LinkProtocol, request: Request) -> Response:
        if isinstance(request, SessionRequest):
            return await self._request(link, request)
        if isinstance(request, SessionClose):
            return await self._close(link, request)
        if isinstance(request, GetStatus):
            try:
                status = self.manager.status(link.peer_id, session_clock.now())
            except LedgerError:
                return ErrorResponse(
                    request_id=request.request_id,
                    code=STATE_UNAVAILABLE,
                    message="the endpoint cannot read its usage records right now",
                    retry_after=STATE_RETRY_AFTER_SEC,
                )
            return StatusSnapshot(
                request_id=request.request_id,
                sessions=tuple(status["sessions"]),
                quota=status["quota"],
            )
        if isinstance(request, GetResult):
            return self._result(link, request)
        return await super().handle_session_request(link, request)

    def on_peer_link_closed(self, peer_id: str) -> None:
        if any(link.peer_id == peer_id and link.authorized for link in self.links):
            return  # another connection of the same appliance is still open
        self.manager.peer_disconnected(peer_id, session_clock.now())
        self._rearm()

    def on_peer_authorized(self, peer_id: str) -> None:
        self.manager.peer_reconnected(peer_id)
        self._rearm()

    def on_peer_revoked(self, peer_id: str) -> None:
        now = session_clock.now()
        for session in [s for s in self.manager.active_sessions if s.peer_id == peer_id]:
            closed = self.manager.close(session.session_id, peer_id, now, Outcome.PEER_GONE)
            if isinstance(closed, Session):
                self._spawn_finish(closed)
        self._rearm()

    def tunnel_protocol(self, peer_id: str, source: tuple[str, int]) -> asyncio.Protocol:
        return TunnelServerProtocol(
            peer_id, source, self._authorize_tunnel, on_refused=self._tunnel_refused
        )

    async def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._checkpoint_timer is not None:
            self._checkpoint_timer.cancel()
            self._checkpoint_timer = None
        if self._checkpointing is not None:  # the finishes below charge everything
            self._checkpointing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._checkpointing
        for session in self.manager.shutdown(session_clock.now()):
            self._spawn_finish(session)
        if self._finishing:
            await asyncio.gather(*self._finishing.values(), return_exceptions=True)
        for echo in self._echoes.values():
            echo.close()
        self._echoes.clear()
        # Engines left by a failed finish, and any hole, go too (the helper keeps its table:
        # with no holes, the data range stays closed).
        with contextlib.suppress(PrivsepError):
            await self.engine_host.close()
        self.publish_status(running=False)
        self.store.close()
        await super().close()

    def status_line(self) -> str:
        return f"Endpoint {self.identity.endpoint_id}, {len(self.runs)} active sessions"

    def publish_status(self, *, running: bool = True) -> None:
        """Refresh systemd's STATUS= and `status.json` (read by `reflector status`).

        Written on every change, never on a timer, so an idle endpoint stays idle.
        """
        if self.on_status is not None:
            self.on_status(self.status_line())
        try:
            snapshot = self.manager.snapshot(session_clock.now())
        except LedgerError as exc:
            snapshot = {"error": str(exc)}
        doc = {
            "endpoint_id": self.identity.endpoint_id,
            "running": running,
            "pid": os.getpid(),
            "mode": self.config.network.mode,
            "engine_host": self.engine_host.name,
            "updated": time.time(),
            **snapshot,
        }
        try:
            atomic_write(
                self.config.state_dir / STATUS_FILE_NAME,
                json.dumps(doc, indent=2, sort_keys=True).encode(),
                0o600,
            )
        except OSError as exc:
            _log.warning("cannot write %s: %s", STATUS_FILE_NAME, exc)

    # --- session_request

    async def _request(self, link: LinkProtocol, request: SessionRequest) -> Response:
        now = session_clock.now()
        params = _params_dict(request)
        refusal = self._mode_refusal(request)
        if refusal is not None:
            self.audit.emit(
                "session_deny",
                peer_id=link.peer_id,
                test_type=request.test_type,
                params=params,
                reason=refusal.code,
                source_addr=link.source[0],
            )
            return dataclasses.replace(refusal, request_id=request.request_id)
        try:
            decision = self.manager.request(link.peer_id, request.test_type, request.params, now)
        except LedgerError as exc:
            # Fail closed: what cannot be accounted is not granted.
            _log.error("session refused, usage cannot be recorded: %s", exc)
            decision = Deny(
                reason=DenyReason.STATE_UNAVAILABLE,
                message="the endpoint cannot record usage right now (state storage failing)",
                retry_after=STATE_RETRY_AFTER_SEC,
            )
        if isinstance(decision, Deny):
            self.audit.emit(
                "session_deny",
                peer_id=link.peer_id,
                test_type=request.test_type,
                params=params,
                reason=decision.reason.value,
                source_addr=link.source[0],
            )
            return ErrorResponse(
                request_id=request.request_id,
                code=decision.reason.value,
                message=decision.message,
                retry_after=decision.retry_after,
            )
        session = decision
        run_or_refusal = await self._set_up(link, session, request.request_id)
        if isinstance(run_or_refusal, ErrorResponse):
            return run_or_refusal
        run, ports = run_or_refusal
        session = run.session
        self.runs[session.session_id] = run
        self._arm_checkpoint()
        self.audit.emit(
            "session_grant",
            peer_id=link.peer_id,
            test_id=session.session_id,
            test_type=request.test_type,
            params=params,
            mode=session.mode,
            source_addr=link.source[0],
        )
        self.audit.emit(
            "engine_start",
            peer_id=link.peer_id,
            test_id=session.session_id,
            test_type=request.test_type,
            pid=run.iperf.pid if run.iperf else None,
            params={"ports": ports},
        )
        self._rearm()
        self.publish_status()
        fields = run.session.grant_fields()
        fields["ports"] = ports
        if run.echo_secret is not None:
            fields["extra"] = {**fields["extra"], "hmac_key": _b64(run.echo_secret)}
        return SessionGrant(request_id=request.request_id, **fields)

    def _mode_refusal(self, request: SessionRequest) -> ErrorResponse | None:
        """UDP throughput cannot ride the TCP tunnel: refuse it before any quota is spent."""
        params = request.params
        if (
            self.config.network.mode == "tunneled"
            and isinstance(params, ThroughputParams)
            and params.protocol == "udp"
        ):
            return ErrorResponse(
                code="udp_not_tunneled",
                message="UDP throughput needs direct_ephemeral mode; this endpoint is tunneled"
                " (use TCP, or the UDP echo for latency and loss)",
            )
        return None

    async def _set_up(
        self, link: LinkProtocol, session: Session, request_id: int
    ) -> tuple[_Run, dict[str, int]] | ErrorResponse:
        """Firewall first, then the engine: if nftables fails, nothing has listened at all.

        Direct mode opens the peer's hole before any engine binds the public address, so a
        firewall failure refuses the session with no port ever reachable (fail closed); an
        engine that then fails to start takes its hole with it.
        """
        direct = session.mode == "direct_ephemeral"
        try:
            await self._open_holes(link, session)
        except PrivsepError as exc:
            return self._refuse_setup(link, session, request_id, "firewall_unavailable", exc)
        try:
            run, ports = await self._start_engine(link, session)
        except EngineError as exc:
            if direct:
                await self._close_holes_of(session)
            self._abort_grant(link, session, exc.code, str(exc))
            return ErrorResponse(request_id=request_id, code=exc.code, message=str(exc))
        run.holes = direct
        if direct and run.session.port != session.port:  # iperf3 had to take another port
            await self._close_holes_of(session)
            try:
                await self._open_holes(link, run.session)
            except PrivsepError as exc:
                await self._stop_engines(run)
                return self._refuse_setup(
                    link, run.session, request_id, "firewall_unavailable", exc
                )
        return run, ports

    def _refuse_setup(
        self, link: LinkProtocol, session: Session, request_id: int, code: str, exc: Exception
    ) -> ErrorResponse:
        message = f"cannot open the data port: {exc}"
        self._abort_grant(link, session, code, message)
        return ErrorResponse(request_id=request_id, code=code, message=message)

    async def _open_holes(self, link: LinkProtocol, session: Session) -> None:
        """Direct mode: let exactly this peer reach exactly this session's data port.

        Raises PrivsepError (e.g. `firewall_unavailable`): the grant is then withdrawn.
        """
        if session.mode != "direct_ephemeral":
            return
        protos = ["udp"] if session.test_type is TestType.UDP_ECHO else ["tcp"]
        params = session.params
        if isinstance(params, ThroughputParams) and params.protocol == "udp":
            protos.append("udp")
        remaining = max(0.0, session.deadline - session_clock.now().boottime)
        peer = normalize_ip(link.source[0])
        for n, proto in enumerate(protos):
            try:
                await self.engine_host.open_hole(
                    test_id=session.session_id,
                    peer_addr=peer,
                    proto=proto,
                    port=session.port,
                    ttl_s=hole_ttl_s(remaining),
                )
            except PrivsepError:
                if n > 0:  # no half-open session: the first protocol's hole goes too
                    await self._close_holes_of(session)
                raise
        self.audit.emit(
            "hole_open",
            peer_id=session.peer_id,
            test_id=session.session_id,
            source_addr=peer,
            params={"port": session.port, "protocols": protos},
        )

    async def _close_holes(self, run: _Run) -> int | None:
        """Close the session's holes; the kernel's byte count (both ways), if any."""
        if not run.holes:
            return None
        return await self._close_holes_of(run.session)

    async def _close_holes_of(self, session: Session) -> int | None:
        try:
            totals = await self.engine_host.close_hole(session.session_id)
        except PrivsepError as exc:  # the kernel's timeout closes it anyway
            _log.error("cannot close the holes of %s: %s", session.session_id, exc)
            return None
        total = totals.bytes if totals is not None else 0
        self.audit.emit(
            "hole_close",
            peer_id=session.peer_id,
            test_id=session.session_id,
            bytes_rx=total,
        )
        return total

    async def _stop_engines(self, run: _Run) -> None:
        if run.iperf is not None:
            await run.iperf.stop()
        if run.echo is not None and run.echo_key is not None:
            run.echo.remove_session(run.session.session_id)

    def _abort_grant(self, link: LinkProtocol, session: Session, code: str, message: str) -> None:
        """The engine (or its firewall hole) could not be set up: end the session, audit."""
        closed = self.manager.close(
            session.session_id, session.peer_id, session_clock.now(), Outcome.FAILED
        )
        self.audit.emit(
            "session_deny",
            peer_id=link.peer_id,
            test_id=session.session_id,
            test_type=session.test_type.value,
            reason=code,
            message=f"engine failed to start: {message}",
        )
        if isinstance(closed, Session):
            self._remember(closed, {"error": {"code": code, "message": message}})

    async def _start_engine(
        self, link: LinkProtocol, session: Session
    ) -> tuple[_Run, dict[str, int]]:
        local_host = str(link.local[0]) if link.local else "127.0.0.1"
        control_port = int(link.local[1]) if link.local else 0
        tunneled = session.mode == "tunneled"
        if session.test_type is TestType.UDP_ECHO:
            return self._start_echo(link, session, local_host, control_port, tunneled)
        bind = "127.0.0.1" if tunneled else local_host
        peer = link.source[0]
        run, ports = await self._start_iperf(session, bind, peer, control_port, tunneled)
        # Every throughput session also answers STAMP probes (its own key, same rate clamp),
        # so an appliance can measure latency under load within one grant (bufferbloat).
        secret = secrets.token_bytes(ECHO_KEY_BYTES)
        try:
            # On the control port's number over UDP in both modes: in direct mode the data
            # port's UDP side belongs to iperf3 (UDP tests), and the base ruleset opens it.
            echo_run, echo_ports = self._start_echo(
                link, run.session, local_host, control_port, True, secret
            )
        except EngineError:
            if run.iperf is not None:
                await run.iperf.stop()
            raise
        run.echo, run.echo_key, run.echo_secret = echo_run.echo, echo_run.echo_key, secret
        return run, {**ports, **echo_ports}

    async def _start_iperf(
        self, session: Session, bind: str, peer: str, control_port: int, tunneled: bool
    ) -> tuple[_Run, dict[str, int]]:
        last_error: EngineError | None = None
        for _ in range(MAX_PORT_ATTEMPTS):
            iperf = HostedIperf(
                self.engine_host,
                test_id=session.session_id,
                port=session.port,
                bind=bind,
                peer=normalize_ip(peer),
                duration_s=session.duration_sec,
                limits=self.engine_limits,
            )
            try:
                await iperf.start()
            except EngineError as exc:
                last_error = exc
                if exc.code != "port_unavailable":
                    raise
                moved = self.manager.allocate_port(session.session_id, exclude=(session.port,))
                if moved is None:
                    raise
                session = moved
                continue
            run = _Run(session=session, iperf=iperf)
            deadline = time.monotonic() + max(0.0, session.deadline - session_clock.now().boottime)
            run.iperf_task = asyncio.get_running_loop().create_task(iperf.wait(deadline))
            run.iperf_task.add_done_callback(functools.partial(self._engine_ended, run))
            ports = {"tunnel": control_port} if tunneled else {"data": session.port}
            return run, ports
        assert last_error is not None
        raise last_error

    def _start_echo(
        self,
        link: LinkProtocol,
        session: Session,
        local_host: str,
        control_port: int,
        tunneled: bool,
        secret: bytes | None = None,
    ) -> tuple[_Run, dict[str, int]]:
        # Tunneled: the control port's number over UDP. Direct: the session's data port (UDP
        # and TCP are separate port spaces, so an iperf3 on the same number does not clash).
        port = control_port if tunneled else session.port
        key = (local_host, port)
        echo = self._echoes.get(key)
        if echo is None:
            try:
                echo = UdpEchoReflector(key)
            except OSError as exc:
                raise EngineError(
                    "port_unavailable", f"cannot bind UDP {local_host}:{port}: {exc.strerror}"
                ) from None
            self._echoes[key] = echo
        key_bytes = secret if secret is not None else session.hmac_key
        assert key_bytes is not None
        left = max(0.0, session.deadline - session_clock.now().boottime)
        echo.add_session(
            session.session_id,
            normalize_ip(link.source[0]),
            key_bytes,
            time.monotonic() + left,
            session.max_pps or self.config.quotas.max_udp_echo_pps,
        )
        return _Run(session=session, echo=echo, echo_key=key), {"udp": port}

    # --- session_close, expiry, results

    async def _close(self, link: LinkProtocol, request: SessionClose) -> Response:
        closed = self.manager.close(request.session_id, link.peer_id, session_clock.now())
        if not isinstance(closed, Session) and self._ended_on_its_own(request.session_id, link):
            # E.g. its engine failed: closing is done. Answered, as any close is, once the
            # session's result is kept, so the peer's get_result that follows finds it.
            finishing = self._finishing.get(request.session_id)
            if finishing is not None:
                await asyncio.wait([finishing])
            return Ok(request_id=request.request_id)
        if not isinstance(closed, Session):
            return ErrorResponse(
                request_id=request.request_id, code=closed.code.value, message=closed.message
            )
        await self._finish(closed, graceful=True)
        self._rearm()
        return Ok(request_id=request.request_id)

    def _ended_on_its_own(self, session_id: str, link: LinkProtocol) -> bool:
        """The peer's own session already ended (finishing now, or its result kept)."""
        run = self.runs.get(session_id) or self._ending.get(session_id)
        if run is not None:
            return run.session.peer_id == link.peer_id
        kept = self.results.get(session_id)
        return kept is not None and kept[0] == link.peer_id

    def _result(self, link: LinkProtocol, request: GetResult) -> Response:
        kept = self.results.get(request.session_id)
        if kept is not None:
            owner, result = kept
            if owner != link.peer_id:
                return ErrorResponse(
                    request_id=request.request_id,
                    code="not_your_session",
                    message=f"session {request.session_id!r} belongs to another peer",
                )
            return Result(
                request_id=request.request_id, session_id=request.session_id, result=result
            )
        ending = self._ending.get(request.session_id)
        if ending is not None and ending.session.peer_id == link.peer_id:
            return ErrorResponse(
                request_id=request.request_id,
                code="result_pending",
                message="the test has ended; its result is being collected",
                retry_after=RESULT_PENDING_RETRY_SEC,
            )
        run = self.runs.get(request.session_id)
        if run is not None and run.session.peer_id == link.peer_id:
            if run.iperf is not None and run.iperf_task is not None and run.iperf_task.done():
                return Result(
                    request_id=request.request_id,
                    session_id=request.session_id,
                    result=self._iperf_result(run),
                )
            return ErrorResponse(
                request_id=request.request_id,
                code="result_pending",
                message="the test is still running; close the session or ask again",
                retry_after=RESULT_PENDING_RETRY_SEC,
            )
        return ErrorResponse(
            request_id=request.request_id,
            code="unknown_session",
            message=f"no result for session {request.session_id!r}",
        )

    def _rearm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        delay = self.manager.next_timeout(session_clock.now())
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(max(0.0, delay), self._expire)

    def _expire(self) -> None:
        self._timer = None
        for session in self.manager.expire(session_clock.now()):
            self._spawn_finish(session)
        self._rearm()

    def _engine_ended(self, run: _Run, _task: asyncio.Task[None]) -> None:
        """iperf3 exited while its session lives: a failed engine ends the session now.

        Its port, its tunnel slot and the peer's one-test-at-a-time slot are freed at once
        instead of at the deadline; a clean exit (the test done) waits for the peer's close.
        """
        session_id = run.session.session_id
        if self.runs.get(session_id) is not run or run.iperf is None:
            return  # already finishing: this is the stop that _finish asked for
        if not isinstance(run.iperf.result(), EngineError) or run.iperf.timed_out:
            return
        closed = self.manager.close(
            session_id, run.session.peer_id, session_clock.now(), Outcome.FAILED
        )
        if isinstance(closed, Session):
            self._spawn_finish(closed)
            self._rearm()

    def _arm_checkpoint(self) -> None:
        if self._checkpoint_timer is None and self._checkpointing is None and self.runs:
            loop = asyncio.get_running_loop()
            self._checkpoint_timer = loop.call_later(ACCOUNTING_CHECKPOINT_SEC, self._checkpoint)

    def _checkpoint(self) -> None:
        self._checkpoint_timer = None
        self._checkpointing = asyncio.get_running_loop().create_task(self._checkpoint_runs())

    async def _checkpoint_runs(self) -> None:
        """Write every running session's bytes so far to the ledger (see the constant)."""
        try:
            for run in list(self.runs.values()):
                await self._checkpoint_run(run)
        except asyncio.CancelledError:  # shutdown: the finishes charge everything
            self._checkpointing = None
            raise
        except Exception:  # a bug must not switch checkpoints off for good
            _log.exception("byte checkpoint failed")
        self._checkpointing = None
        self._arm_checkpoint()

    async def _checkpoint_run(self, run: _Run) -> None:
        rx, tx = run.live_bytes()
        if run.holes:
            kernel_bytes = await self._read_holes(run)
            if self.runs.get(run.session.session_id) is not run:
                return  # it ended meanwhile, and its end charged all of it
            rx, tx = with_kernel_bytes(run.session, kernel_bytes, rx, tx)
        try:
            run.charge(self.store, rx, tx)
        except LedgerError as exc:  # the end of the session tries again
            _log.error("cannot checkpoint the bytes of %s: %s", run.session.session_id, exc)

    async def _read_holes(self, run: _Run) -> int | None:
        """Direct mode: the bytes the session's holes have carried so far, or None if unknown."""
        try:
            totals = await self.engine_host.read_hole(run.session.session_id)
        except (PrivsepError, OSError) as exc:  # e.g. the helper timed out; the close reads again
            _log.warning("cannot read the holes of %s: %s", run.session.session_id, exc)
            return None
        return totals.bytes if totals is not None else None

    def _spawn_finish(self, session: Session) -> None:
        task = asyncio.get_running_loop().create_task(self._finish(session))
        self._finishing[session.session_id] = task
        task.add_done_callback(functools.partial(self._finished, session.session_id))

    def _finished(self, session_id: str, task: asyncio.Task[None]) -> None:
        if self._finishing.get(session_id) is task:
            del self._finishing[session_id]

    async def _finish(self, session: Session, *, graceful: bool = False) -> None:
        """Stop the engine of an ended session, account its bytes, keep its result, audit."""
        run = self.runs.pop(session.session_id, None)
        if run is None:
            return
        # Until its result is kept, get_result and session_close find it ending, not unknown.
        self._ending[session.session_id] = run
        try:
            await self._wind_up(session, run, graceful)
        finally:
            del self._ending[session.session_id]

    async def _wind_up(self, session: Session, run: _Run, graceful: bool) -> None:
        run.counters.stop_all()
        result: dict[str, Any]
        pid = exit_code = None
        rx = tx = 0
        result = {"test_type": session.test_type.value}
        if run.iperf is not None:
            await self._stop_iperf(run, graceful)
            result = self._iperf_result(run)
            pid, exit_code = run.iperf.pid, run.iperf.exit_code
            rx, tx = self._iperf_bytes(run, result)
        if run.echo is not None and run.echo_key is not None:
            stats = run.echo.remove_session(session.session_id)
            result["reflector"] = stats.to_dict()
            rx, tx = rx + stats.rx_bytes, tx + stats.tx_bytes
            if not run.echo.session_ids():
                run.echo.close()
                self._echoes.pop(run.echo_key, None)
        kernel_bytes = await self._close_holes(run)
        counted = rx, tx
        rx, tx = with_kernel_bytes(session, kernel_bytes, rx, tx)
        if (rx, tx) != counted:  # the kernel saw more than the engines counted
            result["firewall_bytes"] = kernel_bytes
        try:
            run.charge(self.store, rx, tx)
        except LedgerError as exc:
            _log.error("cannot record the bytes of session %s: %s", session.session_id, exc)
            result["accounting_error"] = "usage could not be recorded"
        self._remember(session, result)
        self._audit_finish(session, run, pid, exit_code, rx, tx)
        self.publish_status()

    async def _stop_iperf(self, run: _Run, graceful: bool) -> None:
        assert run.iperf is not None
        if graceful and run.iperf_task is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(run.iperf_task), ENGINE_EXIT_GRACE_SEC)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(run.iperf.stop(), ENGINE_STOP_TIMEOUT_SEC)
        if run.iperf_task is not None:
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(run.iperf_task, ENGINE_STOP_TIMEOUT_SEC)

    def _iperf_result(self, run: _Run) -> dict[str, Any]:
        assert run.iperf is not None
        outcome = run.iperf.result()
        if isinstance(outcome, EngineError):
            return {
                "test_type": "throughput",
                "error": {"code": outcome.code, "message": str(outcome)},
            }
        doc = outcome.to_dict()
        doc["test_type"] = "throughput"
        granted = run.session.params
        if isinstance(granted, ThroughputParams):
            # iperf3's server cannot refuse what the client runs: say what exceeded the grant.
            doc["grant_mismatches"] = list(
                grant_mismatches(
                    outcome.params,
                    protocol="udp" if granted.protocol == "udp" else "tcp",
                    streams=granted.streams,
                    reverse=granted.reverse,
                    duration_s=granted.duration_sec,
                )
            )
        doc["tunnel_bytes"] = {
            "upstream": run.counters.upstream_bytes,
            "downstream": run.counters.downstream_bytes,
        }
        return doc

    def _iperf_bytes(self, run: _Run, result: dict[str, Any]) -> tuple[int, int]:
        if run.session.mode == "tunneled":
            return run.counters.upstream_bytes, run.counters.downstream_bytes
        return engine_reported_bytes(result)

    def _remember(self, session: Session, result: dict[str, Any]) -> None:
        result = {
            **result,
            "session_id": session.session_id,
            "outcome": session.outcome.value if session.outcome else None,
        }
        self.results[session.session_id] = (session.peer_id, result)
        while len(self.results) > MAX_KEPT_RESULTS:
            self.results.popitem(last=False)

    def _audit_finish(
        self, session: Session, run: _Run, pid: int | None, exit_code: int | None, rx: int, tx: int
    ) -> None:
        runtime_ms = int((time.monotonic() - run.started_mono) * 1000)
        common = {
            "peer_id": session.peer_id,
            "test_id": session.session_id,
            "test_type": session.test_type.value,
        }
        self.audit.emit(
            "engine_exit",
            **common,
            pid=pid,
            exit_code=exit_code if exit_code is None or exit_code >= 0 else 128 - exit_code,
            runtime_ms=runtime_ms,
        )
        outcome = session.outcome.value if session.outcome else "closed"
        self.audit.emit("session_close", **common, reason=outcome, mode=session.mode)
        self.audit.emit("accounting", **common, bytes_rx=rx, bytes_tx=tx)

    # --- tunnel

    def _authorize_tunnel(self, peer_id: str, session_id: str, token: str) -> TunnelGrant:
        if not self.peers.is_authorized(peer_id):
            raise TunnelRefused("unknown_peer", "this appliance is not authorized here")
        session = self.manager.check_token(session_id, token, peer_id, session_clock.now())
        if session is None:
            raise TunnelRefused("bad_token", "no live session of yours with this token")
        run = self.runs.get(session.session_id)
        if run is None or run.iperf is None or session.mode != "tunneled":
            raise TunnelRefused("not_tunneled", "this session has no tunneled engine")
        return TunnelGrant(
            target=("127.0.0.1", run.session.port),
            counters=run.counters,
            max_connections=connections_for_streams(session.streams or 1),
        )

    def _tunnel_refused(self, refusal: TunnelRefusal) -> None:
        self.audit.emit(
            "connection_deny",
            peer_id=refusal.peer_id,
            test_id=refusal.session_id,
            source_addr=refusal.source[0],
            reason=refusal.code,
            mode="tunnel",
        )


def with_kernel_bytes(
    session: Session, kernel_bytes: int | None, rx: int, tx: int
) -> tuple[int, int]:
    """(rx, tx) with the kernel's per-hole count (both ways, headers included) as the authority.

    Direct mode: where the holes carried more than the engines counted, the direction the test
    loads (upload unless a reverse throughput test) is charged the difference.
    """
    if kernel_bytes is None or kernel_bytes <= rx + tx:
        return rx, tx
    upload = not (isinstance(session.params, ThroughputParams) and session.params.reverse)
    return (kernel_bytes - tx, tx) if upload else (rx, kernel_bytes - rx)


def engine_reported_bytes(result: Mapping[str, Any]) -> tuple[int, int]:
    """(rx, tx) of a direct-mode throughput test from iperf3's own (normalized) report.

    The endpoint's count (`bytes_transferred`) went in one direction: received on an upload,
    sent on a download. A failed run reports nothing (0, 0); the hole's kernel counter, when
    larger, overrides this in `_finish`.
    """
    moved = result.get("bytes_transferred")
    if type(moved) is not int or moved < 0:
        return 0, 0
    return (0, moved) if result.get("direction") == "download" else (moved, 0)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii")


def _params_dict(request: SessionRequest) -> dict[str, Any]:
    return dataclasses.asdict(request.params)


def decode_hmac_key(grant_extra: dict[str, Any]) -> bytes:
    """The UDP echo key from a grant's `extra` (URL-safe base64)."""
    return base64.urlsafe_b64decode(str(grant_extra["hmac_key"]))
