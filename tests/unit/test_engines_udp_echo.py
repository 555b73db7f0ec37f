"""The UDP echo reflector: it answers only the granted peer, with the key, at the rate, in time.

The first half drives `EchoCore` with time passed in (no sleeping); the second half uses real
UDP sockets on loopback, and the last tests run the standalone process.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import pytest

from reflector.engines import stamp
from reflector.engines.stamp import SenderPacket
from reflector.engines.udp_echo import (
    MAX_PPS,
    MAX_SESSIONS,
    RATE_BURST_PACKETS,
    EchoCore,
    UdpEchoReflector,
    read_clock_error_estimate,
)
from reflector.errors import ReflectorError

KEY = bytes.fromhex("11" * 32)
OTHER_KEY = bytes.fromhex("22" * 32)
PEER = "198.51.100.2"
NOW = 1000.0
RX_NTP = 0x83AA7E80_80000000
# Only catches a reflector that never answers: a passing test never waits it out, and a loaded
# 2-core machine (two suites at once) has starved the reflector's thread for over 1 s.
REPLY_TIMEOUT_S = 5.0
# How long "no reply" is awaited once the reflector has counted the packet as dropped.
SILENCE_S = 0.2


def _probe(seq: int, *, key: bytes = KEY, length: int = 112, ssid: int = 7) -> bytes:
    packet = SenderPacket(
        seq=seq, timestamp=stamp.unix_ns_to_ntp(time.time_ns()), error_estimate=0x8001, ssid=ssid
    )
    return stamp.encode_sender(packet, key, length=length)


def _core(*, max_pps: int = 100, deadline: float = NOW + 60) -> EchoCore:
    core = EchoCore()
    core.add_session(
        "s1", PEER, KEY, deadline=deadline, max_pps=max_pps, error_estimate=0x8F84, now=NOW
    )
    return core


# --------------------------------------------------------------------------------------------
# EchoCore: decisions with time passed in
# --------------------------------------------------------------------------------------------


def test_core_reflects_an_authenticated_probe_with_timestamps_ttl_and_ssid() -> None:
    core = _core()
    probe = _probe(41, ssid=0xBEEF)
    pending = core.receive(probe, PEER, now=NOW, rx_ntp=RX_NTP, ttl=61)
    assert pending is not None
    reply = stamp.decode_reflector(pending.finish(RX_NTP + 4096), KEY)
    sent = stamp.decode_sender(probe, KEY)
    assert reply.seq == 0  # the reflector's own count: first reply of the session
    assert reply.sender_seq == 41
    assert reply.sender_timestamp == sent.timestamp
    assert reply.sender_error_estimate == 0x8001
    assert reply.ssid == 0xBEEF
    assert reply.receive_timestamp == RX_NTP
    assert reply.timestamp == RX_NTP + 4096
    assert reply.sender_ttl == 61
    assert reply.error_estimate == 0x8F84  # the session's, computed once when it was added


def test_core_numbers_replies_per_session() -> None:
    core = _core()
    seqs = []
    for sender_seq in (5, 9, 6):
        pending = core.receive(_probe(sender_seq), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64)
        assert pending is not None
        seqs.append(stamp.decode_reflector(pending.finish(0), KEY).seq)
    assert seqs == [0, 1, 2]


def test_core_drops_and_counts_every_kind_of_bad_packet() -> None:
    core = _core(deadline=NOW + 10)
    assert core.receive(_probe(1), "198.51.100.3", now=NOW, rx_ntp=RX_NTP, ttl=64) is None
    assert core.receive(_probe(1, key=OTHER_KEY), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is None
    assert core.receive(bytes(44), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is None  # unauth size
    assert core.receive(bytes(1473), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is None
    assert core.receive(_probe(1), PEER, now=NOW + 10, rx_ntp=RX_NTP, ttl=64) is None
    total = core.stats()
    assert total.dropped == {
        "source": 1,
        "length": 2,
        "hmac": 1,
        "expired": 1,
        "rate": 0,
        "send_error": 0,
    }
    assert total.rx_packets == 5
    assert total.tx_packets == 0
    # The wrong-source packet belongs to no session; the rest are the session's own.
    session = core.stats("s1")
    assert session.rx_packets == 4
    assert session.dropped_total == 4


def test_core_ipv4_mapped_source_is_the_same_peer() -> None:
    core = _core()
    pending = core.receive(_probe(1), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64)
    assert pending is not None
    other = EchoCore()
    other.add_session(
        "s", "::ffff:198.51.100.2", KEY, deadline=NOW + 1, max_pps=10, error_estimate=1, now=NOW
    )
    assert other.receive(_probe(1), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is not None


def test_core_rate_clamp_allows_a_small_burst_then_max_pps() -> None:
    core = _core(max_pps=100)
    burst = [core.receive(_probe(i), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) for i in range(500)]
    assert sum(p is not None for p in burst) == RATE_BURST_PACKETS
    # One second later the bucket is full again (capped at the burst), not 100 packets deep.
    later = [core.receive(_probe(i), PEER, now=NOW + 1, rx_ntp=RX_NTP, ttl=64) for i in range(50)]
    assert sum(p is not None for p in later) == RATE_BURST_PACKETS
    # Paced at exactly max_pps, every packet passes.
    paced = [
        core.receive(_probe(i), PEER, now=NOW + 2 + i / 100, rx_ntp=RX_NTP, ttl=64)
        for i in range(300)
    ]
    assert all(p is not None for p in paced)
    assert core.stats("s1").dropped["rate"] == 500 - 10 + 50 - 10


def test_core_rate_clamp_counts_packets_as_they_arrived_not_as_they_are_handled() -> None:
    """Probes that arrived at max_pps but waited in the socket buffer while the reflector's
    thread was paused pass; packets that arrived together are still a burst. Deadlines are
    checked at handling time."""
    core = _core(max_pps=100)
    handled_at = NOW + 5  # all 50 handled at once, after a pause
    queued = [
        core.receive(_probe(i), PEER, now=handled_at, rx_ntp=RX_NTP, ttl=64, arrived=NOW + i / 100)
        for i in range(50)
    ]
    assert all(p is not None for p in queued)
    together = [
        core.receive(_probe(i), PEER, now=handled_at, rx_ntp=RX_NTP, ttl=64, arrived=handled_at)
        for i in range(50)
    ]
    assert sum(p is not None for p in together) == RATE_BURST_PACKETS
    late = _core(max_pps=100, deadline=NOW + 1)
    assert late.receive(_probe(1), PEER, now=NOW + 2, rx_ntp=RX_NTP, ttl=64, arrived=NOW) is None
    assert late.stats("s1").dropped["expired"] == 1


def test_core_routes_each_probe_to_the_session_whose_key_signed_it() -> None:
    core = _core()
    core.add_session(
        "s2", PEER, OTHER_KEY, deadline=NOW + 60, max_pps=100, error_estimate=1, now=NOW
    )
    first = core.receive(_probe(1, key=OTHER_KEY), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64)
    assert first is not None
    assert first.session_id == "s2"
    assert stamp.decode_reflector(first.finish(RX_NTP), OTHER_KEY).sender_seq == 1
    # With two sessions for the peer, a bad HMAC cannot be blamed on either.
    assert core.receive(_probe(1, key=bytes(32)), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is None
    assert core.stats().dropped["hmac"] == 1
    assert core.stats("s1").dropped["hmac"] == 0
    assert core.stats("s2").dropped["hmac"] == 0


def test_core_last_deadline_ignores_expired_sessions() -> None:
    core = _core(deadline=NOW + 5)
    core.add_session("s2", PEER, OTHER_KEY, deadline=NOW + 9, max_pps=1, error_estimate=1, now=NOW)
    assert core.last_deadline(NOW) == NOW + 9
    assert core.last_deadline(NOW + 9) is None
    core.remove_session("s2")
    assert core.last_deadline(NOW) == NOW + 5


def test_core_remove_session_returns_its_counts_and_forgets_it() -> None:
    core = _core()
    pending = core.receive(_probe(1, length=300), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64)
    assert pending is not None
    stats = core.remove_session("s1")
    assert (stats.rx_packets, stats.tx_packets, stats.rx_bytes, stats.tx_bytes) == (1, 1, 300, 300)
    assert core.receive(_probe(2), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64) is None
    with pytest.raises(KeyError):
        core.remove_session("s1")


def test_core_counts_a_reply_the_socket_refused_as_send_error_not_sent() -> None:
    core = _core()
    pending = core.receive(_probe(1, length=200), PEER, now=NOW, rx_ntp=RX_NTP, ttl=64)
    assert pending is not None
    assert core.stats("s1").tx_bytes == 200
    core.record_send_failure(pending)
    stats = core.stats("s1")
    assert (stats.tx_packets, stats.tx_bytes, stats.dropped["send_error"]) == (0, 0, 1)
    assert core.stats().tx_packets == 0


def test_core_refuses_bad_sessions() -> None:
    core = _core()
    with pytest.raises(ValueError, match="already exists"):
        core.add_session("s1", PEER, KEY, deadline=NOW, max_pps=1, error_estimate=1, now=NOW)
    with pytest.raises(ValueError, match="32 bytes"):
        core.add_session("x", PEER, KEY[:31], deadline=NOW, max_pps=1, error_estimate=1, now=NOW)
    with pytest.raises(ValueError, match="max_pps"):
        core.add_session("x", PEER, KEY, deadline=NOW, max_pps=0, error_estimate=1, now=NOW)
    with pytest.raises(ValueError):
        core.add_session("x", "not-an-ip", KEY, deadline=NOW, max_pps=1, error_estimate=1, now=NOW)
    for i in range(MAX_SESSIONS - 1):
        core.add_session(f"n{i}", PEER, KEY, deadline=NOW, max_pps=1, error_estimate=1, now=NOW)
    with pytest.raises(ReflectorError, match="sessions"):
        core.add_session("full", PEER, KEY, deadline=NOW, max_pps=1, error_estimate=1, now=NOW)


# --------------------------------------------------------------------------------------------
# UdpEchoReflector on loopback
# --------------------------------------------------------------------------------------------


@pytest.fixture
def reflector() -> Iterator[UdpEchoReflector]:
    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        yield echo


def _client(reflector: UdpEchoReflector, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((source, 0))
    sock.connect(reflector.address)
    sock.settimeout(REPLY_TIMEOUT_S)
    return sock


def _add(reflector: UdpEchoReflector, *, seconds: float = 10, max_pps: int = 1000) -> None:
    reflector.add_session("s1", "127.0.0.1", KEY, time.monotonic() + seconds, max_pps)


def _wait_for(condition: Callable[[], bool]) -> None:
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.005)


def _assert_silent(sock: socket.socket) -> None:
    sock.settimeout(SILENCE_S)
    with pytest.raises(TimeoutError):
        sock.recv(2048)
    sock.settimeout(REPLY_TIMEOUT_S)


def test_authenticated_round_trip(reflector: UdpEchoReflector) -> None:
    before = read_clock_error_estimate()  # read once per session, when it is added
    _add(reflector)
    after = read_clock_error_estimate()
    with _client(reflector) as sock:
        probe = _probe(3)
        sock.send(probe)
        data = sock.recv(2048)
    reply = stamp.decode_reflector(data, KEY)
    assert len(data) == len(probe) == 112
    assert reply.sender_seq == 3
    assert reply.sender_ttl == 64  # Linux's default TTL, read from IP_RECVTTL
    # A synchronized kernel's error bound grows each second, so it may move between reads.
    assert reply.error_estimate in (before, after)


def test_processing_time_is_small_and_non_negative(reflector: UdpEchoReflector) -> None:
    _add(reflector, max_pps=MAX_PPS)
    with _client(reflector) as sock:
        for seq in range(20):
            sent = time.monotonic_ns()
            sock.send(_probe(seq))
            reply = stamp.decode_reflector(sock.recv(2048), KEY)
            round_trip_ns = time.monotonic_ns() - sent
            processing_ns = stamp.ntp_delta_ns(reply.timestamp, reply.receive_timestamp)
            # Kernel receive time to send time: inside the client's own round trip (plus 1 ms
            # for the NTP format's rounding and clock slew), however loaded the machine is.
            assert 0 <= processing_ns <= round_trip_ns + 1_000_000


def test_bad_hmac_is_ignored(reflector: UdpEchoReflector) -> None:
    _add(reflector)
    with _client(reflector) as sock:
        sock.send(_probe(1, key=OTHER_KEY))
        _wait_for(lambda: reflector.stats("s1").dropped["hmac"] == 1)
        _assert_silent(sock)


def test_unauthenticated_stamp_packet_is_ignored(reflector: UdpEchoReflector) -> None:
    _add(reflector)
    # RFC 8762 §4.2.1 unauthenticated sender packet: 44 octets, no HMAC.
    unauthenticated = (1).to_bytes(4, "big") + stamp.unix_ns_to_ntp(0).to_bytes(8, "big")
    unauthenticated += bytes(44 - len(unauthenticated))
    with _client(reflector) as sock:
        sock.send(unauthenticated)
        _wait_for(lambda: reflector.stats("s1").dropped["length"] == 1)
        _assert_silent(sock)


def test_reply_is_never_longer_than_the_request(reflector: UdpEchoReflector) -> None:
    _add(reflector)
    with _client(reflector) as sock:
        # Short: a valid probe cut to 100 octets gets nothing (112 would be amplification).
        sock.send(_probe(1)[:100])
        _wait_for(lambda: reflector.stats("s1").dropped["length"] == 1)
        _assert_silent(sock)
        # Long: the reply is padded to exactly the request's length.
        sock.send(_probe(2, length=1000))
        data = sock.recv(2048)
        assert len(data) == 1000
        assert stamp.decode_reflector(data, KEY).sender_seq == 2
        # Longer than any probe may be: dropped, not truncated and answered.
        sock.send(_probe(3) + bytes(1500))
        _wait_for(lambda: reflector.stats("s1").dropped["length"] == 2)
        _assert_silent(sock)
    stats = reflector.stats("s1")
    assert stats.tx_bytes == 1000
    assert stats.tx_bytes <= stats.rx_bytes


def test_wrong_source_address_is_ignored(reflector: UdpEchoReflector) -> None:
    _add(reflector)  # granted to 127.0.0.1 only
    with _client(reflector, source="127.0.0.2") as sock:
        sock.send(_probe(1))
        _wait_for(lambda: reflector.stats().dropped["source"] == 1)
        _assert_silent(sock)
    assert reflector.stats("s1").rx_packets == 0


def _wait_until_settled(reflector: UdpEchoReflector) -> None:
    """Return once the session's received count has not changed for SILENCE_S."""
    last, changed_at = -1, time.monotonic()
    while time.monotonic() - changed_at < SILENCE_S:
        count = reflector.stats("s1").rx_packets
        if count != last:
            last, changed_at = count, time.monotonic()
        time.sleep(0.005)


def _drain(sock: socket.socket) -> int:
    """How many datagrams arrive before SILENCE_S passes without one."""
    sock.settimeout(SILENCE_S)
    count = 0
    try:
        while True:
            sock.recv(2048)
            count += 1
    except TimeoutError:
        return count


def test_rate_clamp_holds_under_a_burst(reflector: UdpEchoReflector) -> None:
    max_pps, burst = 100, 500
    _add(reflector, max_pps=max_pps)
    with _client(reflector) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        start = time.monotonic()
        for seq in range(burst):
            sock.send(_probe(seq))
        # The kernel may drop part of a burst: fine, the clamp applies to what arrives.
        _wait_until_settled(reflector)
        replies = _drain(sock)
    # The burst arrived within this span, so the clamp allowed at most this many replies.
    elapsed = time.monotonic() - start
    stats = reflector.stats("s1")  # counted after the last reply: nothing is still in flight
    assert stats.rx_packets > RATE_BURST_PACKETS
    assert RATE_BURST_PACKETS <= replies <= RATE_BURST_PACKETS + max_pps * elapsed
    assert stats.tx_packets == replies
    assert stats.dropped["rate"] == stats.rx_packets - replies


def test_expiry_stops_replies_and_the_thread(reflector: UdpEchoReflector) -> None:
    _add(reflector, seconds=1.0)
    with _client(reflector) as sock:
        sock.send(_probe(1))
        assert stamp.decode_reflector(sock.recv(2048), KEY).sender_seq == 1
        assert reflector.wait(timeout=3.0), "serving thread still running after the deadline"
        sock.send(_probe(2))
        _assert_silent(sock)
    assert reflector.stats("s1").tx_packets == 1


def test_a_session_added_after_expiry_is_served_again(reflector: UdpEchoReflector) -> None:
    _add(reflector, seconds=0.05)
    assert reflector.wait(timeout=2.0)
    reflector.remove_session("s1")
    _add(reflector)
    with _client(reflector) as sock:
        sock.send(_probe(9))
        assert stamp.decode_reflector(sock.recv(2048), KEY).sender_seq == 9


def test_dual_stack_socket_answers_ipv4_from_the_address_it_was_sent_to() -> None:
    with UdpEchoReflector(("::", 0)) as echo:
        echo.add_session("s1", "127.0.0.1", KEY, time.monotonic() + 10, 100)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            # Connected to 127.0.0.3: a reply from any other address would be discarded.
            sock.connect(("127.0.0.3", echo.address[1]))
            sock.send(_probe(4))
            assert stamp.decode_reflector(sock.recv(2048), KEY).sender_seq == 4


def test_close_stops_serving_and_keeps_the_counts() -> None:
    echo = UdpEchoReflector(("127.0.0.1", 0))
    _add(echo)
    echo.close()
    assert echo.wait(timeout=0)
    assert echo.stats("s1").rx_packets == 0
    with pytest.raises(ReflectorError, match="closed"):
        _add(echo)


def test_clock_error_estimate_is_a_valid_ntp_format_encoding() -> None:
    value = read_clock_error_estimate()
    decoded = stamp.decode_error_estimate(value)
    assert not decoded.ptp_format
    assert value & 0xFF != 0  # multiplier MUST NOT be zero
    assert 0 < decoded.error_s <= 16.1


# --------------------------------------------------------------------------------------------
# Standalone process
# --------------------------------------------------------------------------------------------


def _standalone(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "reflector.engines.udp_echo", *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_standalone_serves_then_prints_final_stats_on_sigterm() -> None:
    proc = _standalone(
        "--bind", "127.0.0.1:0", "--peer", "127.0.0.1", "--duration", "30", "--max-pps", "100"
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdin.write(KEY.hex() + "\n")
        proc.stdin.close()
        listening = json.loads(proc.stdout.readline())
        assert listening["event"] == "listening"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(("127.0.0.1", listening["port"]))
            # The forged probe goes first: the reply to the good one proves both were read.
            sock.send(_probe(2, key=OTHER_KEY))
            sock.send(_probe(1, length=200))
            assert len(sock.recv(2048)) == 200
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)  # its few output lines fit in the pipe
        out, err = proc.stdout.read(), proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["event"] == "stopped"
    assert final["reason"] == "SIGTERM"
    assert (final["rx_packets"], final["tx_packets"], final["tx_bytes"]) == (2, 1, 200)
    assert final["dropped"]["hmac"] == 1


def test_standalone_stops_by_itself_at_the_end_of_its_duration() -> None:
    proc = _standalone(
        "--bind", "127.0.0.1:0", "--peer", "127.0.0.1", "--duration", "0.2", "--max-pps", "10"
    )
    out, err = proc.communicate(KEY.hex() + "\n", timeout=10)
    assert proc.returncode == 0, err
    final = json.loads(out.strip().splitlines()[-1])
    assert final["event"] == "stopped"
    assert final["reason"] == "expired"


def test_standalone_refuses_a_malformed_key_with_exit_code_2() -> None:
    proc = _standalone(
        "--bind", "127.0.0.1:0", "--peer", "127.0.0.1", "--duration", "1", "--max-pps", "10"
    )
    out, err = proc.communicate(os.urandom(16).hex() + "\n", timeout=10)
    assert proc.returncode == 2
    assert "32 bytes" in err
    assert out == ""


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-pps", "0", "--max-pps"),
        ("--peer", "not-an-ip", "--peer"),
        ("--duration", "0", "--duration"),
        ("--bind", "127.0.0.1", "--bind"),
    ],
)
def test_standalone_refuses_bad_arguments_with_exit_code_2(
    flag: str, value: str, message: str
) -> None:
    args = {"--bind": "127.0.0.1:0", "--peer": "127.0.0.1", "--duration": "1", "--max-pps": "10"}
    args[flag] = value
    proc = _standalone(*[item for pair in args.items() for item in pair])
    out, err = proc.communicate(KEY.hex() + "\n", timeout=10)
    assert proc.returncode == 2
    assert message in err
    assert out == ""
