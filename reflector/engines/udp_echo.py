"""The built-in UDP echo reflector (spec §7.2): a STAMP Session-Reflector that is never open.

It answers only packets that come from a granted peer's address *and* carry a valid HMAC under
that session's key, only until the session's deadline, at most `max_pps` per session, and never
with more octets than it received (spec §8.2 "clamp UDP echo rate", §1.1 "no persistent echo
server"). Everything else is dropped silently and counted by reason, so a scan or a flood learns
nothing and costs one HMAC at most.

Two layers, as everywhere in Reflector:
- `EchoCore`: every decision (which session, which drop reason, token bucket, expiry, the reply's
  fields), with time passed in. No sockets, no clock, no threads.
- `UdpEchoReflector`: one UDP socket and one thread that blocks in recvmsg. PERFORMANCE.md shows
  a plain blocking loop in a thread matches a C echo server (75k pps) while stdlib asyncio
  datagrams cost 2x the latency and a fifth of the rate. The thread runs only while a session is
  live and sleeps in the kernel until a packet or the last deadline: no wakeups when idle.

Several sessions may share one socket: in tunneled mode every UDP session uses the control
port's number. The reflector is stateful (RFC 8762 §4.3): each session numbers its replies, so
the sender can split loss into forward and reverse.

Timestamps: the receive timestamp is the kernel's (SO_TIMESTAMPNS) when available; the send
timestamp is read just before the reply is signed. Both are CLOCK_REALTIME, as NTP format needs.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import json
import math
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import FrameType, TracebackType
from typing import Any, Final, TextIO

from reflector.clocksync import TIMESYNCD_FLAG, read_kernel_clock
from reflector.engines.stamp import (
    AUTH_PACKET_LEN,
    KEY_LEN,
    MAX_PACKET_LEN,
    SessionKey,
    encode_error_estimate,
    reflect,
    seal_reflector,
    unix_ns_to_ntp,
)
from reflector.errors import ConfigError, ReflectorError

__all__ = [
    "DROP_REASONS",
    "MAX_PPS",
    "MAX_SESSIONS",
    "RATE_BURST_PACKETS",
    "EchoCore",
    "EchoStats",
    "PendingReply",
    "TokenBucket",
    "UdpEchoReflector",
    "read_clock_error_estimate",
    "run_standalone",
]

# A probe every 1 ms (the protocol's shortest interval) is 1,000 pps; ten times that leaves room
# for a future burst test while keeping one session far below anything that could hurt a host.
MAX_PPS: Final = 10_000
# Ten packets absorb a sender's scheduling hiccup (10 ms at 1 kpps) without letting a flood by.
RATE_BURST_PACKETS: Final = 10
# The most a datagram's kernel arrival time may predate its handling for the rate limit: more
# than a paused thread takes, less than could hide a clock step.
_MAX_QUEUED_S: Final = 1.0
# The policy allows one test at a time (spec §8.1); 64 bounds the per-packet key search and the
# table even if an operator raises that limit a lot.
MAX_SESSIONS: Final = 64
# One datagram larger than any valid probe: a longer one shows up as "too long" instead of being
# silently truncated. A small buffer also avoids the page faults of big reads (PERFORMANCE.md).
_RECV_BUFFER: Final = MAX_PACKET_LEN + 1
# Room for the timestamp, TTL and packet-info control messages with margin.
_ANCILLARY_BUFFER: Final = 256
# The receive timeout is re-armed only when it would overshoot the last deadline by more than
# this: a thread that lingers 0.25 s after a session is harmless and saves a syscall per packet.
_TIMEOUT_SLACK_S: Final = 0.25

# Why a packet was not answered. "source" and "length" packets may be unattributable to a
# session; they are always counted reflector-wide.
DROP_REASONS: Final = ("source", "length", "hmac", "expired", "rate", "send_error")

# Linux constants Python does not export (asm-generic values: x86-64, arm64, riscv).
_SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)
_IP_RECVTTL: Final = getattr(socket, "IP_RECVTTL", 12)
_IP_PKTINFO: Final = getattr(socket, "IP_PKTINFO", 8)
_TIMESPEC = struct.Struct("@ll")
_TIMEVAL = struct.Struct("@ll")  # SO_RCVTIMEO (0 would mean "forever": never arm less than 1 us)
_INT = struct.Struct("@i")
_IN_PKTINFO = struct.Struct("@i4s4s")
_IN6_PKTINFO = struct.Struct("@16sI")


# --------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EchoStats:
    """Packet and byte counts of a session (or the whole reflector); drops by reason."""

    rx_packets: int
    tx_packets: int
    rx_bytes: int
    tx_bytes: int
    dropped: Mapping[str, int]

    @property
    def dropped_total(self) -> int:
        return sum(self.dropped.values())

    def to_dict(self) -> dict[str, object]:
        return {
            "rx_packets": self.rx_packets,
            "tx_packets": self.tx_packets,
            "rx_bytes": self.rx_bytes,
            "tx_bytes": self.tx_bytes,
            "dropped": dict(self.dropped),
        }


@dataclass
class _Counters:
    rx_packets: int = 0
    tx_packets: int = 0
    rx_bytes: int = 0
    tx_bytes: int = 0
    dropped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(DROP_REASONS, 0))

    def received(self, size: int) -> None:
        self.rx_packets += 1
        self.rx_bytes += size

    def sent(self, size: int) -> None:
        self.tx_packets += 1
        self.tx_bytes += size

    def unsent(self, size: int) -> None:
        self.tx_packets -= 1
        self.tx_bytes -= size

    def snapshot(self) -> EchoStats:
        return EchoStats(
            rx_packets=self.rx_packets,
            tx_packets=self.tx_packets,
            rx_bytes=self.rx_bytes,
            tx_bytes=self.tx_bytes,
            dropped=dict(self.dropped),
        )


# --------------------------------------------------------------------------------------------
# The pure core
# --------------------------------------------------------------------------------------------


class TokenBucket:
    """`rate` tokens per second, at most `burst` saved up; one token per reflected packet."""

    def __init__(self, *, rate: float, burst: int, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self._tokens = float(burst)
        self._last = now

    def take(self, now: float) -> bool:
        elapsed = max(0.0, now - self._last)
        self._tokens = min(float(self.burst), self._tokens + elapsed * self.rate)
        self._last = max(self._last, now)
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True


@dataclass
class _Session:
    session_id: str
    peer_ip: str
    key: SessionKey
    deadline: float
    bucket: TokenBucket
    error_estimate: int
    next_seq: int = 0
    counters: _Counters = field(default_factory=_Counters)


@dataclass(frozen=True, kw_only=True)
class PendingReply:
    """A reply the core decided to send; `finish` signs it once the send time is known."""

    session_id: str
    key: SessionKey
    template: bytearray  # the whole reply but its Timestamp (T3) and HMAC

    @property
    def size(self) -> int:
        return len(self.template)

    def finish(self, tx_ntp: int) -> bytes:
        return seal_reflector(self.template, self.key, tx_ntp)


# Distinct source addresses whose canonical form is remembered (see normalize_ip).
NORMALIZE_CACHE_SIZE = 1024


@functools.lru_cache(maxsize=NORMALIZE_CACHE_SIZE)
def normalize_ip(text: str) -> str:
    """The canonical text of an address; IPv4-mapped IPv6 and zone suffixes reduced.

    Cached: it runs for every datagram (4.6 µs uncached, a fifth of the per-packet work), and a
    reflector sees few distinct sources; the bound keeps a spoofing flood from growing it.

    A dual-stack socket reports IPv4 peers as ::ffff:a.b.c.d, and a grant names them as a.b.c.d:
    both must compare equal, and nothing else may.
    """
    address = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(address)


class EchoCore:
    """Sessions, their keys, deadlines and rate buckets, and the decision for each packet.

    Time is the caller's monotonic clock in seconds (`now`); receive timestamps are NTP values.
    """

    def __init__(self) -> None:
        self._sessions: dict[str, _Session] = {}
        self._by_peer: dict[str, list[_Session]] = {}
        self._total = _Counters()

    def add_session(
        self,
        session_id: str,
        peer_ip: str,
        key: bytes,
        *,
        deadline: float,
        max_pps: int,
        error_estimate: int,
        now: float,
    ) -> None:
        if session_id in self._sessions:
            raise ValueError(f"echo session {session_id!r} already exists")
        if len(self._sessions) >= MAX_SESSIONS:
            raise ReflectorError(f"UDP echo reflector already serves {MAX_SESSIONS} sessions")
        if len(key) != KEY_LEN:
            raise ValueError(f"echo session key must be {KEY_LEN} bytes, got {len(key)}")
        if not 1 <= max_pps <= MAX_PPS:
            raise ValueError(f"echo max_pps must be between 1 and {MAX_PPS}, got {max_pps}")
        bucket = TokenBucket(rate=float(max_pps), burst=RATE_BURST_PACKETS, now=now)
        session = _Session(
            session_id=session_id,
            peer_ip=normalize_ip(peer_ip),
            key=SessionKey(key),
            deadline=deadline,
            bucket=bucket,
            error_estimate=error_estimate,
        )
        self._sessions[session_id] = session
        self._by_peer.setdefault(session.peer_ip, []).append(session)

    def remove_session(self, session_id: str) -> EchoStats:
        session = self._sessions.pop(session_id, None)
        if session is None:
            raise KeyError(f"no echo session {session_id!r}")
        peers = self._by_peer[session.peer_ip]
        peers.remove(session)
        if not peers:
            del self._by_peer[session.peer_ip]
        return session.counters.snapshot()

    def session_ids(self) -> list[str]:
        return list(self._sessions)

    def stats(self, session_id: str | None = None) -> EchoStats:
        """One session's counts, or (None) everything this reflector saw, unattributed too."""
        if session_id is None:
            return self._total.snapshot()
        session = self._sessions.get(session_id)
        if session is None:
            raise KeyError(f"no echo session {session_id!r}")
        return session.counters.snapshot()

    def last_deadline(self, now: float) -> float | None:
        """The latest deadline of a live session, or None when no session is live."""
        live = [s.deadline for s in self._sessions.values() if s.deadline > now]
        return max(live, default=None)

    def receive(
        self,
        data: bytes,
        source_ip: str,
        *,
        now: float,
        rx_ntp: int,
        ttl: int,
        arrived: float | None = None,
    ) -> PendingReply | None:
        """Decide what to do with one datagram: a reply to send, or None (dropped, counted).

        `arrived` is when the kernel received it, on the `now` clock: the rate limit counts
        packets as they arrived, so probes that queued while this thread was paused are not
        taken for a burst. Deadlines are checked against `now`.
        """
        self._total.received(len(data))
        session, reason = self._authorize(data, source_ip, now, now if arrived is None else arrived)
        if reason is not None:
            self._drop(session, reason)
            return None
        assert session is not None
        return self._reply(session, data, rx_ntp=rx_ntp, ttl=ttl)

    def _authorize(
        self, data: bytes, source_ip: str, now: float, arrived: float
    ) -> tuple[_Session | None, str | None]:
        """(the session the packet belongs to, or None; the drop reason, or None to reply).

        Checks run cheapest first; the HMAC is computed only for packets from a granted address.
        """
        candidates = self._by_peer.get(source_ip, [])
        if not candidates:
            return None, "source"
        # Blame pre-authentication drops on a session only when the peer has just one; with
        # several, no session can be picked without the key, so they stay reflector-wide.
        sole = candidates[0] if len(candidates) == 1 else None
        if sole is not None:
            sole.counters.received(len(data))
        if not AUTH_PACKET_LEN <= len(data) <= MAX_PACKET_LEN:
            return sole, "length"
        session = next((s for s in candidates if s.key.verify(data)), None)
        if session is None:
            return sole, "hmac"
        if session is not sole:
            session.counters.received(len(data))
        if now >= session.deadline:
            return session, "expired"
        if not session.bucket.take(arrived):
            return session, "rate"
        return session, None

    def record_send_failure(self, reply: PendingReply) -> None:
        """The socket refused a reply `receive` returned: count it as dropped, not sent.

        Replies are counted as sent when decided, so a session removed while its last reply is
        in flight still reports it.
        """
        self._total.unsent(reply.size)
        session = self._sessions.get(reply.session_id)
        if session is not None:
            session.counters.unsent(reply.size)
        self._drop(session, "send_error")

    def _drop(self, session: _Session | None, reason: str) -> None:
        self._total.dropped[reason] += 1
        if session is not None:
            session.counters.dropped[reason] += 1

    def _reply(self, session: _Session, data: bytes, *, rx_ntp: int, ttl: int) -> PendingReply:
        template = reflect(
            data,
            seq=session.next_seq,
            error_estimate=session.error_estimate,
            receive_timestamp=rx_ntp,
            sender_ttl=ttl,
        )
        session.next_seq = (session.next_seq + 1) % (1 << 32)
        # Counted when decided, so a session removed while this reply is in flight reports it.
        session.counters.sent(len(template))
        self._total.sent(len(template))
        return PendingReply(session_id=session.session_id, key=session.key, template=template)


# --------------------------------------------------------------------------------------------
# Host clock state (computed once per session)
# --------------------------------------------------------------------------------------------

TIMESYNC_FLAG: Final = TIMESYNCD_FLAG
# With only timesyncd's flag, the error is unknown; 10 ms is a typical NTP-over-Internet bound.
SYNCED_UNKNOWN_ERROR_S: Final = 0.010
# The kernel's own maximum error for an unsynchronized clock (NTP_PHASE_LIMIT, 16 s).
UNSYNCED_ERROR_S: Final = 16.0


def _adjtimex_state() -> tuple[bool, float] | None:
    """(synchronized, error bound in s) from a read-only adjtimex(2), None if not permitted."""
    try:
        clock = read_kernel_clock()
    except (OSError, AttributeError):  # e.g. EPERM from ProtectClock='s seccomp filter
        return None
    return clock.synchronized, clock.error_s


def read_clock_error_estimate() -> int:
    """The STAMP Error Estimate of this host's clock right now.

    Cheap by design (one syscall or one stat): a read-only adjtimex(2) gives the kernel's own
    view, which NTP daemons (chrony, ntpd, timesyncd) keep current. Where a seccomp filter
    denies adjtimex (systemd's ProtectClock= does), fall back to timesyncd's flag file; without
    either, report unsynchronized.
    """
    state = _adjtimex_state()
    if state is None:
        state = (True, SYNCED_UNKNOWN_ERROR_S) if TIMESYNC_FLAG.exists() else None
    synchronized, error_s = state if state is not None else (False, UNSYNCED_ERROR_S)
    return encode_error_estimate(synchronized=synchronized, error_s=error_s)


# --------------------------------------------------------------------------------------------
# The socket and its thread
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Ancillary:
    rx_unix_ns: int | None
    ttl: int
    reply_cmsgs: list[tuple[int, int, bytes]]


def _parse_ancillary(ancdata: Sequence[tuple[int, int, bytes]]) -> _Ancillary:
    """Kernel receive time, TTL/Hop Limit and the local address the packet was sent to."""
    rx_ns: int | None = None
    ttl = 0  # 0: the kernel gave no TTL (should not happen on Linux)
    reply: list[tuple[int, int, bytes]] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanos = _TIMESPEC.unpack_from(data)
            rx_ns = seconds * 1_000_000_000 + nanos
        elif (level, kind) in (
            (socket.IPPROTO_IP, socket.IP_TTL),
            (socket.IPPROTO_IPV6, socket.IPV6_HOPLIMIT),
        ):
            ttl = _INT.unpack_from(data)[0] & 0xFF
        elif level == socket.IPPROTO_IP and kind == _IP_PKTINFO:
            _, local, _ = _IN_PKTINFO.unpack_from(data)
            # Reply from the address the peer sent to, whatever the routing table prefers:
            # the peer's connected socket would discard a reply from any other address.
            reply.append((level, kind, _IN_PKTINFO.pack(0, local, bytes(4))))
        elif level == socket.IPPROTO_IPV6 and kind == socket.IPV6_PKTINFO:
            local6, ifindex = _IN6_PKTINFO.unpack_from(data)
            reply.append((level, kind, _IN6_PKTINFO.pack(local6, ifindex)))
    return _Ancillary(rx_unix_ns=rx_ns, ttl=ttl, reply_cmsgs=reply)


def _open_socket(bind: tuple[str, int]) -> socket.socket:
    host, port = bind
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError as exc:
        raise ConfigError(f"UDP echo bind address must be an IP address, got {host!r}") from exc
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        if family == socket.AF_INET6:
            # "::" means both stacks, whatever net.ipv6.bindv6only says.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVHOPLIMIT, 1)
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
        # On an IPv6 socket these apply to the IPv4-mapped traffic (Linux).
        sock.setsockopt(socket.IPPROTO_IP, _IP_RECVTTL, 1)
        sock.setsockopt(socket.IPPROTO_IP, _IP_PKTINFO, 1)
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise ReflectorError(f"cannot open UDP echo socket on {host} port {port}: {exc}") from exc
    return sock


class UdpEchoReflector:
    """A UDP socket that reflects STAMP packets for the sessions added to it.

    The socket is bound at construction (so the port can go into the grant) and closed by
    `close()`. A thread serves it while at least one session is live, blocked in recvmsg with a
    timeout that ends at the last deadline, and exits then; adding a session starts it again.
    A session removed early is forgotten at once (its packets are dropped from then on), but the
    blocked thread only notices at its next wakeup: a packet, that timeout, or `close()`.
    """

    def __init__(self, bind: tuple[str, int]) -> None:
        self._sock = _open_socket(bind)
        self._core = EchoCore()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        self._closing = False
        self._armed_timeout: float | None = None  # the SO_RCVTIMEO now set on the socket

    @property
    def address(self) -> tuple[str, int]:
        """The bound address and port (the port the kernel chose, if 0 was asked for)."""
        host, port = self._sock.getsockname()[:2]
        return str(host), int(port)

    def add_session(
        self,
        session_id: str,
        peer_ip: str,
        key: bytes,
        deadline_monotonic: float,
        max_pps: int,
    ) -> None:
        """Start answering `peer_ip`'s packets signed with `key` until `deadline_monotonic`."""
        error_estimate = read_clock_error_estimate()  # once per session, not per packet
        with self._lock:
            if self._closing:
                raise ReflectorError("UDP echo reflector is closed")
            self._core.add_session(
                session_id,
                peer_ip,
                key,
                deadline=deadline_monotonic,
                max_pps=max_pps,
                error_estimate=error_estimate,
                now=time.monotonic(),
            )
            self._armed_timeout = None  # a new deadline: the thread must re-arm its timeout
            if self._thread is None:
                self._idle.clear()
                self._thread = threading.Thread(
                    target=self._serve, name=f"udp-echo-{self.address[1]}", daemon=True
                )
                self._thread.start()

    def remove_session(self, session_id: str) -> EchoStats:
        """Stop answering a session and return its final counts."""
        with self._lock:
            return self._core.remove_session(session_id)

    def stats(self, session_id: str | None = None) -> EchoStats:
        """Counts so far for one session, or for everything the socket received (None)."""
        with self._lock:
            return self._core.stats(session_id)

    def session_ids(self) -> list[str]:
        with self._lock:
            return self._core.session_ids()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until the serving thread has exited (no live session); False on timeout."""
        return self._idle.wait(timeout)

    def request_stop(self) -> None:
        """Make `wait()` return and the thread stop: safe from a signal handler (takes no lock).

        The thread notices at its next wakeup; `close()` wakes it at once.
        """
        self._closing = True
        self._idle.set()

    def close(self) -> None:
        """Stop serving at once and release the port. Session counts stay readable."""
        with self._lock:
            self._closing = True
            thread = self._thread
        if thread is not None:
            # shutdown wakes a thread blocked in recvmsg (close alone does not on Linux).
            # ENOTCONN on an unconnected UDP socket, but Linux wakes the reader all the same.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            thread.join()
        self._sock.close()

    def __enter__(self) -> UdpEchoReflector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- the serving thread ------------------------------------------------------------------

    def _serve(self) -> None:
        try:
            while self._arm_timeout():
                try:
                    data, ancdata, _, addr = self._sock.recvmsg(_RECV_BUFFER, _ANCILLARY_BUFFER)
                except (BlockingIOError, InterruptedError):
                    continue  # the receive timeout fired: re-check the deadlines
                except OSError:
                    if self._closing:
                        break
                    raise
                if self._closing:
                    break
                self._handle(data, ancdata, addr)
        finally:
            with self._lock:
                if self._thread is threading.current_thread():
                    self._thread = None
                    self._idle.set()

    def _arm_timeout(self) -> bool:
        """Point the receive timeout at the last deadline; False (thread ends) if none is live.

        Deciding to end and clearing `_thread` happen under one lock, so a session added at
        that moment always finds no thread and starts a new one.
        """
        now = time.monotonic()
        with self._lock:
            last = None if self._closing else self._core.last_deadline(now)
            if last is None:
                self._thread = None
                self._idle.set()
                return False
            armed = self._armed_timeout
            if armed is not None and now + armed - last <= _TIMEOUT_SLACK_S:
                return True  # fires at most the slack after the last deadline: keep it
        total_us = max(1, math.ceil((last - now) * 1e6))
        seconds, micros = divmod(total_us, 1_000_000)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _TIMEVAL.pack(seconds, micros))
        with self._lock:
            self._armed_timeout = total_us / 1e6
        return True

    def _handle(self, data: bytes, ancdata: list[tuple[int, int, bytes]], addr: Any) -> None:
        anc = _parse_ancillary(ancdata)
        now, wall_ns = time.monotonic(), time.time_ns()
        rx_ns = anc.rx_unix_ns if anc.rx_unix_ns is not None else wall_ns
        # How long it waited in the socket buffer (bounded: a wall-clock step must not matter).
        queued = min(max(0.0, (wall_ns - rx_ns) / 1e9), _MAX_QUEUED_S)
        source = normalize_ip(str(addr[0]))
        with self._lock:
            pending = self._core.receive(
                data,
                source,
                now=now,
                rx_ntp=unix_ns_to_ntp(rx_ns),
                ttl=anc.ttl,
                arrived=now - queued,
            )
        if pending is None:
            return
        reply = pending.finish(unix_ns_to_ntp(time.time_ns()))
        try:
            self._sock.sendmsg([reply], anc.reply_cmsgs, 0, addr)
        except OSError:
            with self._lock:
                self._core.record_send_failure(pending)


# --------------------------------------------------------------------------------------------
# Standalone process (run by the privileged helper in its own transient scope)
# --------------------------------------------------------------------------------------------

# A standalone reflector lives at most as long as the longest test the protocol allows.
MAX_STANDALONE_DURATION_S: Final = 3600.0
STANDALONE_SESSION_ID: Final = "standalone"


def _parse_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"--bind must be HOST:PORT or [IPV6]:PORT, got {text!r}")
    return host, int(port)


def _read_key(stream: TextIO) -> bytes:
    try:
        key = bytes.fromhex(stream.readline().strip())
    except ValueError as exc:
        raise ConfigError("session key on stdin must be hex") from exc
    if len(key) != KEY_LEN:
        raise ConfigError(f"session key on stdin must be {KEY_LEN} bytes, got {len(key)}")
    return key


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m reflector.engines.udp_echo",
        description="Reflect STAMP packets for one granted peer; the hex key is read from stdin.",
    )
    parser.add_argument("--bind", required=True, help="HOST:PORT to listen on")
    parser.add_argument("--peer", required=True, help="the granted peer's IP address")
    parser.add_argument("--duration", required=True, type=float, help="seconds to serve")
    parser.add_argument("--max-pps", required=True, type=int, help="reply rate limit")
    return parser.parse_args(argv)


def run_standalone(argv: Sequence[str] | None = None) -> int:
    """Serve one session and print JSON lines on stdout: "listening", then the final stats.

    The key comes on stdin so it never appears in a process listing. SIGTERM or SIGINT end the
    session early; the stats are printed either way.
    """
    args = _parse_args(argv)
    try:
        bind = _parse_hostport(args.bind)
        peer = normalize_ip(args.peer)
    except ValueError as exc:
        raise ConfigError(f"--peer must be an IP address: {exc}") from exc
    duration = float(args.duration)
    if not 0 < duration <= MAX_STANDALONE_DURATION_S:
        raise ConfigError(f"--duration must be in (0, {MAX_STANDALONE_DURATION_S:g}] seconds")
    if not 1 <= args.max_pps <= MAX_PPS:
        raise ConfigError(f"--max-pps must be between 1 and {MAX_PPS}, got {args.max_pps}")
    key = _read_key(sys.stdin)
    with UdpEchoReflector(bind) as reflector:
        stop = _stop_on_signals(reflector)
        reflector.add_session(
            STANDALONE_SESSION_ID, peer, key, time.monotonic() + duration, args.max_pps
        )
        host, port = reflector.address
        _emit({"event": "listening", "host": host, "port": port, "peer": peer})
        reflector.wait(duration + 2 * _TIMEOUT_SLACK_S)
        reflector.close()  # joins the thread: nothing is in flight when the stats are read
        stats = reflector.remove_session(STANDALONE_SESSION_ID)
    _emit({"event": "stopped", "reason": stop.reason or "expired", **stats.to_dict()})
    return 0


@dataclass
class _StopReason:
    reason: str | None = None


def _stop_on_signals(reflector: UdpEchoReflector) -> _StopReason:
    stop = _StopReason()

    def handler(signum: int, _frame: FrameType | None) -> None:
        stop.reason = signal.Signals(signum).name
        reflector.request_stop()  # the with-block then closes the socket

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


def _emit(record: Mapping[str, object]) -> None:
    print(json.dumps(record, separators=(",", ":")), flush=True)


def main() -> None:
    try:
        sys.exit(run_standalone())
    except ReflectorError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)


if __name__ == "__main__":
    main()
