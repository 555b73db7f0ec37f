"""The hash chain of the JSON-lines audit file: encoding a record, and verifying a file.

Each line is one compact JSON object whose first keys are ``seq`` (1, 2, 3, ...), ``ts`` and
``prev``: the SHA-256 (hex) of the previous line's exact bytes, *without* its terminating
``\\n``; the first record's ``prev`` is 64 zeros. Editing, removing, inserting or reordering any
record therefore breaks the chain at that point, and `verify_lines` names the line.

What a chain cannot show on its own: removal of whole records from the *end* (the file simply
looks shorter). The journald copy, with its own sequence numbers, or a periodic copy of the last
``prev`` kept elsewhere, covers that.

`encode_line` and `verify_lines` are pure; `verify_chain` is the thin file-reading shell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from reflector.errors import ReflectorError

__all__ = [
    "GENESIS_PREV",
    "MAX_RECORD_BYTES",
    "VerifyResult",
    "encode_line",
    "line_digest",
    "verify_chain",
    "verify_lines",
]

GENESIS_PREV: Final = "0" * 64
# Every field of an event is bounded (events.py): the worst case is about 20 KiB of text plus
# 4 KiB of params. 32 KiB is a safe ceiling for writing, and lets readers bound each line read.
MAX_RECORD_BYTES: Final = 32 * 1024


def line_digest(line: bytes) -> str:
    """The chain hash of one record line (without its ``\\n``)."""
    return hashlib.sha256(line).hexdigest()


def encode_line(body: Mapping[str, Any], *, seq: int, prev: str) -> bytes:
    """One record line (without ``\\n``): ``seq``, ``ts``, ``prev``, then the rest of `body`.

    JSON escapes every control character inside strings, so the line can never contain a raw
    newline. Raises ValueError if the encoded record exceeds MAX_RECORD_BYTES (a bug: events are
    bounded well below it).
    """
    record = {"seq": seq, "ts": body["ts"], "prev": prev}
    record.update((k, v) for k, v in body.items() if k not in record)
    line = json.dumps(record, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    if len(line) > MAX_RECORD_BYTES:
        raise ValueError(f"audit record of {len(line)} bytes exceeds {MAX_RECORD_BYTES}")
    return line


@dataclass(frozen=True, kw_only=True)
class VerifyResult:
    """Outcome of checking a chain.

    `records` counts the records that verified (all of them when `ok`); `line` is the 1-based
    line number of the first broken record and `reason` says why, both None when `ok`.
    """

    ok: bool
    records: int
    line: int | None = None
    reason: str | None = None


def _broken(line: int, reason: str) -> VerifyResult:
    return VerifyResult(ok=False, records=line - 1, line=line, reason=reason)


def parse_record(body: bytes) -> dict[str, Any] | None:
    """A record line's JSON object if it has an int ``seq`` and a str ``prev``, else None."""
    try:
        record = json.loads(body)
    except ValueError:  # includes UnicodeDecodeError
        return None
    if not isinstance(record, dict):
        return None
    seq, prev = record.get("seq"), record.get("prev")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(prev, str):
        return None
    return record


def verify_lines(lines: Iterable[bytes]) -> VerifyResult:
    """Check a chain given its raw lines, each with its ``\\n`` (the last may lack it).

    Stops at the first break. A line that fails the ``prev`` check while its ``seq`` follows on
    correctly means the line *before* it no longer has the bytes that were hashed: that earlier
    line is reported as altered.
    """
    expected_seq, prev_digest, count = 1, GENESIS_PREV, 0
    for number, raw in enumerate(lines, start=1):
        if len(raw) > MAX_RECORD_BYTES + 1:
            return _broken(number, f"line longer than {MAX_RECORD_BYTES} bytes")
        if not raw.endswith(b"\n"):
            return _broken(number, "incomplete last line (partial write: crash or full disk)")
        body = raw[:-1]
        record = parse_record(body)
        if record is None:
            return _broken(number, "not a valid audit record (bad JSON, or no seq/prev)")
        if record["seq"] != expected_seq:
            return _broken(number, _seq_problem(record["seq"], expected_seq))
        if record["prev"] != prev_digest:
            if number == 1:
                return _broken(1, "first record's prev is not 64 zeros (log start replaced)")
            return _broken(
                number - 1,
                f"record altered: its SHA-256 differs from the prev stored in line {number} "
                f"(or line {number}'s prev was edited)",
            )
        expected_seq, prev_digest, count = expected_seq + 1, line_digest(body), count + 1
    return VerifyResult(ok=True, records=count)


def _seq_problem(seq: object, expected: int) -> str:
    if isinstance(seq, int) and seq > expected:
        return f"seq {seq} where {expected} was expected: {seq - expected} record(s) removed"
    return f"seq {seq} where {expected} was expected: record inserted, repeated or reordered"


def read_raw_lines(path: Path) -> Iterator[bytes]:
    """Yield `path`'s lines with their ``\\n``, each read at most MAX_RECORD_BYTES + 2 long.

    A longer line comes out in pieces, the first without ``\\n`` and too long, which the
    consumers report; memory stays bounded whatever the file holds.
    """
    with path.open("rb") as stream:
        while chunk := stream.readline(MAX_RECORD_BYTES + 2):
            yield chunk


def verify_chain(path: Path) -> VerifyResult:
    """Verify the audit file at `path`. Raises ReflectorError if it cannot be read at all."""
    try:
        return verify_lines(read_raw_lines(path))
    except OSError as exc:
        raise ReflectorError(f"cannot read audit log {path}: {exc.strerror or exc}") from exc
