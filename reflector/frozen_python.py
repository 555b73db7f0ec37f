"""The single binary as the Python interpreter of its own engines (see reflector/__main__.py).

Only what the helper uses: `-I` (ignored: a frozen runtime reads no PYTHON* variables and no user
site), `-c PROBE_SCRIPT PORT` (the helper's one probe, matched exactly) and
`-m reflector.MODULE ARGS...`. Anything else is refused: the binary is not a general
interpreter, so `reflector -c 'arbitrary code'` does not run.
"""

from __future__ import annotations

import runpy
import sys
from typing import NoReturn

from reflector.privsep.scope import PROBE_SCRIPT

# Exit status for a malformed invocation, as Python's own for a usage error.
USAGE_EXIT = 2


def run_python_argv(args: list[str]) -> NoReturn:
    """Run `args` (the argv after the program name) the way `python` would, then exit."""
    rest = args[1:] if args[:1] == ["-I"] else args
    if len(rest) >= 2 and rest[0] == "-c" and rest[1] == PROBE_SCRIPT:
        sys.argv = ["-c", *rest[2:]]
        exec(compile(rest[1], "<string>", "exec"), {"__name__": "__main__"})  # noqa: S102
        sys.exit(0)
    if len(rest) >= 2 and rest[0] == "-m" and rest[1].startswith("reflector."):
        sys.argv = [rest[1], *rest[2:]]
        runpy.run_module(rest[1], run_name="__main__", alter_sys=True)
        sys.exit(0)
    print(f"reflector: not a supported interpreter invocation: {args[:2]}", file=sys.stderr)
    sys.exit(USAGE_EXIT)
