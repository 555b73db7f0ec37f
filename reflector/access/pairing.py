"""Pairing windows (spec §5.4): one-time tokens that admit a single new appliance.

`reflector pair --ttl 10m`, run on the endpoint host by someone who can write the state dir (that
is the user-presence requirement), writes `pairing.json` holding only the SHA-256 of a fresh
token and its expiry. Run as root, the file still belongs to the state dir's owner, the service
user, who must read it (`fsutil`). The running server reads that file when an unknown peer
presents a token, so no restart or IPC is needed. The token itself is printed once and never
stored. Enrollment consumes the window (the file is removed), so a token works at most once.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from reflector.errors import ReflectorError
from reflector.fsutil import atomic_write

PAIRING_FILE_NAME = "pairing.json"
# 24 random bytes = 192 bits, above the 128-bit floor; url-safe so it survives chat and phone.
TOKEN_BYTES = 24
# A pairing window is a short act of user presence, not a standing invitation.
MAX_PAIRING_TTL_SEC = 24 * 3600
MIN_PAIRING_TTL_SEC = 10
# Tokens are printed as ~32 characters; anything much longer is not one of ours.
MAX_TOKEN_CHARS = 128


@dataclass(frozen=True, kw_only=True)
class PairingWindow:
    """What the state dir records about an open window (never the token itself)."""

    token_sha256: str
    expires_at: float
    opened_at: float


class PairingRefused(Exception):
    """A pairing attempt failed; `reason` is the wire reason code."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def open_window(state_dir: Path, ttl_sec: int, now: float) -> tuple[str, PairingWindow]:
    """Create a token and record its window, replacing any earlier window."""
    if not MIN_PAIRING_TTL_SEC <= ttl_sec <= MAX_PAIRING_TTL_SEC:
        raise ReflectorError(
            f"pairing ttl must be between {MIN_PAIRING_TTL_SEC}s and {MAX_PAIRING_TTL_SEC}s,"
            f" got {ttl_sec}s"
        )
    token = secrets.token_urlsafe(TOKEN_BYTES)
    window = PairingWindow(token_sha256=_digest(token), expires_at=now + ttl_sec, opened_at=now)
    atomic_write(state_dir / PAIRING_FILE_NAME, json.dumps(window.__dict__).encode(), 0o600)
    return token, window


def read_window(state_dir: Path) -> PairingWindow | None:
    """The recorded window, or None when none is open (a corrupt file counts as none)."""
    try:
        doc = json.loads((state_dir / PAIRING_FILE_NAME).read_bytes())
        return PairingWindow(
            token_sha256=str(doc["token_sha256"]),
            expires_at=float(doc["expires_at"]),
            opened_at=float(doc["opened_at"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def close_window(state_dir: Path) -> bool:
    """Remove the window; True if there was one."""
    try:
        os.unlink(state_dir / PAIRING_FILE_NAME)
    except FileNotFoundError:
        return False
    return True


def consume(state_dir: Path, token: str, now: float, *, enabled: bool) -> None:
    """Check `token` against the open window and close it on success; raise PairingRefused."""
    if not enabled:
        raise PairingRefused("pairing_closed", "pairing is disabled on this endpoint")
    window = read_window(state_dir)
    if window is None:
        raise PairingRefused("pairing_closed", "no pairing window is open on this endpoint")
    if now >= window.expires_at:
        close_window(state_dir)
        raise PairingRefused("pairing_closed", "the pairing window has expired")
    if len(token) > MAX_TOKEN_CHARS or not hmac.compare_digest(_digest(token), window.token_sha256):
        raise PairingRefused("bad_token", "the pairing token is wrong")
    # Single use: whoever removes the file first wins; a racing second enrollment fails here.
    if not close_window(state_dir):
        raise PairingRefused("pairing_closed", "the pairing window was already used")


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "replace")).hexdigest()
