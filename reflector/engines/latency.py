"""The appliance side of a UDP echo test: an authenticated STAMP Session-Sender (RFC 8762).

`LatencyRecorder` is the pure part: it builds each probe (given the send time) and digests each
reply (given the receive time) into RTT, jitter, loss, reordering and duplicate counts. The
`measure_latency` shell only paces the probes and moves datagrams.

RTT is measured on this host's clock alone (reply receive time minus probe send time), so the
two hosts' clocks need not agree. The reflector's own processing time (its send timestamp T3
minus its receive timestamp T2, both on its clock) is subtracted to give the network RTT, as
RFC 8762 §4 intends. Receive times are kernel timestamps (SO_TIMESTAMPNS) where available.

Because Reflector's echo is stateful (it numbers its replies per session), loss splits into
forward (probe never reached the reflector, or its rate clamp dropped it) and reverse (the
reply was lost on the way back); a stateless third-party reflector makes all loss look reverse.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import socket
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Final

from reflector.engines.stamp import (
    AUTH_PACKET_LEN,
    MAX_PACKET_LEN,
    SenderPacket,
    SessionKey,
    StampError,
    decode_error_estimate,
    decode_reflector,
    encode_sender,
    ntp_delta_ns,
    unix_ns_to_ntp,
)
from reflector.engines.udp_echo import read_clock_error_estimate

__all__ = [
    "MAX_PACKETS",
    "MIN_INTERVAL_S",
    "REPLY_WAIT_S",
    "LatencyProgress",
    "LatencyRecorder",
    "LatencyResult",
    "Summary",
    "measure_latency",
]

# 60 s at the 1 ms minimum interval is 60,000 probes; 100,000 bounds memory (one send time per
# probe) and run time for any parameters the protocol accepts.
MAX_PACKETS: Final = 100_000
# The protocol's shortest probe interval (reflector.link.messages: interval_ms >= 1).
MIN_INTERVAL_S: Final = 0.001
# A reply later than this after the last probe counts as lost: beyond any sane path's RTT, and
# the test must end promptly.
REPLY_WAIT_S: Final = 1.0
# Progress reports at most this often: a UI needs no more.
PROGRESS_INTERVAL_S: Final = 1.0
# A sender that fell behind its schedule (a stalled thread, a busy CPU) catches up at most this
# many times faster than its interval, never in one burst: a burst would queue behind itself and
# count as latency, and beyond the reflector's small burst allowance it is dropped as over-rate.
CATCH_UP_SPEEDUP: Final = 2.0

_NS_PER_MS: Final = 1_000_000
_SO_TIMESTAMPNS: Final = getattr(socket, "SO_TIMESTAMPNS", 35)  # asm-generic Linux value
_TIMESPEC = struct.Struct("@ll")


@dataclass(frozen=True, kw_only=True)
class Summary:
    """Distribution of a set of durations, in milliseconds (nearest-rank percentiles)."""

    count: int
    min_ms: float
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, samples_ns: Sequence[int]) -> Summary | None:
        if not samples_ns:
            return None
        ordered = sorted(samples_ns)
        return cls(
            count=len(ordered),
            min_ms=ordered[0] / _NS_PER_MS,
            mean_ms=sum(ordered) / len(ordered) / _NS_PER_MS,
            p50_ms=_percentile(ordered, 50) / _NS_PER_MS,
            p90_ms=_percentile(ordered, 90) / _NS_PER_MS,
            p99_ms=_percentile(ordered, 99) / _NS_PER_MS,
            max_ms=ordered[-1] / _NS_PER_MS,
        )


def _percentile(ordered: Sequence[int], pct: int) -> int:
    """Nearest-rank percentile: the smallest sample with at least pct% of samples <= it."""
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


@dataclass(frozen=True, kw_only=True)
class LatencyProgress:
    """What a UI shows while a test runs."""

    elapsed_s: float
    sent: int
    received: int


@dataclass(frozen=True, kw_only=True)
class LatencyResult:
    """The outcome of one echo test; durations in milliseconds."""

    sent: int
    received: int  # distinct probes answered
    lost: int
    loss_ratio: float
    lost_forward: int  # before the reflector counted them (needs a stateful reflector)
    lost_reverse: int  # counted by the reflector, reply never arrived
    lost_unattributed: int  # after the last answered probe: direction unknown
    duplicates: int
    reordered: int  # replies arriving after one with a higher sequence number
    invalid: int  # datagrams that failed length, HMAC, SSID or sequence checks
    rtt: Summary | None
    network_rtt: Summary | None  # RTT minus the reflector's processing time
    reflector_processing: Summary | None
    jitter_ms: float | None  # mean |RTT(i) - RTT(i-1)| over consecutive answered probes
    received_ttl_min: int | None  # TTL/Hop Limit our probes reached the reflector with
    received_ttl_max: int | None
    reflector_clock_synchronized: bool | None
    reflector_clock_error_ms: float | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


class LatencyRecorder:
    """Builds probes and digests replies for one session; no sockets, no clock."""

    def __init__(self, *, key: bytes, ssid: int, packet_size: int) -> None:
        if not 0 <= ssid <= 0xFFFF:
            raise ValueError(f"STAMP SSID must fit 16 bits, got {ssid}")
        if not AUTH_PACKET_LEN <= packet_size <= MAX_PACKET_LEN:
            raise ValueError(
                f"echo packet size must be {AUTH_PACKET_LEN}-{MAX_PACKET_LEN}, got {packet_size}"
            )
        self._key = SessionKey(key)  # keyed once: every probe and reply needs an HMAC
        self._ssid = ssid
        self._size = packet_size
        self._sent_ns: list[int] = []  # index = sequence number
        self._rtt_ns: dict[int, int] = {}  # first reply per sequence number
        self._processing_ns: dict[int, int] = {}
        self._reflector_seq: dict[int, int] = {}
        self._ttls: list[int] = []
        self._highest_seq = -1
        self._duplicates = 0
        self._reordered = 0
        self._invalid = 0
        self._reflector_error: int | None = None

    @property
    def sent(self) -> int:
        return len(self._sent_ns)

    @property
    def received(self) -> int:
        return len(self._rtt_ns)

    def next_probe(self, *, now_unix_ns: int, error_estimate: int) -> bytes:
        """The next probe, stamped with the send time `now_unix_ns`."""
        packet = SenderPacket(
            seq=len(self._sent_ns),
            timestamp=unix_ns_to_ntp(now_unix_ns),
            error_estimate=error_estimate,
            ssid=self._ssid,
        )
        self._sent_ns.append(now_unix_ns)
        return encode_sender(packet, self._key, length=self._size)

    def mark_sent(self, *, now_unix_ns: int) -> None:
        """Record when the latest probe actually left, after its HMAC was computed.

        RTT then excludes our own signing time, just as the reflector's T3 - T2 excludes its.
        """
        self._sent_ns[-1] = now_unix_ns

    def on_reply(self, data: bytes, *, rx_unix_ns: int) -> None:
        """Digest one received datagram (anything that is not a valid reply is counted invalid)."""
        try:
            reply = decode_reflector(data, self._key)
        except StampError:
            self._invalid += 1
            return
        seq = reply.sender_seq
        if len(data) != self._size or reply.ssid != self._ssid or seq >= len(self._sent_ns):
            self._invalid += 1
            return
        if seq in self._rtt_ns:
            self._duplicates += 1
            return
        if seq < self._highest_seq:
            self._reordered += 1
        self._highest_seq = max(self._highest_seq, seq)
        rtt = rx_unix_ns - self._sent_ns[seq]
        self._rtt_ns[seq] = rtt
        processing = ntp_delta_ns(reply.timestamp, reply.receive_timestamp)
        # A reflector clock step between T2 and T3 makes this nonsense; leave such samples out
        # of the processing and network-RTT figures rather than report negative times.
        if 0 <= processing <= rtt:
            self._processing_ns[seq] = processing
        self._reflector_seq[seq] = reply.seq
        self._ttls.append(reply.sender_ttl)
        self._reflector_error = reply.error_estimate

    def result(self) -> LatencyResult:
        sent, received = len(self._sent_ns), len(self._rtt_ns)
        forward, reverse, tail = self._loss_split()
        ordered = sorted(self._rtt_ns)
        rtts = [self._rtt_ns[s] for s in ordered]
        clock = (
            None if self._reflector_error is None else decode_error_estimate(self._reflector_error)
        )
        return LatencyResult(
            sent=sent,
            received=received,
            lost=sent - received,
            loss_ratio=(sent - received) / sent if sent else 0.0,
            lost_forward=forward,
            lost_reverse=reverse,
            lost_unattributed=tail,
            duplicates=self._duplicates,
            reordered=self._reordered,
            invalid=self._invalid,
            rtt=Summary.of(rtts),
            network_rtt=Summary.of([self._rtt_ns[s] - p for s, p in self._processing_ns.items()]),
            reflector_processing=Summary.of(list(self._processing_ns.values())),
            jitter_ms=_jitter_ns(rtts) / _NS_PER_MS if len(rtts) > 1 else None,
            received_ttl_min=min(self._ttls, default=None),
            received_ttl_max=max(self._ttls, default=None),
            reflector_clock_synchronized=None if clock is None else clock.synchronized,
            reflector_clock_error_ms=None if clock is None else clock.error_s * 1000,
        )

    def _loss_split(self) -> tuple[int, int, int]:
        """(forward, reverse, unattributed) losses from the reflector's reply numbering.

        Up to the highest answered probe s, the reflector counted r(s) + 1 of the s + 1 probes:
        the rest were lost forward. Probes after s have no reply to tell their fate.
        """
        lost = len(self._sent_ns) - len(self._rtt_ns)
        if not self._rtt_ns:
            return 0, 0, lost
        top = self._highest_seq
        forward = max(0, top - self._reflector_seq[top])
        tail = len(self._sent_ns) - 1 - top
        reverse = max(0, lost - forward - tail)
        return min(forward, lost - tail), reverse, tail


def _jitter_ns(rtts: Sequence[int]) -> float:
    """RFC 3550-style jitter without its 1/16 smoothing: mean |difference| of consecutive RTTs."""
    return sum(abs(b - a) for a, b in itertools.pairwise(rtts)) / (len(rtts) - 1)


# --------------------------------------------------------------------------------------------
# The I/O shell
# --------------------------------------------------------------------------------------------


def measure_latency(
    target: tuple[str, int],
    key: bytes,
    ssid: int,
    duration_s: float,
    interval_s: float,
    packet_size: int,
    progress: Callable[[LatencyProgress], None] | None = None,
) -> LatencyResult:
    """Send authenticated STAMP probes to `target` every `interval_s` for `duration_s`.

    At most MAX_PACKETS probes; replies are awaited REPLY_WAIT_S after the last one at most.
    Behind schedule, probes go out at most CATCH_UP_SPEEDUP times as often, never in a burst.
    """
    if not interval_s >= MIN_INTERVAL_S:
        raise ValueError(f"echo interval must be at least {MIN_INTERVAL_S} s, got {interval_s}")
    if not duration_s > 0:
        raise ValueError(f"echo duration must be positive, got {duration_s}")
    recorder = LatencyRecorder(key=key, ssid=ssid, packet_size=packet_size)
    count = min(MAX_PACKETS, max(1, math.ceil(duration_s / interval_s)))
    error_estimate = read_clock_error_estimate()
    with _connect(target) as sock:
        pacer = _Pacer(sock, recorder, progress)
        last_sent = -math.inf
        for index in range(count):
            due = pacer.start + index * interval_s
            pacer.receive_until(max(due, last_sent + interval_s / CATCH_UP_SPEEDUP))
            probe = recorder.next_probe(now_unix_ns=time.time_ns(), error_estimate=error_estimate)
            pacer.send(probe)
            last_sent = time.monotonic()
            pacer.report()
        pacer.receive_until(time.monotonic() + REPLY_WAIT_S, stop_when_complete=True)
        pacer.report(force=True)
    return recorder.result()


def _connect(target: tuple[str, int]) -> socket.socket:
    """A UDP socket connected to the reflector: the kernel then drops datagrams from elsewhere."""
    family, kind, proto, _, address = socket.getaddrinfo(
        target[0], target[1], type=socket.SOCK_DGRAM
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_TIMESTAMPNS, 1)
        sock.connect(address)
    except OSError:
        sock.close()
        raise
    return sock


class _Pacer:
    """Receives replies between probes and reports progress; all waits are bounded."""

    def __init__(
        self,
        sock: socket.socket,
        recorder: LatencyRecorder,
        progress: Callable[[LatencyProgress], None] | None,
    ) -> None:
        self.sock = sock
        self.recorder = recorder
        self.progress = progress
        self.start = time.monotonic()
        self._last_report = self.start

    def send(self, probe: bytes) -> None:
        self.recorder.mark_sent(now_unix_ns=time.time_ns())
        # An earlier ICMP port unreachable, or a full socket buffer: the probe is lost, which
        # the result reports as loss.
        with contextlib.suppress(ConnectionRefusedError, BlockingIOError):
            self.sock.send(probe)

    def receive_until(self, until: float, *, stop_when_complete: bool = False) -> None:
        while True:
            if stop_when_complete and self.recorder.received >= self.recorder.sent:
                return
            remaining = until - time.monotonic()
            if remaining <= 0:
                return
            self.sock.settimeout(remaining)
            try:
                data, ancdata, _, _ = self.sock.recvmsg(MAX_PACKET_LEN + 1, 64)
            except TimeoutError:
                return
            except ConnectionRefusedError:
                continue  # ICMP port unreachable: nothing listens (yet); the probe is lost
            self.recorder.on_reply(data, rx_unix_ns=_rx_time(ancdata))
            self.report()

    def report(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if self.progress is None or (not force and now - self._last_report < PROGRESS_INTERVAL_S):
            return
        self._last_report = now
        self.progress(
            LatencyProgress(
                elapsed_s=now - self.start,
                sent=self.recorder.sent,
                received=self.recorder.received,
            )
        )


def _rx_time(ancdata: Sequence[tuple[int, int, bytes]]) -> int:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == _SO_TIMESTAMPNS:
            seconds, nanos = _TIMESPEC.unpack_from(data)
            return int(seconds) * 1_000_000_000 + int(nanos)
    return time.time_ns()
