"""The bounded fuzzing CI runs: hostile input gets only the parser's own error type.

Every target in targets.py is fed, here, (1) its seeds, (2) random bytes, (3) mutated seeds
and, for parsers of JSON, (4) valid documents with one field replaced by an arbitrary JSON
value or removed, all with hypothesis; (5) a fixed list of hostile shapes (deep nesting,
4301-digit numbers, NaN, lone surrogates, duplicate keys, maximal length headers); and
(6) a bounded coverage-guided atheris run per target, in child processes, so that a crash fails
the test and leaves its reproducer in test-artifacts/fuzz/<target>/crashes/. `make fuzz` runs
the same atheris targets for longer.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reflector.link.frames import ErrorCode, RemoteProtocolError, encode_frame

from . import run_atheris
from . import targets as targets_module
from .targets import FIXED_BUGS, SELFTEST_TARGETS, TARGETS, KnownBug, Target, set_strict

# Per target and strategy: enough to pass every branch the seeds open, while the whole
# hypothesis part stays around half a minute. No example database: nothing is left behind.
EXAMPLES: Final = 120
FUZZ: Final = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
# Each atheris run: long enough for thousands to hundreds of thousands of inputs per target
# (they run at 1k-900k per second), short enough that all of them, two at a time, take about
# two minutes. REFLECTOR_FUZZ_SECONDS raises it for a deeper look without `make fuzz`.
ATHERIS_SECONDS: Final = int(os.environ.get("REFLECTOR_FUZZ_SECONDS", "15"))
# CI fuzzes with one fixed seed: the same inputs in the same order every run, so a red CI comes
# from a change, not from a dice roll, and replays. `make fuzz` (random seeds, longer) explores.
ATHERIS_SEED: Final = int(os.environ.get("REFLECTOR_FUZZ_SEED", "20261201"))
# Two children at a time: the CI machine has two cores and nothing else runs meanwhile.
ATHERIS_JOBS: Final = 2
# A run that executed fewer inputs than this did not really fuzz (e.g. it failed to start).
MIN_EXECUTIONS: Final = 1000
ARTIFACTS: Final = run_atheris.DEFAULT_ARTIFACTS

JSON_TARGETS: Final = [name for name, t in TARGETS.items() if t.from_json is not None]


@pytest.fixture(autouse=True)
def tolerant_of_known_bugs() -> Iterator[None]:
    """The default: known bugs are tolerated; a test that wants strictness asks for it."""
    set_strict(False)
    yield
    set_strict(False)


# --------------------------------------------------------------------------------------------
# Strategies
# --------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=24),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=10,
)

_edits = st.lists(
    st.tuples(
        st.sampled_from(("flip", "insert", "delete", "truncate", "repeat")),
        st.integers(min_value=0, max_value=2**16),
        st.binary(min_size=1, max_size=8),
    ),
    max_size=6,
)


def mutate(seed: bytes, edits: list[tuple[str, int, bytes]]) -> bytes:
    """A byte string a few libFuzzer-style edits away from `seed`."""
    data = bytearray(seed)
    for kind, where, blob in edits:
        at = where % (len(data) + 1)
        if kind == "flip" and at < len(data):
            data[at] ^= blob[0] or 1
        elif kind == "insert":
            data[at:at] = blob
        elif kind == "delete":
            del data[at : at + len(blob)]
        elif kind == "truncate":
            del data[at:]
        elif kind == "repeat":
            data[at:at] = blob * (where % 64)
    return bytes(data)


def _dicts_in(doc: Any) -> list[dict[str, Any]]:
    if isinstance(doc, dict):
        return [doc, *(d for v in doc.values() for d in _dicts_in(v))]
    if isinstance(doc, list):
        return [d for v in doc for d in _dicts_in(v)]
    return []


def mutate_document(
    doc: dict[str, Any], pick: int, key: str | None, value: Any, remove: bool
) -> dict[str, Any]:
    """`doc` with one of its objects given `value` at `key` (an existing key if None), or with
    that key removed: wrong types, unknown and missing fields, out-of-range values."""
    copy: dict[str, Any] = json.loads(json.dumps(doc))
    nodes = _dicts_in(copy)
    node = nodes[pick % len(nodes)]
    if key is None:
        if not node:
            return copy
        key = sorted(node)[pick % len(node)]
    if remove:
        node.pop(key, None)
    else:
        node[key] = value
    return copy


def _documents(target: Target) -> st.SearchStrategy[bytes]:
    assert target.documents is not None and target.from_json is not None
    convert = target.from_json
    return st.builds(
        lambda doc, pick, key, value, remove: convert(
            json.dumps(mutate_document(doc, pick, key, value, remove))
        ),
        st.sampled_from(target.documents()),
        st.integers(min_value=0, max_value=1000),
        st.none() | st.sampled_from(("type", "request_id", "token", "x")) | st.text(max_size=8),
        json_values,
        st.booleans(),
    )


# --------------------------------------------------------------------------------------------
# Seeds, random bytes, mutations, documents
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TARGETS)
def test_every_seed_passes_every_check_strictly(name: str) -> None:
    """The seeds are valid inputs, and none of them needs a known bug to be tolerated."""
    set_strict(True)
    target = TARGETS[name]
    assert target.seeds()
    for seed in target.seeds():
        assert len(seed) <= target.max_len
        target(seed)


@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(data=st.binary(max_size=600))
def test_random_bytes_get_only_the_parsers_own_error(name: str, data: bytes) -> None:
    TARGETS[name](data)


@pytest.mark.parametrize("name", TARGETS)
@FUZZ
@given(choice=st.data(), edits=_edits)
def test_mutated_seeds_get_only_the_parsers_own_error(
    name: str, choice: st.DataObject, edits: list[tuple[str, int, bytes]]
) -> None:
    target = TARGETS[name]
    seed = choice.draw(st.sampled_from(target.seeds()))
    target(mutate(seed, edits))


@pytest.mark.parametrize("name", JSON_TARGETS)
@FUZZ
@given(choice=st.data())
def test_documents_with_a_wrong_field_get_only_the_parsers_own_error(
    name: str, choice: st.DataObject
) -> None:
    target = TARGETS[name]
    target(choice.draw(_documents(target)))


# --------------------------------------------------------------------------------------------
# Hostile shapes: the inputs random generation is unlikely to reach
# --------------------------------------------------------------------------------------------

DEPTH: Final = 3000
# One more digit than Python's int() accepts from a string.
DIGITS: Final = 4301

HOSTILE_JSON_VALUES: Final = {
    "deep_arrays": "[" * DEPTH + "]" * DEPTH,
    "deep_objects": '{"a":' * DEPTH + "1" + "}" * DEPTH,
    "long_number": "9" * DIGITS,
    "long_negative_float": "-" + "9" * DIGITS + ".5e-7",
    "huge_exponent": "1e999999",
    "nan": "NaN",
    "minus_infinity": "-Infinity",
    "lone_surrogate": '"\\ud800"',
    "nul_escape": '"a\\u0000b"',
    "long_string": '"' + "x" * 5000 + '"',
    "big_int": str(2**64),
    "negative": "-1",
    "bool": "true",
    "null": "null",
}
_PLACEHOLDER: Final = "\u0000fuzz-placeholder\u0000"


def _with_raw_value(doc: dict[str, Any], key: str, raw: str) -> str:
    """`doc` as JSON text with `key`'s value replaced by the raw JSON text `raw`."""
    text = json.dumps({**doc, key: _PLACEHOLDER})
    return text.replace(json.dumps(_PLACEHOLDER), raw, 1)


def _signed_echo_record(source: int, size: int) -> bytes:
    """A udp_echo record (see targets._datagrams) signed with session A's key."""
    return bytes([0x04 | source]) + size.to_bytes(2, "big") + bytes(size)


# Per target, the hostile inputs of its own language that random bytes seldom hit.
HOSTILE_BY_TARGET: Final[dict[str, list[bytes]]] = {
    "config": [
        b"a = " + b"[" * DEPTH + b"]" * DEPTH,
        b"a = " + b"{b=" * DEPTH + b"1" + b"}" * DEPTH,
        b"[quotas]\ncooldown_sec = " + b"9" * DIGITS,
        b"[quotas]\ncooldown_sec = 1e999",
        b"[quotas]\ncooldown_sec = nan",
        b"[quotas]\ncooldown_sec = -1",
        b"[quotas]\ncooldown_sec = true",
        b"[quotas]\ncooldown_sec = '5'",
        b"[quotas]\ncooldown_sec = 5.0",
        b"[quotas]\ncooldown_sec = 1979-05-27T07:32:00Z",
        b'[quotas]\ntimezone = "../../../../etc/passwd"',
        b'[quotas]\ntimezone = "' + b"A" * 5000 + b'"',
        b'[quotas]\nheavy_tests_window = "25:00-26:00"',
        b'[network]\nlisten_address = ["0.0.0.0:99999"]',
        b'[network]\nlisten_address = ["[::1%eth0]:4000", "1.2.3.4:\xd9\xa1"]',
        b"[network]\nlisten_address = []",
        b'[access]\nauthorized_peers = ["PP' + b"0" * 28 + b'"]',
        b"[access]\nauthorized_peers = [" + b'"x",' * 5000 + b"]",
        b'[identity]\nprivate_key_path = "/etc/identity.ed25519"',
        b'[limits]\nmemory_max = "99999999999G"',
        b'[privsep]\nengine_user = "root; rm -rf /"',
        b"[quotas]\n[quotas]\n",
        b"\xef\xbb\xbf[quotas]\n",
    ],
    "endpoint_id": [
        "PP\u200b".encode() + b"0" * 28,  # zero-width space
        "\u202ePP".encode() + b"0" * 28,  # right-to-left override
        b"PP" + b"\x00" * 28,
        b"PP" + b"U" * 28,
        b"P" * 100_000,
        b"-" * 100_000,
        "PP\u00df".encode() + b"0" * 26,  # sharp s: upper() makes it "SS"
    ],
    "stamp": [bytes([flag]) + bytes(size) for flag in (0, 1) for size in (111, 112, 1472, 1473)],
    "udp_echo": [
        b"".join(_signed_echo_record(0, size) for size in (111, 112, 1472, 1473, 2047)),
        _signed_echo_record(2, 112) * 20,  # spoofed source with a valid HMAC
        _signed_echo_record(0, 112) * 64,  # a burst far beyond the rate
    ],
    "health_http": [
        b"GET /health HTTP/1.1\nHost: a\n\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\n folded\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost : a\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: \xff\r\n\r\n",
        b"GET  /health HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET http://a/health HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /health HTTP/2.0\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: a\r\nX: " + b"a" * 8000 + b"\r\n\r\n",
        b"\r\n\r\n",
    ],
    "minisign": [
        b"m\0untrusted comment: " + b"c" * 5000 + b"\n\0",
        b"m\0untrusted comment: x\n" + b"A" * 100 + b"\ntrusted comment: t\n" + b"=" * 88,
        b"m\0\0untrusted comment: x\nRWQ" + b"/" * 53,
    ],
}


def _hostile_inputs(target: Target) -> Iterator[bytes]:
    yield from HOSTILE_BY_TARGET.get(target.name, [])
    yield from (raw.encode() for raw in HOSTILE_JSON_VALUES.values())
    yield b'{"type":"hello","type":"pair"}'  # duplicate keys
    yield b"\xff\xfe\xfd" + b"\x00" * 64  # not UTF-8
    yield b"\xff\xff\xff\xff"  # the largest length a header can announce
    yield b"\x00\x00\x00\x00"  # zero-length frame
    yield b"\x0f\xff\xff\xff\xff"  # after a flags byte
    if target.documents is None or target.from_json is None:
        return
    for doc in target.documents():
        for key in doc:
            for raw in HOSTILE_JSON_VALUES.values():
                yield target.from_json(_with_raw_value(doc, key, raw))


@pytest.mark.parametrize("name", TARGETS)
def test_hostile_shapes_get_only_the_parsers_own_error(name: str) -> None:
    target = TARGETS[name]
    for data in _hostile_inputs(target):
        target(data)


# --------------------------------------------------------------------------------------------
# Known bugs: still there (else their entry goes), and tolerated only by name
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bug", FIXED_BUGS, ids=lambda b: f"{b.target}-{b.exception.__name__}")
def test_every_crash_the_fuzzers_found_stays_fixed(bug: KnownBug) -> None:
    """Each input once crashed its target (see `where`); now it gets the module's own error."""
    set_strict(True)
    try:
        TARGETS[bug.target](bug.reproducer)
    finally:
        set_strict(False)


def test_a_known_bug_of_one_target_is_not_tolerated_in_another() -> None:
    recursion = KnownBug(
        target="config",
        where="(synthetic)",
        summary="a crash tolerated for one target only",
        reproducer=b"[" * 10,
        exception=RecursionError,
        message_part="recursion",
    )

    def crashes(data: bytes) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    innocent = Target(name="link_server", check=crashes, seeds=list)
    assert recursion.target != innocent.name
    with pytest.raises(RecursionError):
        innocent(recursion.reproducer)


# --------------------------------------------------------------------------------------------
# The harness's own checks: no false alarm, no missed leak
# --------------------------------------------------------------------------------------------

# What CI's atheris run sent on 2026-11-30: the token spells "tunnel_open", a word of the
# refusal's own text, and the old check took that for a leak.
TOKEN_SPELLS_A_TEMPLATE_WORD: Final = (
    b'\x00\x00\x00S{"type":"tunnel______________________________","token":"tunnel_open",'
    b'"skEn":"?HVl"}'
)


def test_a_token_that_spells_a_word_of_the_refusal_is_no_leak() -> None:
    set_strict(True)
    try:
        TARGETS["tunnel"](TOKEN_SPELLS_A_TEMPLATE_WORD)
    finally:
        set_strict(False)


@pytest.mark.parametrize("token", ["dG9rZW4tc2VjcmV0", "is not valid"])
def test_a_refusal_that_quotes_the_token_fails_the_tunnel_target(
    monkeypatch: pytest.MonkeyPatch, token: str
) -> None:
    """Also when the token spells a template word: then the swapped-in marker gives it away."""

    def leaky_parse(payload: bytes) -> object:
        try:
            claimed = json.loads(payload)["token"]
        except (ValueError, KeyError, TypeError) as exc:
            raise RemoteProtocolError(ErrorCode.BAD_JSON, "not a tunnel_open") from exc
        raise RemoteProtocolError(ErrorCode.BAD_FIELD, f"token: {claimed!r} is not valid")

    monkeypatch.setattr(targets_module, "parse_tunnel_open", leaky_parse)
    leak = {"type": "tunnel_open", "session_id": "s_1", "token": token}
    with pytest.raises(AssertionError, match="quoted the token"):
        TARGETS["tunnel"](encode_frame(leak))


# --------------------------------------------------------------------------------------------
# Coverage-guided: atheris, bounded
# --------------------------------------------------------------------------------------------


def _require_atheris() -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.fail("atheris is not installed: it is in the dev extra (make deps installs it)")


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_every_target_survives_a_bounded_atheris_run() -> None:
    _require_atheris()
    outcomes = run_atheris.run_targets(
        list(TARGETS),
        artifacts=ARTIFACTS,
        seconds=ATHERIS_SECONDS,
        runs=None,
        jobs=ATHERIS_JOBS,
        seed=ATHERIS_SEED,
    )
    report = run_atheris.format_report(outcomes)
    print(report)
    assert not any(o.crashed for o in outcomes), f"reproducers saved:\n{report}"
    starved = [o.target for o in outcomes if (o.executions or 0) < MIN_EXECUTIONS]
    assert not starved, f"these targets hardly ran:\n{report}"


@pytest.mark.slow
def test_a_crash_fails_the_run_and_leaves_a_reproducer_that_replays(tmp_path: Path) -> None:
    _require_atheris()
    name = next(iter(SELFTEST_TARGETS))
    (outcome,) = run_atheris.run_targets([name], artifacts=tmp_path, seconds=30, runs=None)
    assert outcome.crashed
    assert "the fuzz harness self-test crashed on purpose" in outcome.output_tail
    (reproducer,) = outcome.reproducers
    assert reproducer.parent == tmp_path / name / "crashes"
    assert reproducer.read_bytes().startswith(b"CRASH")
    replay = subprocess.run(
        [sys.executable, run_atheris.__file__, "--target", name, "--reproduce", str(reproducer)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert replay.returncode != 0
    assert "crashed on purpose" in replay.stderr
