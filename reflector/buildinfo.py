"""Version and build facts, shared by `--version`, GetPathMeta and /health."""

from __future__ import annotations

import platform
import sys

from reflector import __version__


def build_info() -> dict[str, str]:
    return {
        "version": __version__,
        "python": platform.python_version(),
        "platform": f"{platform.system().lower()}-{platform.machine()}",
        "frozen": "yes" if getattr(sys, "frozen", False) else "no",
    }
