"""The single binary as its helper's interpreter: only the invocations the helper makes."""

from __future__ import annotations

import subprocess
import sys

import pytest

from reflector.frozen_python import USAGE_EXIT, run_python_argv


@pytest.mark.parametrize(
    "argv",
    [
        ["-c", "print('anything')"],
        ["-I", "-c", "import os; os.system('id')"],
        ["-m", "http.server"],
        ["-m"],
        ["script.py"],
    ],
)
def test_anything_but_the_helpers_own_invocations_is_refused(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as ended:
        run_python_argv(argv)
    assert ended.value.code == USAGE_EXIT
    captured = capsys.readouterr()
    assert "not a supported interpreter invocation" in captured.err
    assert "anything" not in captured.out


def test_a_reflector_module_runs() -> None:
    """In a fresh interpreter, as the helper's engine runs (runpy wants it not yet imported)."""
    code = (
        "from reflector.frozen_python import run_python_argv;"
        "run_python_argv(['-I', '-m', 'reflector.engines.udp_echo', '--help'])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "--bind" in done.stdout
