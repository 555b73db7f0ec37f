"""Endpoint ID codec: derived from the key, readable aloud, and every typo of one kind is caught."""

from __future__ import annotations

import hashlib
import random
import re

import pytest

from reflector.endpoint_id import (
    ENDPOINT_ID_PREFIX,
    endpoint_id_from_public_key,
    is_valid_id,
    parse_id,
    public_key_fingerprint,
)
from reflector.errors import EndpointIdError

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Enough random keys that every character value appears at every position many times.
RANDOM_KEYS = 200
CANONICAL = re.compile(
    r"^PP[0-9A-HJKMNP-TV-Z]{2}(-[0-9A-HJKMNP-TV-Z]{4}){6}-[0-9A-HJKMNP-TV-Z]{2}$"
)

# RFC 8032 §7.1 test 1 public key, a fixed key anyone can check against.
RFC8032_PUBLIC_KEY = bytes.fromhex(
    "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a"
)


def random_keys(count: int, seed: int = 8032) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(32) for _ in range(count)]


def compact(endpoint_id: str) -> str:
    return endpoint_id.replace("-", "")


def test_known_vector_is_stable() -> None:
    assert (
        endpoint_id_from_public_key(RFC8032_PUBLIC_KEY) == "PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-60"
    )
    assert public_key_fingerprint(RFC8032_PUBLIC_KEY) == (
        "21fe31dfa154a261626bf854046fd2271b7bed4b6abe45aa58877ef47f9721b9"
    )


def test_data_characters_are_the_first_130_bits_of_sha256() -> None:
    for key in random_keys(20):
        body = compact(endpoint_id_from_public_key(key))[2:28]
        bits = int.from_bytes(hashlib.sha256(key).digest(), "big") >> (256 - 130)
        decoded = 0
        for char in body:
            decoded = decoded * 32 + ALPHABET.index(char)
        assert decoded == bits


def test_format_is_pp_then_groups_of_four_ending_with_two_check_characters() -> None:
    for key in random_keys(50):
        endpoint_id = endpoint_id_from_public_key(key)
        assert CANONICAL.match(endpoint_id), endpoint_id
        assert endpoint_id.startswith(ENDPOINT_ID_PREFIX)
        assert len(compact(endpoint_id)) == 30


def luhn_mod_32_holds(values: list[int]) -> bool:
    """Textbook Luhn validation: from the right, double every second value, fold, sum to 0."""
    total = 0
    for index, value in enumerate(reversed(values)):
        if index % 2 == 1:
            value = sum(divmod(value * 2, 32))
        total += value
    return total % 32 == 0


def test_first_check_character_is_luhn_mod_32_over_the_data() -> None:
    for key in random_keys(100):
        values = [ALPHABET.index(char) for char in compact(endpoint_id_from_public_key(key))[2:]]
        assert luhn_mod_32_holds(values[:27])


def test_fingerprint_is_lowercase_hex_sha256_of_raw_key() -> None:
    key = random_keys(1)[0]
    assert public_key_fingerprint(key) == hashlib.sha256(key).hexdigest()


def test_different_keys_give_different_ids() -> None:
    ids = {endpoint_id_from_public_key(key) for key in random_keys(RANDOM_KEYS)}
    assert len(ids) == RANDOM_KEYS


def test_key_of_wrong_length_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        endpoint_id_from_public_key(b"\x00" * 31)
    with pytest.raises(ValueError, match="32 raw bytes"):
        public_key_fingerprint(b"\x00" * 33)


def test_canonical_id_parses_to_itself() -> None:
    for key in random_keys(50):
        endpoint_id = endpoint_id_from_public_key(key)
        assert parse_id(endpoint_id) == endpoint_id
        assert is_valid_id(endpoint_id)


def test_every_single_character_substitution_is_rejected() -> None:
    for key in random_keys(RANDOM_KEYS):
        chars = list(compact(endpoint_id_from_public_key(key)))
        for position in range(len(chars)):
            for replacement in ALPHABET:
                if replacement == chars[position]:
                    continue
                typo = "".join([*chars[:position], replacement, *chars[position + 1 :]])
                assert not is_valid_id(typo), (typo, position)


def test_every_adjacent_transposition_is_rejected() -> None:
    for key in random_keys(RANDOM_KEYS):
        chars = list(compact(endpoint_id_from_public_key(key)))
        for position in range(len(chars) - 1):
            if chars[position] == chars[position + 1]:
                continue
            swapped = chars.copy()
            swapped[position], swapped[position + 1] = swapped[position + 1], swapped[position]
            assert not is_valid_id("".join(swapped)), (swapped, position)


def test_zero_and_z_swap_that_plain_luhn_misses_is_caught() -> None:
    # 0 and Z are the values 0 and 31: the one adjacent swap Luhn mod 32 alone cannot see.
    # Find real IDs containing "0Z" or "Z0" (including next to a check character) and swap them.
    found = 0
    rng = random.Random(31)
    while found < 20:
        chars = list(compact(endpoint_id_from_public_key(rng.randbytes(32))))
        for position in range(2, len(chars) - 1):
            if {chars[position], chars[position + 1]} == {"0", "Z"}:
                swapped = chars.copy()
                swapped[position], swapped[position + 1] = chars[position + 1], chars[position]
                assert not is_valid_id("".join(swapped))
                found += 1
    assert found >= 20


def test_parse_accepts_lowercase_aliases_dashes_and_spaces() -> None:
    endpoint_id = endpoint_id_from_public_key(RFC8032_PUBLIC_KEY)
    assert parse_id(endpoint_id.lower()) == endpoint_id
    assert parse_id(compact(endpoint_id)) == endpoint_id
    assert parse_id(" ".join(compact(endpoint_id))) == endpoint_id
    assert parse_id(f"  {endpoint_id}\n") == endpoint_id
    assert parse_id(endpoint_id.replace("-", "\u2013")) == endpoint_id  # en dash from chat apps
    assert parse_id("pp-47z3-3qx1-ajh6-2rkb-z1a0-8vyj-4w60") == endpoint_id


def test_parse_maps_crockford_aliases() -> None:
    for key in random_keys(100):
        endpoint_id = endpoint_id_from_public_key(key)
        if "0" not in endpoint_id or "1" not in endpoint_id:
            continue
        aliased = endpoint_id.replace("0", "O").replace("1", "i")
        assert parse_id(aliased) == endpoint_id
        assert parse_id(endpoint_id.replace("1", "L").replace("0", "o")) == endpoint_id


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "endpoint ID is empty"),
        (" - ", "endpoint ID is empty"),
        ("QQ47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-60", "must start with 'PP', not 'QQ'"),
        ("PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-6", "too short: 27 characters after PP, expected 28"),
        ("PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-60X", "too long: 29 characters after PP"),
        ("PP47-Z3UQ-X1AJ-H62R-KBZ1-A08V-YJ4W-60", "character 'U' at position 8 is not allowed"),
        ("PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-6!", "character '!' at position 37"),
        ("PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-61", "check characters do not match"),
        ("PP47-3Z3Q-X1AJ-H62R-KBZ1-A08V-YJ4W-60", "two neighbours are swapped"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(EndpointIdError, match=re.escape(message)):
        parse_id(text)
    assert not is_valid_id(text)


def test_endpoint_id_error_is_a_value_error() -> None:
    # Callers validating config may catch ValueError generally.
    with pytest.raises(ValueError, match="check characters"):
        parse_id("PP47-Z33Q-X1AJ-H62R-KBZ1-A08V-YJ4W-61")
