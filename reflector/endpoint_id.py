"""Endpoint ID codec: the human-friendly name of an Ed25519 public key (spec §4.2).

Pure functions, no I/O. The ID is derived only from the public key, so it is stable, carries no
IP address or hostname, and anyone holding the key can recompute it.

Layout (30 significant characters, grouped in fours for reading aloud, as the spec example
``PP5R-6Q2M-1K9D-...-C3`` shows)::

    PPdd-dddd-dddd-dddd-dddd-dddd-dddd-cc

* ``PP``: fixed prefix, so an ID is recognisable on sight and cannot be confused with other
  Base32 strings.
* 26 ``d``: the first 130 bits of SHA-256(raw 32-byte public key), big-endian, 5 bits per
  Crockford Base32 character.
* 2 ``c``: check characters (see below).

Check characters. Plain Luhn mod 32 catches every single substitution and every adjacent
transposition except one: swapping the values 0 and 31 (``0Z`` <-> ``Z0``), the base-32 twin of
``09`` <-> ``90`` in decimal. Proof sketch: Luhn doubles every other value and folds it back
with a digit sum, ``f(v) = 2v`` for ``v < 16`` and ``2v - 31`` otherwise. Swapping neighbours
``a, b`` changes the sum by ``g(a) - g(b)`` where ``g(v) = v - f(v)``, which is ``-v mod 32`` for
``v < 16`` and ``31 - v`` otherwise; ``g`` takes the value 0 exactly for ``v`` in {0, 31} and is
otherwise injective, so 0/31 is the only swap Luhn misses.

So the first check character ``c1`` is Luhn mod 32 over the 26 data values, and the second,
``c2``, is Luhn mod 32 over the data values *and* ``c1``, each first mapped through the fixed
permutation ``_PERMUTE`` (``v -> 5v + 3 mod 32``). The permutation sends 0 and 31 to 3 and 30, a
pair Luhn does catch, so any swap ``c1`` misses, ``c2`` catches. A single substitution anywhere
in data or ``c1`` changes ``c1``'s sum; a substitution of ``c2`` changes ``c2``'s own sum; a swap
of ``c1`` and ``c2`` is a substitution of ``c1``. The tests check all of this exhaustively.

Parsing is forgiving where it cannot be wrong: case-insensitive, Crockford's aliases (O -> 0,
I and L -> 1), and any dashes or whitespace are ignored.
"""

from __future__ import annotations

import hashlib

from reflector.errors import EndpointIdError

__all__ = [
    "ENDPOINT_ID_PREFIX",
    "ID_CHECK_CHARS",
    "ID_DATA_CHARS",
    "endpoint_id_from_public_key",
    "is_valid_id",
    "parse_id",
    "public_key_fingerprint",
]

# Crockford Base32: no I, L, O (look like 1, 1, 0) and no U (accidental obscenity).
_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
_BASE = len(_ALPHABET)
_BITS_PER_CHAR = 5
_VALUE = {char: value for value, char in enumerate(_ALPHABET)}
# Crockford's decoding aliases: what people write when they mean 0 and 1.
_ALIASES = {"O": "0", "I": "1", "L": "1"}
# Separators a reader may type or a chat client may insert; they carry no meaning.
_SEPARATORS = frozenset("-\u2010\u2011\u2012\u2013\u2014\u2212")
# One str.translate pass does case, aliases and separators for the common case (the ID is read
# often, e.g. for every allowlist entry). Deliberately not str.upper(): it maps some non-ASCII
# letters to ASCII ones (e.g. the German sharp s to "SS"), which must stay errors.
_FAST_TRANSLATION = str.maketrans(
    {char.lower(): char for char in _ALPHABET if char.isalpha()}
    | {alias.lower(): value for alias, value in _ALIASES.items()}
    | _ALIASES
    | dict.fromkeys(_SEPARATORS | frozenset(" \t\r\n"), None)
)

ENDPOINT_ID_PREFIX = "PP"
# 130 bits: far beyond any feasible search for a second key with the same ID (a 2^130 preimage
# search; even a birthday collision between two freshly made keys needs ~2^65 keys), while the
# whole ID stays short enough to read over the phone: 26 characters.
ID_DATA_CHARS = 26
_ID_BITS = ID_DATA_CHARS * _BITS_PER_CHAR
# Two check characters: one alone (Luhn mod 32) misses the 0/31 transposition; see module doc.
ID_CHECK_CHARS = 2
_COMPACT_LENGTH = len(ENDPOINT_ID_PREFIX) + ID_DATA_CHARS + ID_CHECK_CHARS
# Groups of four are easy to read aloud and to compare; 30 characters give 7 groups of 4 and a
# final group holding the two check characters.
_GROUP_SIZE = 4
_ED25519_PUBLIC_KEY_BYTES = 32
# Luhn's "double, then add the two digits" for each value, precomputed (a permutation of 0..31).
_LUHN_DOUBLED = tuple(sum(divmod(2 * value, _BASE)) for value in range(_BASE))
# Any odd multiplier is a bijection mod 32; 5v + 3 sends 0 -> 3 and 31 -> 30 (see module doc).
_PERMUTE = tuple((5 * value + 3) % _BASE for value in range(_BASE))

_MSG_CHECK_MISMATCH = (
    "check characters do not match: a character is mistyped or two neighbours are swapped"
)


def public_key_fingerprint(raw: bytes) -> str:
    """Lowercase hex SHA-256 of the raw public key: the exact pin, for machines, not people."""
    _require_raw_key(raw)
    return hashlib.sha256(raw).hexdigest()


def endpoint_id_from_public_key(raw: bytes) -> str:
    """The canonical (dashed) Endpoint ID of a raw 32-byte Ed25519 public key."""
    _require_raw_key(raw)
    digest = int.from_bytes(hashlib.sha256(raw).digest(), "big")
    top_bits = digest >> (256 - _ID_BITS)
    data = [
        (top_bits >> (_BITS_PER_CHAR * (ID_DATA_CHARS - 1 - i))) & (_BASE - 1)
        for i in range(ID_DATA_CHARS)
    ]
    return _format(data + list(_check_values(data)))


def parse_id(text: str) -> str:
    """Validate a typed or pasted ID and return its canonical form, or raise EndpointIdError.

    The error message says what is wrong, so a person reading an ID aloud knows what to fix.
    """
    compact = _normalise(text)
    if not compact:
        raise EndpointIdError("endpoint ID is empty")
    if not compact.startswith(ENDPOINT_ID_PREFIX):
        raise EndpointIdError(
            f"endpoint ID must start with {ENDPOINT_ID_PREFIX!r}, not {compact[:2]!r}"
        )
    body = compact[len(ENDPOINT_ID_PREFIX) :]
    expected = ID_DATA_CHARS + ID_CHECK_CHARS
    if len(body) != expected:
        adjective = "short" if len(body) < expected else "long"
        raise EndpointIdError(
            f"endpoint ID is too {adjective}: {len(body)} characters after "
            f"{ENDPOINT_ID_PREFIX}, expected {expected}"
        )
    values = [_VALUE[char] for char in body]
    data, check = values[:ID_DATA_CHARS], values[ID_DATA_CHARS:]
    if tuple(check) != _check_values(data):
        raise EndpointIdError(_MSG_CHECK_MISMATCH)
    return _format(values)


def is_valid_id(text: str) -> bool:
    """True if `text` parses as an Endpoint ID (aliases, case and separators allowed)."""
    try:
        parse_id(text)
    except EndpointIdError:
        return False
    return True


def _require_raw_key(raw: bytes) -> None:
    if len(raw) != _ED25519_PUBLIC_KEY_BYTES:
        raise ValueError(
            f"an Ed25519 public key is {_ED25519_PUBLIC_KEY_BYTES} raw bytes, got {len(raw)}"
        )


def _normalise(text: str) -> str:
    """Uppercase, apply aliases, drop separators; reject anything outside the alphabet."""
    compact = text.translate(_FAST_TRANSLATION)
    if _VALUE.keys() >= set(compact):
        return compact
    return _normalise_slowly(text)


def _normalise_slowly(text: str) -> str:
    """Character by character, so the error can name the first bad character and where it is.

    Positions are 1-based positions in the text as given, so the reader can find the offending
    character in what they typed. Also accepts non-ASCII whitespace (pasted from rich text).
    """
    out: list[str] = []
    for position, raw_char in enumerate(text, start=1):
        if raw_char in _SEPARATORS or raw_char.isspace():
            continue
        # Only ASCII may be case-folded: str.upper() maps U+017F (long s) to "S" and U+0131
        # (dotless i) to "I", which would let look-alikes through.
        upper = raw_char.upper() if raw_char.isascii() else raw_char
        char = _ALIASES.get(upper, upper)
        if char not in _VALUE:
            raise EndpointIdError(
                f"character {raw_char!r} at position {position} is not allowed in an endpoint "
                f"ID (letters and digits except U)"
            )
        out.append(char)
    return "".join(out)


def _luhn_check_value(values: list[int]) -> int:
    """Luhn mod 32: the value that makes the weighted sum of `values` + check equal 0 mod 32.

    Weights run from the right: the value next to the check character is doubled, the next is
    not, and so on; a doubled value >= 32 is folded back by adding its two base-32 digits.
    """
    from_right = values[::-1]
    total = sum(_LUHN_DOUBLED[value] for value in from_right[0::2]) + sum(from_right[1::2])
    return (-total) % _BASE


def _check_values(data: list[int]) -> tuple[int, int]:
    first = _luhn_check_value(data)
    second = _luhn_check_value([_PERMUTE[value] for value in [*data, first]])
    return first, second


def _format(values: list[int]) -> str:
    compact = ENDPOINT_ID_PREFIX + "".join(_ALPHABET[value] for value in values)
    assert len(compact) == _COMPACT_LENGTH
    return "-".join(
        compact[start : start + _GROUP_SIZE] for start in range(0, len(compact), _GROUP_SIZE)
    )
