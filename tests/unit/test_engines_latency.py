"""The appliance-side STAMP sender: what it computes from replies, and a real run on loopback.

`LatencyRecorder` is fed hand-made reflector replies with chosen timestamps, so every figure
(RTT, processing time, percentiles, jitter, loss split, reordering) is checked against numbers
worked out here; `measure_latency` then runs against the real reflector over UDP.
"""

from __future__ import annotations

import json
import socket
import time

import pytest

from reflector.engines import latency, stamp
from reflector.engines.latency import LatencyProgress, LatencyRecorder, measure_latency
from reflector.engines.stamp import ReflectorPacket
from reflector.engines.udp_echo import UdpEchoReflector

KEY = bytes.fromhex("5a" * 32)
OTHER_KEY = bytes.fromhex("a5" * 32)
SSID = 0x1234
T0 = 1_700_000_000 * 10**9  # Unix ns; any instant works
MS = 1_000_000


def _recorder(size: int = 112) -> LatencyRecorder:
    return LatencyRecorder(key=KEY, ssid=SSID, packet_size=size)


def _send(recorder: LatencyRecorder, count: int, *, every_ns: int = 10 * MS) -> None:
    for i in range(count):
        recorder.next_probe(now_unix_ns=T0 + i * every_ns, error_estimate=0x8001)


def _reply(
    sender_seq: int,
    *,
    reflector_seq: int | None = None,
    processing_ns: int = 0,
    key: bytes = KEY,
    ssid: int = SSID,
    ttl: int = 60,
    size: int = 112,
) -> bytes:
    t2 = stamp.unix_ns_to_ntp(T0 + sender_seq * 10 * MS)
    t3 = t2 + (processing_ns << 32) // 10**9
    packet = ReflectorPacket(
        seq=sender_seq if reflector_seq is None else reflector_seq,
        timestamp=t3,
        error_estimate=0x8F84,
        ssid=ssid,
        receive_timestamp=t2,
        sender_seq=sender_seq,
        sender_timestamp=0,
        sender_error_estimate=0x8001,
        sender_ttl=ttl,
    )
    return stamp.encode_reflector(packet, key, trailer=bytes(size - 112))


def _receive(
    recorder: LatencyRecorder,
    seq: int,
    rtt_ns: int,
    *,
    reflector_seq: int | None = None,
    processing_ns: int = 0,
) -> None:
    """Deliver the reply to probe `seq` (sent at T0 + seq * 10 ms) `rtt_ns` after it left."""
    data = _reply(seq, reflector_seq=reflector_seq, processing_ns=processing_ns)
    recorder.on_reply(data, rx_unix_ns=T0 + seq * 10 * MS + rtt_ns)


# --------------------------------------------------------------------------------------------
# LatencyRecorder: figures from chosen timestamps
# --------------------------------------------------------------------------------------------


def test_probes_are_authenticated_sender_packets_numbered_from_zero() -> None:
    recorder = _recorder(size=200)
    first = recorder.next_probe(now_unix_ns=T0, error_estimate=0x8F84)
    second = recorder.next_probe(now_unix_ns=T0 + MS, error_estimate=0x8F84)
    assert len(first) == 200
    decoded = stamp.decode_sender(second, KEY)
    assert (decoded.seq, decoded.ssid, decoded.error_estimate) == (1, SSID, 0x8F84)
    assert decoded.timestamp == stamp.unix_ns_to_ntp(T0 + MS)
    assert stamp.decode_sender(first, KEY).seq == 0


def test_rtt_minus_reflector_processing_is_the_network_rtt() -> None:
    recorder = _recorder()
    _send(recorder, 1)
    _receive(recorder, 0, 5 * MS, processing_ns=MS // 5)
    result = recorder.result()
    assert result.rtt is not None
    assert result.reflector_processing is not None
    assert result.network_rtt is not None
    assert result.rtt.p50_ms == 5.0
    assert result.reflector_processing.p50_ms == pytest.approx(0.2, abs=1e-6)
    assert result.network_rtt.p50_ms == pytest.approx(4.8, abs=1e-6)
    assert (result.received_ttl_min, result.received_ttl_max) == (60, 60)
    assert result.reflector_clock_synchronized is True
    assert result.reflector_clock_error_ms == pytest.approx(132 * 2.0**-17 * 1000)


def test_rtt_summary_uses_nearest_rank_percentiles() -> None:
    recorder = _recorder()
    _send(recorder, 100)
    for seq in range(100):
        _receive(recorder, seq, (100 - seq) * MS)  # RTTs 100 ms .. 1 ms
    rtt = recorder.result().rtt
    assert rtt is not None
    assert (rtt.count, rtt.min_ms, rtt.max_ms, rtt.mean_ms) == (100, 1.0, 100.0, 50.5)
    assert (rtt.p50_ms, rtt.p90_ms, rtt.p99_ms) == (50.0, 90.0, 99.0)


def test_jitter_is_the_mean_absolute_difference_of_consecutive_rtts() -> None:
    recorder = _recorder()
    _send(recorder, 4)
    for seq, rtt in enumerate((10, 12, 11, 15)):
        _receive(recorder, seq, rtt * MS)
    assert recorder.result().jitter_ms == pytest.approx((2 + 1 + 4) / 3)


def test_loss_duplicates_and_reordering_are_counted() -> None:
    recorder = _recorder()
    _send(recorder, 10)
    for seq in (0, 1, 3, 2, 2, 5):
        _receive(recorder, seq, MS)
    result = recorder.result()
    assert (result.sent, result.received, result.lost) == (10, 5, 5)
    assert result.loss_ratio == 0.5
    assert result.duplicates == 1
    assert result.reordered == 1  # 2 arrived after 3


def test_loss_splits_into_forward_reverse_and_unattributed() -> None:
    # 8 probes. Probe 2 never reached the reflector, so it numbered 0,1,3,4,5 as 0,1,2,3,4;
    # the reply to 4 was lost on the way back; 6 and 7 have no later reply to tell their fate.
    recorder = _recorder()
    _send(recorder, 8)
    for seq, reflector_seq in ((0, 0), (1, 1), (3, 2), (5, 4)):
        _receive(recorder, seq, MS, reflector_seq=reflector_seq)
    result = recorder.result()
    assert result.lost == 4
    assert (result.lost_forward, result.lost_reverse, result.lost_unattributed) == (1, 1, 2)


def test_replies_that_fail_any_check_are_invalid_and_ignored() -> None:
    recorder = _recorder()
    _send(recorder, 2)
    bad = [
        _reply(0, key=OTHER_KEY),  # forged
        _reply(0, ssid=SSID + 1),  # another session's
        _reply(7),  # a probe never sent
        _reply(0, size=200),  # not the length we sent
        bytes(44),  # not an authenticated packet at all
    ]
    for data in bad:
        recorder.on_reply(data, rx_unix_ns=T0 + MS)
    result = recorder.result()
    assert result.invalid == len(bad)
    assert result.received == 0
    assert result.rtt is None
    assert result.jitter_ms is None


def test_a_reflector_clock_step_is_left_out_of_processing_but_not_rtt() -> None:
    recorder = _recorder()
    _send(recorder, 2)
    _receive(recorder, 0, 2 * MS, processing_ns=-5 * MS)  # T3 before T2
    _receive(recorder, 1, 2 * MS, processing_ns=3 * MS)  # longer than the RTT itself
    result = recorder.result()
    assert result.rtt is not None
    assert result.rtt.count == 2
    assert result.reflector_processing is None
    assert result.network_rtt is None


def test_result_serializes_to_json() -> None:
    recorder = _recorder()
    _send(recorder, 3)
    _receive(recorder, 1, MS)
    encoded = json.loads(json.dumps(recorder.result().to_dict()))
    assert encoded["sent"] == 3
    assert encoded["rtt"]["p99_ms"] == 1.0
    assert encoded["network_rtt"]["min_ms"] == 1.0


def test_recorder_refuses_bad_parameters() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        LatencyRecorder(key=KEY[:8], ssid=1, packet_size=112)
    with pytest.raises(ValueError, match="SSID"):
        LatencyRecorder(key=KEY, ssid=1 << 16, packet_size=112)
    with pytest.raises(ValueError, match="packet size"):
        LatencyRecorder(key=KEY, ssid=1, packet_size=44)


# --------------------------------------------------------------------------------------------
# measure_latency against the real reflector on loopback
# --------------------------------------------------------------------------------------------


def test_measure_latency_against_the_reflector() -> None:
    reports: list[LatencyProgress] = []
    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        echo.add_session("s", "127.0.0.1", KEY, time.monotonic() + 10, 1000)
        result = measure_latency(echo.address, KEY, SSID, 0.5, 0.01, 300, reports.append)
        stats = echo.stats("s")
    assert (result.sent, result.received, result.lost, result.invalid) == (50, 50, 0, 0)
    assert result.rtt is not None
    assert result.network_rtt is not None
    assert result.reflector_processing is not None
    assert 0 < result.rtt.min_ms <= result.rtt.p50_ms <= result.rtt.max_ms < 1000
    assert result.network_rtt.min_ms <= result.rtt.min_ms
    assert result.reflector_processing.min_ms >= 0
    assert result.received_ttl_min == 64
    assert (stats.rx_packets, stats.tx_packets, stats.tx_bytes) == (50, 50, 50 * 300)
    assert reports
    assert (reports[-1].sent, reports[-1].received) == (50, 50)


def test_after_a_stall_the_sender_catches_up_without_a_burst(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 0.3 s stall is 30 late probes; sent at once they would overrun the reflector's burst
    allowance of 10 at 1000 pps. Caught up at twice the rate, none is dropped."""
    stalled: list[float] = []

    def stall_once(_: LatencyProgress) -> None:
        if not stalled:
            stalled.append(time.monotonic())
            time.sleep(0.3)

    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        echo.add_session("s", "127.0.0.1", KEY, time.monotonic() + 10, 1000)
        monkeypatch.setattr(latency, "PROGRESS_INTERVAL_S", 0.05)
        result = measure_latency(echo.address, KEY, SSID, 0.6, 0.01, 112, stall_once)
        stats = echo.stats("s")
    assert stalled, "the stall happened"
    assert stats.dropped["rate"] == 0
    assert (result.sent, result.received, result.lost) == (60, 60, 0)
    assert stats.rx_packets == 60


def test_reflector_rate_clamp_shows_as_forward_loss() -> None:
    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        # 1 ms probes against a 50 pps clamp: most never get past the reflector.
        echo.add_session("s", "127.0.0.1", KEY, time.monotonic() + 10, 50)
        result = measure_latency(echo.address, KEY, SSID, 0.3, 0.001, 112, None)
        dropped = echo.stats("s").dropped["rate"]
    assert result.lost > 0
    assert result.lost_reverse == 0
    assert result.lost_forward + result.lost_unattributed == result.lost
    assert dropped >= result.lost_forward


def test_silence_ends_one_reply_wait_after_the_last_probe() -> None:
    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        echo.add_session("s", "198.51.100.9", KEY, time.monotonic() + 10, 100)  # not us
        start = time.monotonic()
        result = measure_latency(echo.address, KEY, SSID, 0.2, 0.05, 112, None)
        elapsed = time.monotonic() - start
    assert (result.sent, result.received, result.lost_unattributed) == (4, 0, 4)
    assert result.rtt is None
    assert 0.15 + latency.REPLY_WAIT_S <= elapsed < 0.2 + latency.REPLY_WAIT_S + 0.5


def test_a_closed_port_is_total_loss_not_an_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = measure_latency(("127.0.0.1", port), KEY, SSID, 0.05, 0.01, 112, None)
    assert (result.sent, result.received, result.loss_ratio) == (5, 0, 1.0)


def test_packet_count_is_capped(monkeypatch: pytest.MonkeyPatch) -> None:
    # The real cap (100,000) would take 100 s to reach; the logic is the same with 5.
    monkeypatch.setattr(latency, "MAX_PACKETS", 5)
    with UdpEchoReflector(("127.0.0.1", 0)) as echo:
        echo.add_session("s", "127.0.0.1", KEY, time.monotonic() + 10, 1000)
        result = measure_latency(echo.address, KEY, SSID, 3600, 0.001, 112, None)
    assert (result.sent, result.received) == (5, 5)


def test_measure_latency_refuses_bad_pacing() -> None:
    with pytest.raises(ValueError, match="interval"):
        measure_latency(("127.0.0.1", 9), KEY, SSID, 1, 0.0001, 112, None)
    with pytest.raises(ValueError, match="duration"):
        measure_latency(("127.0.0.1", 9), KEY, SSID, 0, 0.01, 112, None)
