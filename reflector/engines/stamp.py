"""STAMP packets in authenticated mode (RFC 8762, with the SSID of RFC 8972): a pure codec.

Why STAMP rather than an ad-hoc echo format: a standard Session-Sender given the session key can
test against Reflector, and the format already carries what latency analysis needs: the
reflector's receive (T2) and send (T3) timestamps, so the sender can subtract the reflector's
processing time, the TTL the probe arrived with, and each side's clock error estimate.

Layouts (octet offsets; every gap is MBZ: zero on transmission, ignored on receipt):

    Session-Sender, authenticated (RFC 8762 §4.2.2, SSID from RFC 8972 §3), 112 octets:
      0 Sequence Number (4) | 4 MBZ (12) | 16 Timestamp (8) | 24 Error Estimate (2)
      26 SSID (2) | 28 MBZ (68) | 96 HMAC (16)

    Session-Reflector, authenticated (RFC 8762 §4.3.2, SSID from RFC 8972 §3), 112 octets:
      0 Sequence Number (4) | 4 MBZ (12) | 16 Timestamp (8) | 24 Error Estimate (2)
      26 SSID (2) | 28 MBZ (4) | 32 Receive Timestamp (8) | 40 MBZ (8)
      48 Session-Sender Sequence Number (4) | 52 MBZ (12) | 64 Session-Sender Timestamp (8)
      72 Session-Sender Error Estimate (2) | 74 MBZ (6) | 80 Ses-Sender TTL (1) | 81 MBZ (15)
      96 HMAC (16)

The HMAC is HMAC-SHA-256 truncated to its first 16 octets, computed over octets 0-95 (RFC 8762
§4.4). RFC 8762 leaves key management out of scope; Reflector uses the 32-byte per-session secret
of the session grant directly as the HMAC key. Octets after the first 112 (padding, or RFC 8972
TLVs) are not covered by this HMAC and are not interpreted here.

Timestamps are in NTP 64-bit format (32-bit seconds since 1900, 32-bit fraction): the Z bit of
every Error Estimate this module writes is 0. Nothing here reads a clock: callers pass times in.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from dataclasses import dataclass
from typing import Final

__all__ = [
    "AUTH_PACKET_LEN",
    "HMAC_COVERED_LEN",
    "HMAC_LEN",
    "KEY_LEN",
    "MAX_PACKET_LEN",
    "ErrorEstimate",
    "Key",
    "ReflectorPacket",
    "SenderPacket",
    "SessionKey",
    "StampError",
    "compute_hmac",
    "decode_error_estimate",
    "decode_reflector",
    "decode_sender",
    "encode_error_estimate",
    "encode_reflector",
    "encode_sender",
    "ntp_delta_ns",
    "ntp_to_unix_ns",
    "reflect",
    "seal_reflector",
    "unix_ns_to_ntp",
    "verify_hmac",
]

# Both authenticated packets are 112 octets (RFC 8762 §4.2.2 and §4.3.2): equal sizes are what
# makes a reflector unable to amplify.
AUTH_PACKET_LEN: Final = 112
# RFC 8762 §4.4: HMAC-SHA-256 truncated to 128 bits, over the first six 16-octet blocks.
HMAC_LEN: Final = 16
HMAC_COVERED_LEN: Final = 96
# The session grant carries a 32-byte secret: the full output size of SHA-256, so the key is
# never the weak link of HMAC-SHA-256 (RFC 2104 §3 recommends at least the hash output length).
KEY_LEN: Final = 32
# 1472 = 1500-byte Ethernet MTU - 20 (IPv4 header) - 8 (UDP header): the largest probe that is
# never fragmented on a standard path; larger datagrams are not measurement probes.
MAX_PACKET_LEN: Final = 1472

# Seconds from the NTP epoch (1900-01-01) to the Unix epoch (1970-01-01): 70 years, 17 leap days.
NTP_UNIX_OFFSET_S: Final = 2_208_988_800
_NS_PER_S: Final = 1_000_000_000
_FRACTION_ONE: Final = 1 << 32
_U64: Final = 1 << 64
# RFC 4330 §3: an NTP seconds value with its top bit clear belongs to era 1 (from 2036-02-07),
# which keeps conversions right for the next century without carrying an era number.
_ERA_PIVOT_S: Final = 1 << 31

# Error Estimate (RFC 4656 §4.1.2, reused by RFC 8762 §4.2.1): S | Z | Scale (6) | Multiplier (8);
# the error in seconds is Multiplier * 2**(Scale - 32). Multiplier MUST NOT be zero.
_S_BIT: Final = 0x8000
_Z_BIT: Final = 0x4000
_SCALE_MAX: Final = 63
_MULTIPLIER_MAX: Final = 255

_SENDER = struct.Struct("!I12xQHH68x")  # up to the HMAC: 96 octets
_REFLECTOR = struct.Struct("!I12xQHH4xQ8xI12xQH6xB15x")  # up to the HMAC: 96 octets
_U64_FIELD = struct.Struct("!Q")
_TIMESTAMP_OFFSET: Final = 16  # of the Timestamp field, in both packets
assert _SENDER.size == HMAC_COVERED_LEN
assert _REFLECTOR.size == HMAC_COVERED_LEN


class StampError(ValueError):
    """A STAMP packet is malformed or fails authentication; `reason` is a short counter name."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True, kw_only=True)
class SenderPacket:
    """The fields of an authenticated Session-Sender test packet."""

    seq: int
    timestamp: int  # T1, NTP 64-bit format
    error_estimate: int
    ssid: int = 0


@dataclass(frozen=True, kw_only=True)
class ReflectorPacket:
    """The fields of an authenticated Session-Reflector test packet."""

    seq: int  # the reflector's own counter (stateful mode, RFC 8762 §4.3)
    timestamp: int  # T3: when the reflector sent this packet
    error_estimate: int
    ssid: int
    receive_timestamp: int  # T2: when the reflector received the sender's packet
    sender_seq: int
    sender_timestamp: int  # T1, copied from the sender's packet
    sender_error_estimate: int
    sender_ttl: int  # TTL / Hop Limit the sender's packet arrived with


@dataclass(frozen=True, kw_only=True)
class ErrorEstimate:
    """A decoded Error Estimate: is the clock synchronized to UTC, and how far off it may be."""

    synchronized: bool
    ptp_format: bool  # Z bit: timestamps in PTPv2 format rather than NTP
    error_s: float


# --------------------------------------------------------------------------------------------
# HMAC
# --------------------------------------------------------------------------------------------


def compute_hmac(key: bytes, covered: bytes) -> bytes:
    """HMAC-SHA-256 of `covered`, truncated to HMAC_LEN octets (RFC 8762 §4.4)."""
    return hmac.digest(key, covered, hashlib.sha256)[:HMAC_LEN]


class SessionKey:
    """A session's 32-byte HMAC key, keyed once.

    Why: OpenSSL 3 spends most of a one-shot HMAC on setting up the key (about 4.8 us for a
    112-octet packet here); copying a keyed state costs about 2.6 us. The reflector signs and
    verifies every packet, so it keeps one of these per session.
    """

    __slots__ = ("_keyed",)

    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_LEN:
            raise ValueError(f"STAMP session key must be {KEY_LEN} bytes, got {len(key)}")
        self._keyed = hmac.new(key, digestmod=hashlib.sha256)

    def mac(self, covered: bytes | bytearray | memoryview) -> bytes:
        """The truncated HMAC of `covered` (the first 96 octets of a packet)."""
        state = self._keyed.copy()
        state.update(covered)
        return state.digest()[:HMAC_LEN]

    def verify(self, packet: bytes) -> bool:
        """Whether an authenticated packet's HMAC field matches its first 96 octets.

        compare_digest: the comparison time must not tell an attacker how many octets were right.
        """
        if len(packet) < AUTH_PACKET_LEN:
            return False
        expected = self.mac(memoryview(packet)[:HMAC_COVERED_LEN])
        return hmac.compare_digest(expected, packet[HMAC_COVERED_LEN:AUTH_PACKET_LEN])


Key = bytes | SessionKey


def _session_key(key: Key) -> SessionKey:
    return key if isinstance(key, SessionKey) else SessionKey(key)


def verify_hmac(key: Key, packet: bytes) -> bool:
    """Whether an authenticated packet's HMAC field matches its first 96 octets."""
    return _session_key(key).verify(packet)


def _check_received(packet: bytes, key: SessionKey) -> None:
    if not AUTH_PACKET_LEN <= len(packet) <= MAX_PACKET_LEN:
        raise StampError(
            "length",
            f"authenticated STAMP packet must be {AUTH_PACKET_LEN}-{MAX_PACKET_LEN} octets, "
            f"got {len(packet)}",
        )
    if not key.verify(packet):
        raise StampError("hmac", "STAMP packet HMAC does not match the session key")


def _padded(body: bytes, key: SessionKey, length: int, trailer: bytes) -> bytes:
    """body + HMAC + trailer, then zero padding up to `length` octets."""
    packet = body + key.mac(body) + trailer
    if len(packet) > length:
        raise ValueError(f"STAMP packet of {len(packet)} octets does not fit in {length}")
    return packet + bytes(length - len(packet))


def _check_length(length: int) -> None:
    if not AUTH_PACKET_LEN <= length <= MAX_PACKET_LEN:
        raise ValueError(
            f"STAMP packet length must be {AUTH_PACKET_LEN}-{MAX_PACKET_LEN}, got {length}"
        )


# --------------------------------------------------------------------------------------------
# Packets
# --------------------------------------------------------------------------------------------


def encode_sender(packet: SenderPacket, key: Key, *, length: int = AUTH_PACKET_LEN) -> bytes:
    """An authenticated Session-Sender packet, zero-padded to `length` octets."""
    session_key = _session_key(key)
    _check_length(length)
    body = _SENDER.pack(packet.seq, packet.timestamp, packet.error_estimate, packet.ssid)
    return _padded(body, session_key, length, b"")


def decode_sender(data: bytes, key: Key) -> SenderPacket:
    """Parse and authenticate a Session-Sender packet; raises StampError ("length" or "hmac")."""
    _check_received(data, _session_key(key))
    seq, timestamp, error_estimate, ssid = _SENDER.unpack_from(data)
    return SenderPacket(seq=seq, timestamp=timestamp, error_estimate=error_estimate, ssid=ssid)


def encode_reflector(packet: ReflectorPacket, key: Key, *, trailer: bytes = b"") -> bytes:
    """An authenticated Session-Reflector packet: 112 octets, then `trailer` unchanged.

    The reflector passes the octets the sender sent after its first 112 as `trailer`, so the
    reply is exactly as long as the request (never longer: no amplification).
    """
    body = _REFLECTOR.pack(
        packet.seq,
        packet.timestamp,
        packet.error_estimate,
        packet.ssid,
        packet.receive_timestamp,
        packet.sender_seq,
        packet.sender_timestamp,
        packet.sender_error_estimate,
        packet.sender_ttl,
    )
    return _padded(body, _session_key(key), AUTH_PACKET_LEN + len(trailer), trailer)


def decode_reflector(data: bytes, key: Key) -> ReflectorPacket:
    """Parse and authenticate a Session-Reflector packet; raises StampError."""
    _check_received(data, _session_key(key))
    fields = _REFLECTOR.unpack_from(data)
    return ReflectorPacket(
        seq=fields[0],
        timestamp=fields[1],
        error_estimate=fields[2],
        ssid=fields[3],
        receive_timestamp=fields[4],
        sender_seq=fields[5],
        sender_timestamp=fields[6],
        sender_error_estimate=fields[7],
        sender_ttl=fields[8],
    )


def reflect(
    request: bytes, *, seq: int, error_estimate: int, receive_timestamp: int, sender_ttl: int
) -> bytearray:
    """The reply to an authenticated sender packet, all but its Timestamp (T3) and HMAC.

    The reflector's fast path: built when the request is accepted, finished by `seal_reflector`
    at the last moment before sending, so T3 is as late as possible. Same layout and the same
    octets as `encode_reflector`; the request must already be verified and 112+ octets long.
    """
    sender_seq, sender_ts, sender_err, ssid = _SENDER.unpack_from(request)
    body = _REFLECTOR.pack(
        seq, 0, error_estimate, ssid, receive_timestamp, sender_seq, sender_ts, sender_err,
        sender_ttl,
    )  # fmt: skip
    return bytearray(body + bytes(HMAC_LEN) + request[AUTH_PACKET_LEN:])


def seal_reflector(template: bytearray, key: SessionKey, timestamp: int) -> bytes:
    """Write T3 into a `reflect` template and sign it; returns the packet to send."""
    _U64_FIELD.pack_into(template, _TIMESTAMP_OFFSET, timestamp)
    template[HMAC_COVERED_LEN:AUTH_PACKET_LEN] = key.mac(memoryview(template)[:HMAC_COVERED_LEN])
    return bytes(template)


# --------------------------------------------------------------------------------------------
# NTP timestamps
# --------------------------------------------------------------------------------------------


def unix_ns_to_ntp(unix_ns: int) -> int:
    """Unix time in nanoseconds (time.time_ns()) as a 64-bit NTP timestamp.

    The fraction is truncated, not rounded: a resolution of 2**-32 s (0.23 ns) loses nothing a
    network measurement can see. Seconds wrap modulo 2**32 (NTP era 1 starts in 2036).
    """
    seconds, nanos = divmod(unix_ns, _NS_PER_S)
    fraction = (nanos << 32) // _NS_PER_S
    return (((seconds + NTP_UNIX_OFFSET_S) % _FRACTION_ONE) << 32) | fraction


def ntp_to_unix_ns(ntp: int) -> int:
    """A 64-bit NTP timestamp as Unix nanoseconds (era chosen as RFC 4330 §3 says)."""
    seconds, fraction = ntp >> 32, ntp & (_FRACTION_ONE - 1)
    if seconds < _ERA_PIVOT_S:
        seconds += _FRACTION_ONE
    nanos = (fraction * _NS_PER_S) >> 32
    return (seconds - NTP_UNIX_OFFSET_S) * _NS_PER_S + nanos


def ntp_delta_ns(later: int, earlier: int) -> int:
    """later - earlier in nanoseconds, modulo 2**64 so an era rollover in between is harmless.

    Differences beyond ±68 years are not representable, which no measurement comes close to.
    """
    delta = (later - earlier) % _U64
    if delta >= _U64 // 2:
        delta -= _U64
    # Round half away from zero so that -x and x convert symmetrically.
    sign = -1 if delta < 0 else 1
    return sign * ((abs(delta) * _NS_PER_S + (_FRACTION_ONE >> 1)) >> 32)


# --------------------------------------------------------------------------------------------
# Error Estimate
# --------------------------------------------------------------------------------------------


def encode_error_estimate(*, synchronized: bool, error_s: float) -> int:
    """The 16-bit Error Estimate for a clock with the given sync state and error bound.

    Chooses the smallest Scale whose Multiplier fits in 8 bits and rounds the Multiplier up, so
    the encoded error is never smaller than the real bound (it may be at most 1/128 larger).
    Errors beyond the largest encodable value (255 * 2**31 s) saturate.
    """
    if not error_s >= 0:  # also rejects NaN
        raise ValueError(f"clock error must be a non-negative number of seconds, got {error_s}")
    units = error_s * _FRACTION_ONE  # in 2**-32 s
    scale = 0
    while scale < _SCALE_MAX and math.ceil(units / (1 << scale)) > _MULTIPLIER_MAX:
        scale += 1
    multiplier = min(_MULTIPLIER_MAX, max(1, math.ceil(units / (1 << scale))))
    return (_S_BIT if synchronized else 0) | (scale << 8) | multiplier


def decode_error_estimate(value: int) -> ErrorEstimate:
    """The sync state, timestamp format and error bound (seconds) of a 16-bit Error Estimate."""
    scale = (value >> 8) & _SCALE_MAX
    multiplier = value & 0xFF
    return ErrorEstimate(
        synchronized=bool(value & _S_BIT),
        ptp_format=bool(value & _Z_BIT),
        error_s=multiplier * 2.0 ** (scale - 32),
    )
