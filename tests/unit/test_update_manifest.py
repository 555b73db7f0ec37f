"""The release manifest: strict parsing of what is signed, and the install/downgrade decision."""

from __future__ import annotations

import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reflector.update.manifest import (
    MAX_ARTIFACT_BYTES,
    MAX_MANIFEST_BYTES,
    Action,
    Artifact,
    ManifestError,
    artifact_name,
    decide,
    format_manifest,
    parse_manifest,
    parse_version,
)

DIGEST = "ab" * 32


def artifact(version: str = "0.2.0", arch: str = "amd64", **changes: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": artifact_name(version, "linux", arch),
        "os": "linux",
        "arch": arch,
        "sha256": DIGEST,
        "size": 1234,
    }
    doc.update(changes)
    return doc


def manifest(**changes: Any) -> bytes:
    doc: dict[str, Any] = {
        "format": "reflector-release/1",
        "version": "0.2.0",
        "artifacts": [artifact(), artifact(arch="arm64")],
    }
    doc.update(changes)
    return json.dumps(doc).encode()


def test_a_manifest_names_one_binary_per_platform() -> None:
    parsed = parse_manifest(manifest())
    assert str(parsed.version) == "0.2.0"
    arm = parsed.artifact_for("linux", "arm64")
    assert (arm.name, arm.sha256, arm.size) == ("reflector-0.2.0-linux-arm64", DIGEST, 1234)


def test_a_platform_without_a_binary_is_refused_by_name() -> None:
    parsed = parse_manifest(manifest(artifacts=[artifact()]))
    with pytest.raises(ManifestError, match=r"no linux-arm64 binary .has: linux-amd64"):
        parsed.artifact_for("linux", "arm64")


def test_format_manifest_round_trips() -> None:
    arts = [
        Artifact(
            name="reflector-1.0.0rc1-linux-amd64", os="linux", arch="amd64", sha256=DIGEST, size=7
        )
    ]
    parsed = parse_manifest(format_manifest("1.0.0rc1", arts))
    assert parsed.artifacts == tuple(arts)
    assert str(parsed.version) == "1.0.0rc1"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff", "not JSON"),
        (b"[]", "must be a JSON object"),
        (b'{"format": "x", "format": "y"}', "repeats the key 'format'"),
        (manifest(format="reflector-release/2"), "format 'reflector-release/2'"),
        (manifest(extra=1), "unknown keys 'extra'"),
        (manifest(version=2), "version must be a string"),
        (manifest(version="v0.2"), "is not X.Y.Z"),
        (manifest(artifacts=[]), "non-empty list"),
        (manifest(artifacts=[artifact(), artifact()]), "same platform twice"),
        (manifest(artifacts=[artifact(size=True)]), "size must be an integer"),
        (manifest(artifacts=[artifact(size=0)]), "size must be an integer"),
        (manifest(artifacts=[artifact(size=MAX_ARTIFACT_BYTES + 1)]), "size must be"),
        (manifest(artifacts=[artifact(sha256=DIGEST.upper())]), "lower-case hex"),
        (manifest(artifacts=[artifact(arch="riscv64")]), "arch 'riscv64'"),
        (manifest(artifacts=[artifact(os="darwin")]), "os 'darwin'"),
        (manifest(artifacts=[artifact(name="../../bin/sh")]), "name '../../bin/sh' is not"),
        # A binary named for another release cannot ride along in this one's manifest.
        (manifest(artifacts=[artifact(version="0.1.0")]), "reflector-0.1.0-linux-amd64"),
        (manifest(artifacts=[{"name": "x"}]), "lacks arch, os, sha256, size"),
    ],
)
def test_malformed_manifests_are_refused_with_the_reason(data: bytes, reason: str) -> None:
    with pytest.raises(ManifestError, match=reason):
        parse_manifest(data)


def test_oversized_manifest_is_refused_before_parsing() -> None:
    with pytest.raises(ManifestError, match="more than"):
        parse_manifest(b" " * (MAX_MANIFEST_BYTES + 1))


@pytest.mark.parametrize(
    "ordered",
    [
        [
            "0.1.0",
            "0.1.1",
            "0.2.0",
            "0.10.0",
            "1.0.0a1",
            "1.0.0a2",
            "1.0.0b1",
            "1.0.0rc1",
            "1.0.0rc10",
            "1.0.0",
            "1.0.1",
        ],
    ],
)
def test_versions_order_as_pep440_releases(ordered: list[str]) -> None:
    versions = [parse_version(v) for v in ordered]
    assert versions == sorted(versions)
    assert len({v.key for v in versions}) == len(versions)


@pytest.mark.parametrize("bad", ["1", "1.0", "01.0.0", "1.0.0-rc1", "1.0.0.post1", " 1.0.0", ""])
def test_loose_versions_are_refused(bad: str) -> None:
    with pytest.raises(ManifestError, match=r"is not X.Y.Z"):
        parse_version(bad)


def test_newer_release_is_installed() -> None:
    d = decide(parse_version("0.1.0"), parse_version("0.2.0"), force=False)
    assert d.action is Action.INSTALL


def test_same_release_is_up_to_date_unless_forced() -> None:
    v = parse_version("0.2.0")
    assert decide(v, v, force=False).action is Action.UP_TO_DATE
    assert decide(v, v, force=True).action is Action.INSTALL


def test_replayed_older_manifest_is_a_refused_downgrade_unless_forced() -> None:
    d = decide(parse_version("0.2.0"), parse_version("0.1.0"), force=False)
    assert d.action is Action.DOWNGRADE_REFUSED
    assert d.reason == "refusing to downgrade from 0.2.0 to 0.1.0 (use --force to allow)"
    assert decide(parse_version("0.2.0"), parse_version("0.1.0"), force=True).action is (
        Action.INSTALL
    )


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_raise_only_manifest_error(data: bytes) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(data)


@settings(max_examples=150, deadline=None)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=8),
        lambda inner: (
            st.lists(inner, max_size=3)
            | st.dictionaries(
                st.sampled_from(
                    ["format", "version", "artifacts", "name", "os", "arch", "sha256", "size"]
                ),
                inner,
                max_size=5,
            )
        ),
        max_leaves=12,
    )
)
def test_random_json_raises_only_manifest_error(doc: Any) -> None:
    with contextlib.suppress(ManifestError):
        parse_manifest(json.dumps(doc).encode())
