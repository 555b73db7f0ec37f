"""Signed releases and self-update (spec §9.3).

`minisign` and `manifest` are pure (formats and decisions); `selfupdate` is the I/O shell that
fetches, verifies and swaps the binary; `cli` is the `reflector self-update` command.
"""

from reflector.update.manifest import Artifact, Manifest, ManifestError, parse_manifest
from reflector.update.minisign import SignatureError, verify_text
from reflector.update.selfupdate import UpdateError

__all__ = [
    "Artifact",
    "Manifest",
    "ManifestError",
    "SignatureError",
    "UpdateError",
    "parse_manifest",
    "verify_text",
]
