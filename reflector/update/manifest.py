"""The release manifest: which binary a release is, and the decision whether to install it.

Pure: text in, a `Manifest` or `ManifestError` out; `decide` compares versions with no I/O.

A manifest is one small JSON document, signed as a whole with minisign (the signature covers
every byte, so parsing is strict rather than forgiving: unknown keys, duplicate keys and odd
types are refused, never ignored):

    {
      "format": "reflector-release/1",
      "version": "0.2.0",
      "artifacts": [
        {"name": "reflector-0.2.0-linux-amd64", "os": "linux", "arch": "amd64",
         "sha256": "<64 lower-case hex>", "size": 31457280}
      ]
    }

An artifact's name is exactly `reflector-<version>-<os>-<arch>`: a signed manifest for one
release can then never point a host at a file named for another release or architecture, and
the name is safe to resolve next to the manifest (no slashes).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from reflector.errors import ReflectorError

MANIFEST_FORMAT = "reflector-release/1"
# A manifest lists a handful of artifacts; 64 KiB is hundreds of them. Bounded before parsing.
MAX_MANIFEST_BYTES = 64 * 1024
# The binary is ~20-40 MB; five times that still fits a small VPS's disk and stops a manifest
# from making a host download without end.
MAX_ARTIFACT_BYTES = 256 * 1024 * 1024
# Linux amd64 and arm64 are the supported platforms (spec §10.1).
SUPPORTED_OS = frozenset({"linux"})
SUPPORTED_ARCH = frozenset({"amd64", "arm64"})
# `uname -m` names -> release names (Debian's and Go's).
MACHINE_TO_ARCH = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}

_NUM = r"(0|[1-9]\d{0,5})"
_VERSION_RE = re.compile(rf"^{_NUM}\.{_NUM}\.{_NUM}(?:(a|b|rc){_NUM})?$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_TOP_KEYS = frozenset({"format", "version", "artifacts"})
_ARTIFACT_KEYS = frozenset({"name", "os", "arch", "sha256", "size"})
# PEP 440 order of pre-releases; a final release sorts after all of them.
_PRE_RANK = {"a": 0, "b": 1, "rc": 2}
_FINAL_RANK = 3


# How many unknown keys an error names (a hostile manifest may have thousands).
_SHOWN_UNKNOWN_KEYS = 5


class ManifestError(ReflectorError):
    """The manifest is malformed, or has nothing for this host."""


@dataclass(frozen=True, order=True)
class Version:
    """A release version `X.Y.Z` with an optional `aN`/`bN`/`rcN`, ordered as PEP 440 does."""

    key: tuple[int, int, int, int, int]
    text: str

    def __str__(self) -> str:
        return self.text


def parse_version(text: str) -> Version:
    match = _VERSION_RE.match(text)
    if match is None:
        raise ManifestError(f"version {text!r} is not X.Y.Z (optionally with aN, bN or rcN)")
    major, minor, patch, pre, pre_n = match.groups()
    rank = _PRE_RANK[pre] if pre else _FINAL_RANK
    return Version(key=(int(major), int(minor), int(patch), rank, int(pre_n or 0)), text=text)


@dataclass(frozen=True, kw_only=True)
class Artifact:
    """One binary of a release."""

    name: str
    os: str
    arch: str
    sha256: str
    size: int


@dataclass(frozen=True, kw_only=True)
class Manifest:
    version: Version
    artifacts: tuple[Artifact, ...]

    def artifact_for(self, os_name: str, arch: str) -> Artifact:
        for artifact in self.artifacts:
            if artifact.os == os_name and artifact.arch == arch:
                return artifact
        have = ", ".join(f"{a.os}-{a.arch}" for a in self.artifacts)
        raise ManifestError(f"release {self.version} has no {os_name}-{arch} binary (has: {have})")


def artifact_name(version: str, os_name: str, arch: str) -> str:
    return f"reflector-{version}-{os_name}-{arch}"


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ManifestError(f"manifest repeats the key {key!r}")
        result[key] = value
    return result


def _exact_keys(obj: Any, keys: frozenset[str], what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ManifestError(f"{what} must be a JSON object")
    missing, unknown = keys - obj.keys(), obj.keys() - keys
    if missing:
        raise ManifestError(f"{what} lacks {', '.join(sorted(missing))}")
    if unknown:
        # Quoted: the names come from the file, and one holding a control character must not
        # break the error onto several lines (found by fuzzing). A few suffice to fix a typo.
        shown = ", ".join(repr(k) for k in sorted(unknown)[:_SHOWN_UNKNOWN_KEYS])
        more = len(unknown) - _SHOWN_UNKNOWN_KEYS
        raise ManifestError(
            f"{what} has unknown keys {shown}{f' and {more} more' if more > 0 else ''}"
        )
    return obj


def _string(obj: dict[str, Any], key: str, what: str) -> str:
    value = obj[key]
    if not isinstance(value, str):
        raise ManifestError(f"{what} {key} must be a string")
    return value


def _parse_artifact(obj: Any, version: str, index: int) -> Artifact:
    what = f"artifacts[{index}]"
    fields = _exact_keys(obj, _ARTIFACT_KEYS, what)
    os_name, arch = _string(fields, "os", what), _string(fields, "arch", what)
    if os_name not in SUPPORTED_OS:
        raise ManifestError(f"{what} os {os_name!r} is not one of {sorted(SUPPORTED_OS)}")
    if arch not in SUPPORTED_ARCH:
        raise ManifestError(f"{what} arch {arch!r} is not one of {sorted(SUPPORTED_ARCH)}")
    name = _string(fields, "name", what)
    if name != artifact_name(version, os_name, arch):
        raise ManifestError(
            f"{what} name {name!r} is not {artifact_name(version, os_name, arch)!r}"
        )
    digest = _string(fields, "sha256", what)
    if not _SHA256_RE.match(digest):
        raise ManifestError(f"{what} sha256 must be 64 lower-case hex digits")
    size = fields["size"]
    if type(size) is not int or not 0 < size <= MAX_ARTIFACT_BYTES:
        raise ManifestError(f"{what} size must be an integer in 1..{MAX_ARTIFACT_BYTES}")
    return Artifact(name=name, os=os_name, arch=arch, sha256=digest, size=size)


def parse_manifest(data: bytes) -> Manifest:
    """Strictly parse manifest bytes (verify their signature first: see selfupdate)."""
    if len(data) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"manifest is {len(data)} bytes, more than {MAX_MANIFEST_BYTES}")
    try:
        obj = json.loads(data.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ManifestError(f"manifest is not JSON: {exc}") from exc
    except (RecursionError, ValueError):  # absurd nesting, over-long integer literals
        raise ManifestError("manifest is JSON beyond any real manifest's shape") from None
    top = _exact_keys(obj, _TOP_KEYS, "manifest")
    if top["format"] != MANIFEST_FORMAT:
        raise ManifestError(f"manifest format {top['format']!r} is not {MANIFEST_FORMAT!r}")
    version_text = _string(top, "version", "manifest")
    version = parse_version(version_text)
    items = top["artifacts"]
    if not isinstance(items, list) or not items:
        raise ManifestError("manifest artifacts must be a non-empty list")
    artifacts = tuple(_parse_artifact(item, version_text, i) for i, item in enumerate(items))
    platforms = [(a.os, a.arch) for a in artifacts]
    if len(set(platforms)) != len(platforms):
        raise ManifestError("manifest lists the same platform twice")
    return Manifest(version=version, artifacts=artifacts)


def format_manifest(version: str, artifacts: list[Artifact]) -> bytes:
    """The canonical manifest bytes (what release tooling signs); round-trips `parse_manifest`."""
    doc = {
        "format": MANIFEST_FORMAT,
        "version": version,
        "artifacts": [
            {"name": a.name, "os": a.os, "arch": a.arch, "sha256": a.sha256, "size": a.size}
            for a in artifacts
        ],
    }
    data = (json.dumps(doc, indent=2) + "\n").encode()
    parse_manifest(data)  # never sign what we would refuse to install
    return data


class Action(StrEnum):
    INSTALL = "install"
    UP_TO_DATE = "up-to-date"
    DOWNGRADE_REFUSED = "downgrade-refused"


@dataclass(frozen=True, kw_only=True)
class Decision:
    action: Action
    current: Version
    offered: Version
    reason: str


def decide(current: Version, offered: Version, *, force: bool) -> Decision:
    """Install only a newer release, unless forced: an old signed manifest stays validly signed
    forever, so replaying it must not roll a host back to a release with known bugs."""
    if offered > current:
        action, reason = Action.INSTALL, f"{offered} is newer than {current}"
    elif force:
        action, reason = Action.INSTALL, f"forced: {offered} replaces {current}"
    elif offered == current:
        action, reason = Action.UP_TO_DATE, f"{current} is already the offered release"
    else:
        action = Action.DOWNGRADE_REFUSED
        reason = f"refusing to downgrade from {current} to {offered} (use --force to allow)"
    return Decision(action=action, current=current, offered=offered, reason=reason)
