"""nft/reflector.nft is the table Reflector installs (reflector/firewall/ruleset.py), verbatim.

The file is for people: reading, review, `nft -f` by hand. The helper builds the table itself
through libnftables' JSON API. Each is loaded into a fresh network namespace of its own and
listed as JSON; with the kernel's handles removed, the two must be identical.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
LIST = "nft -j list table inet reflector"
# The helper's way, for the file's port range (the config's default).
APPLY_BATCH = (
    "from reflector.firewall.nft import NftFirewall;"
    "NftFirewall((5201, 5299)).ensure_table((5201, 5299))"
)


def in_fresh_netns(script: str) -> Any:
    done = subprocess.run(
        ["unshare", "--net", "--", "sh", "-c", script],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def without_handles(doc: Any) -> Any:
    if isinstance(doc, dict):
        return {k: without_handles(v) for k, v in doc.items() if k != "handle"}
    if isinstance(doc, list):
        return [without_handles(v) for v in doc]
    return doc


def test_the_file_is_the_table_reflector_installs(require_netns: None) -> None:
    from_file = in_fresh_netns(f"nft -f nft/reflector.nft && {LIST}")
    from_code = in_fresh_netns(f'{sys.executable} -c "{APPLY_BATCH}" && {LIST}')
    assert without_handles(from_file) == without_handles(from_code)
    kinds = [next(iter(item)) for item in from_file["nftables"]]
    assert kinds.count("set") == 2 and kinds.count("chain") == 2  # holes4/6, input/output
