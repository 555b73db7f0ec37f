"""`make demo` stays true: the demo module runs end to end and cleans up after itself."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_the_demo_runs_end_to_end_and_leaves_nothing_behind() -> None:
    before = set(Path(tempfile.gettempdir()).glob("reflector-demo-*"))
    done = subprocess.run(
        [sys.executable, "-m", "reflector.demo"],
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "paired" in out
    assert "probes: sent 150  received 150" in out
    assert "mode tunneled" in out
    assert "latency increase under load" in out
    assert "audit trail:" in out and ": ok," in out
    assert set(Path(tempfile.gettempdir()).glob("reflector-demo-*")) == before
