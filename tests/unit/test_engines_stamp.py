"""STAMP authenticated-mode codec: layouts, HMAC, NTP timestamps and Error Estimate.

Expected packets are written out octet by octet from the RFC 8762 figures, and the expected
HMACs are computed here with hashlib directly, so the codec is checked against the layout and
not against itself.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from reflector.engines import stamp
from reflector.engines.stamp import ReflectorPacket, SenderPacket, StampError

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))


def _hmac16(key: bytes, covered: bytes) -> bytes:
    return hmac.new(key, covered, hashlib.sha256).digest()[:16]


# --------------------------------------------------------------------------------------------
# HMAC
# --------------------------------------------------------------------------------------------


def test_hmac_is_sha256_truncated_to_16_octets_rfc4231_test_case_5() -> None:
    # RFC 4231 §4.6: the truncation test vector, HMAC-SHA-256 truncated to 128 bits.
    key = b"\x0c" * 20
    assert stamp.compute_hmac(key, b"Test With Truncation") == bytes.fromhex(
        "a3b6167473100ee06e0c796c2955552b"
    )


# --------------------------------------------------------------------------------------------
# Session-Sender packet
# --------------------------------------------------------------------------------------------

SENDER = SenderPacket(
    seq=0x01020304, timestamp=0x1122334455667788, error_estimate=0x8F84, ssid=0xBEEF
)

# RFC 8762 §4.2.2 (SSID: RFC 8972 §3), offsets on the left.
SENDER_COVERED = bytes.fromhex(
    "01020304"  # 0   Sequence Number
    + "00" * 12  # 4   MBZ
    + "1122334455667788"  # 16  Timestamp
    + "8f84"  # 24  Error Estimate
    + "beef"  # 26  SSID
    + "00" * 68  # 28  MBZ
)


def test_sender_packet_matches_the_rfc_8762_authenticated_layout() -> None:
    packet = stamp.encode_sender(SENDER, KEY)
    assert len(SENDER_COVERED) == 96
    assert packet == SENDER_COVERED + _hmac16(KEY, SENDER_COVERED)
    assert len(packet) == stamp.AUTH_PACKET_LEN == 112


def test_sender_packet_round_trips() -> None:
    assert stamp.decode_sender(stamp.encode_sender(SENDER, KEY), KEY) == SENDER


def test_sender_padding_is_zeros_after_the_hmac_and_not_covered_by_it() -> None:
    packet = stamp.encode_sender(SENDER, KEY, length=300)
    assert len(packet) == 300
    assert packet[:112] == stamp.encode_sender(SENDER, KEY)
    assert packet[112:] == bytes(188)
    assert stamp.decode_sender(packet, KEY) == SENDER


@pytest.mark.parametrize("length", [111, 1473])
def test_sender_length_outside_the_authenticated_range_is_refused(length: int) -> None:
    with pytest.raises(ValueError, match="length"):
        stamp.encode_sender(SENDER, KEY, length=length)


def test_decode_refuses_a_wrong_key_as_hmac() -> None:
    with pytest.raises(StampError) as info:
        stamp.decode_sender(stamp.encode_sender(SENDER, KEY), OTHER_KEY)
    assert info.value.reason == "hmac"


def test_decode_refuses_any_flipped_bit_in_the_covered_octets() -> None:
    packet = bytearray(stamp.encode_sender(SENDER, KEY))
    for offset in (0, 20, 26, 95, 96, 111):
        tampered = bytearray(packet)
        tampered[offset] ^= 0x01
        assert not stamp.verify_hmac(KEY, bytes(tampered)), offset


@pytest.mark.parametrize("length", [0, 44, 111, 1473])
def test_decode_refuses_wrong_lengths(length: int) -> None:
    with pytest.raises(StampError) as info:
        stamp.decode_sender(bytes(length), KEY)
    assert info.value.reason == "length"


def test_keys_must_be_32_bytes() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        stamp.encode_sender(SENDER, KEY[:16])


# --------------------------------------------------------------------------------------------
# Session-Reflector packet
# --------------------------------------------------------------------------------------------

REFLECTOR = ReflectorPacket(
    seq=0x0A0B0C0D,
    timestamp=0x2122232425262728,
    error_estimate=0x0001,
    ssid=0xBEEF,
    receive_timestamp=0x3132333435363738,
    sender_seq=0x01020304,
    sender_timestamp=0x1122334455667788,
    sender_error_estimate=0x8F84,
    sender_ttl=57,
)

# RFC 8762 §4.3.2 (SSID: RFC 8972 §3), offsets on the left.
REFLECTOR_COVERED = bytes.fromhex(
    "0a0b0c0d"  # 0   Sequence Number
    + "00" * 12  # 4   MBZ
    + "2122232425262728"  # 16  Timestamp
    + "0001"  # 24  Error Estimate
    + "beef"  # 26  SSID
    + "00" * 4  # 28  MBZ
    + "3132333435363738"  # 32  Receive Timestamp
    + "00" * 8  # 40  MBZ
    + "01020304"  # 48  Session-Sender Sequence Number
    + "00" * 12  # 52  MBZ
    + "1122334455667788"  # 64  Session-Sender Timestamp
    + "8f84"  # 72  Session-Sender Error Estimate
    + "00" * 6  # 74  MBZ
    + "39"  # 80  Ses-Sender TTL (57)
    + "00" * 15  # 81  MBZ
)


def test_reflector_packet_matches_the_rfc_8762_authenticated_layout() -> None:
    packet = stamp.encode_reflector(REFLECTOR, KEY)
    assert len(REFLECTOR_COVERED) == 96
    assert packet == REFLECTOR_COVERED + _hmac16(KEY, REFLECTOR_COVERED)


def test_reflector_packet_round_trips() -> None:
    assert stamp.decode_reflector(stamp.encode_reflector(REFLECTOR, KEY), KEY) == REFLECTOR


def test_reflector_trailer_is_returned_unchanged_so_reply_length_equals_request_length() -> None:
    trailer = bytes(range(200))
    packet = stamp.encode_reflector(REFLECTOR, KEY, trailer=trailer)
    assert len(packet) == 112 + 200
    assert packet[112:] == trailer
    assert stamp.decode_reflector(packet, KEY) == REFLECTOR


# --------------------------------------------------------------------------------------------
# NTP timestamps
# --------------------------------------------------------------------------------------------


def test_unix_epoch_is_ntp_second_2208988800() -> None:
    assert stamp.unix_ns_to_ntp(0) == 0x83AA7E80_00000000
    assert stamp.unix_ns_to_ntp(500_000_000) == 0x83AA7E80_80000000  # half a second
    assert stamp.unix_ns_to_ntp(250_000_000) == 0x83AA7E80_40000000


def test_ntp_era_1_starts_2036_02_07_and_converts_back() -> None:
    era1_unix_s = 2_085_978_496  # 2036-02-07T06:28:16Z
    assert stamp.unix_ns_to_ntp(era1_unix_s * 10**9) == 0
    assert stamp.ntp_to_unix_ns(0) == era1_unix_s * 10**9
    assert stamp.ntp_to_unix_ns(0x83AA7E80_80000000) == 500_000_000


@given(st.integers(min_value=0, max_value=4_000_000_000 * 10**9))
def test_ntp_conversion_round_trips_within_one_nanosecond(unix_ns: int) -> None:
    back = stamp.ntp_to_unix_ns(stamp.unix_ns_to_ntp(unix_ns))
    assert 0 <= unix_ns - back <= 1


def test_ntp_delta_is_signed_and_survives_an_era_rollover() -> None:
    before = stamp.unix_ns_to_ntp(2_085_978_496 * 10**9 - 1_000_000)  # 1 ms before 2036 wrap
    after = stamp.unix_ns_to_ntp(2_085_978_496 * 10**9 + 2_000_000)  # 2 ms after
    assert stamp.ntp_delta_ns(after, before) == pytest.approx(3_000_000, abs=1)
    assert stamp.ntp_delta_ns(before, after) == pytest.approx(-3_000_000, abs=1)
    assert stamp.ntp_delta_ns(1 << 31, 0) == 500_000_000


# --------------------------------------------------------------------------------------------
# Error Estimate
# --------------------------------------------------------------------------------------------


def test_error_estimate_one_millisecond_synchronized() -> None:
    # 1 ms = 4294967.3 units of 2**-32 s; the smallest scale with multiplier <= 255 is 15:
    # ceil(4294967.3 / 2**15) = 132. S=1, Z=0, scale 15, multiplier 132 -> 0x8F84.
    assert stamp.encode_error_estimate(synchronized=True, error_s=0.001) == 0x8F84


def test_error_estimate_unsynchronized_16_seconds() -> None:
    # 16 s = 2**36 units = 128 * 2**29: S=0, scale 29, multiplier 128 -> 0x1D80.
    assert stamp.encode_error_estimate(synchronized=False, error_s=16.0) == 0x1D80


def test_error_estimate_multiplier_is_never_zero_and_saturates() -> None:
    assert stamp.encode_error_estimate(synchronized=True, error_s=0.0) == 0x8001
    assert stamp.encode_error_estimate(synchronized=False, error_s=1e30) == 0x3FFF


def test_error_estimate_refuses_negative_or_nan() -> None:
    for bad in (-1.0, float("nan")):
        with pytest.raises(ValueError, match="non-negative"):
            stamp.encode_error_estimate(synchronized=True, error_s=bad)


def test_error_estimate_decodes_s_z_and_seconds() -> None:
    decoded = stamp.decode_error_estimate(0x8F84)
    assert decoded.synchronized
    assert not decoded.ptp_format
    assert decoded.error_s == 132 * 2.0**-17
    assert stamp.decode_error_estimate(0x4001).ptp_format


@given(st.floats(min_value=1e-9, max_value=1e6))
def test_error_estimate_never_understates_and_overstates_by_under_1_percent(error_s: float) -> None:
    decoded = stamp.decode_error_estimate(
        stamp.encode_error_estimate(synchronized=False, error_s=error_s)
    )
    assert error_s <= decoded.error_s <= error_s * (1 + 1 / 128) + 2.0**-32


# --------------------------------------------------------------------------------------------
# Fuzz: arbitrary input is a StampError, never anything else
# --------------------------------------------------------------------------------------------


@given(st.binary(max_size=1600))
def test_random_input_raises_only_stamp_error(data: bytes) -> None:
    # A random 112+ octet string matching a 128-bit HMAC has probability 2**-128: always refused.
    for decode in (stamp.decode_sender, stamp.decode_reflector):
        with pytest.raises(StampError) as info:
            decode(data, KEY)
        assert info.value.reason in {"length", "hmac"}
