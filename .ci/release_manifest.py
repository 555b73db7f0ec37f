#!/usr/bin/env python3
"""Write and sign the release manifest for built binaries (release tooling, spec §9.3).

    .venv/bin/python .ci/release_manifest.py --key ~/.minisign/reflector.key \
        dist/reflector-0.2.0-linux-amd64 dist/reflector-0.2.0-linux-arm64

writes `dist/reflector-<version>.json` and `dist/reflector-<version>.json.minisig`. Publish the
binaries and both files in one directory; hosts point `updates.manifest_url` (or `--manifest`)
at the manifest, or at a copy named e.g. `latest.json` (copy the `.minisig` with it).

Signing uses the real `minisign` tool, not our Python signer: the release key then stays in
minisign's own format, encrypted at rest with a password the tool prompts for, and the
signature is by definition what `minisign -V` checks. Our signer (reflector.update.minisign.sign)
exists for tests and is checked against the tool both ways.
"""

from __future__ import annotations

import argparse
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from reflector.update.manifest import Artifact, format_manifest, parse_version

_NAME_RE = re.compile(r"^reflector-(?P<version>[^-]+)-(?P<os>linux)-(?P<arch>amd64|arm64)$")


def describe(path: Path) -> tuple[str, Artifact]:
    match = _NAME_RE.match(path.name)
    if match is None:
        sys.exit(f"release-manifest: {path.name} is not reflector-<version>-linux-<amd64|arm64>")
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1024 * 1024):
            digest.update(chunk)
    art = Artifact(
        name=path.name,
        os=match["os"],
        arch=match["arch"],
        sha256=digest.hexdigest(),
        size=path.stat().st_size,
    )
    return match["version"], art


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--key", required=True, help="minisign secret key file")
    parser.add_argument("--out", type=Path, default=Path("dist"), help="output directory")
    parser.add_argument("binaries", nargs="+", type=Path)
    args = parser.parse_args()

    described = [describe(path) for path in args.binaries]
    versions = {version for version, _ in described}
    if len(versions) != 1:
        sys.exit(f"release-manifest: binaries of several versions: {sorted(versions)}")
    version = versions.pop()
    parse_version(version)
    manifest = args.out / f"reflector-{version}.json"
    manifest.write_bytes(format_manifest(version, [art for _, art in described]))

    minisign = shutil.which("minisign")
    if minisign is None:
        sys.exit("release-manifest: minisign is missing (apt-get install minisign)")
    subprocess.run(
        [
            minisign,
            "-S",
            "-s",
            args.key,
            "-m",
            str(manifest),
            "-t",
            f"reflector release {version} manifest {manifest.name}",
        ],
        check=True,
    )
    print(f"release-manifest: wrote {manifest} and {manifest}.minisig")


if __name__ == "__main__":
    main()
