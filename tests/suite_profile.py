"""The test profile: `quick` (the default, what `.ci/run` runs) or `full` (`.ci/run --full`).

Every test module runs in both. Only example counts and durations differ (the schema fuzzer's cases
per operation, the soak's request count, how many tokens the real-model equality tests compare); the full
profile runs them at their full size and is run before resolving any issue that changes `engine/` or
`deployments/`.
"""

from __future__ import annotations

import os

PROFILE_ENV = "LLMSERVE_TEST_PROFILE"
IS_FULL = os.environ.get(PROFILE_ENV, "quick") == "full"


def sized(quick: int | float, full: int | float) -> int | float:
    """`quick` in the default profile, `full` in the full one."""
    return full if IS_FULL else quick
