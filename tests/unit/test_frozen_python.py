"""The single binary as its helper's interpreter: only the invocations the helper makes."""

from __future__ import annotations

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


def test_a_reflector_module_runs(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ended:
        run_python_argv(["-I", "-m", "reflector.engines.udp_echo", "--help"])
    assert ended.value.code == 0
    assert "--bind" in capsys.readouterr().out
