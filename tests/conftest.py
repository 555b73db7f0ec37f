"""Suite-wide settings: property tests draw the same examples on every run.

Hypothesis normally draws fresh random examples each run. In this suite, as in CI, it is
derandomized (the examples derive from each test's own name), so a red run comes from a change
and replays, never from a dice roll. `REFLECTOR_HYPOTHESIS=explore` draws fresh examples: the
mode for looking for new bugs, like `make fuzz` for atheris.
"""

from __future__ import annotations

import os

from hypothesis import settings

settings.register_profile("replayable", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(
    "explore" if os.environ.get("REFLECTOR_HYPOTHESIS") == "explore" else "replayable"
)
