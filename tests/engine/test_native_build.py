"""`python -m engine.native_build`: every kernel in every variant this CPU runs, built with the standard
library alone (.ci/run runs it before the install, beside pip)."""

import os
import subprocess
import sys
from pathlib import Path

from engine import native_build

REPO_ROOT = Path(__file__).resolve().parents[2]


def test_every_kernel_has_its_flags_in_the_table():
    sources = {path.stem for path in native_build.SOURCE_DIR.glob("*.c")}
    assert sources == set(native_build.KERNEL_FLAGS)


def test_the_prebuild_needs_no_installed_package_and_builds_what_the_engine_loads():
    # -S: no site-packages (neither torch nor anything pip installed); -m puts the repository on the path
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [sys.executable, "-S", "-m", "engine.native_build"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    num_builds = len(native_build.KERNEL_FLAGS) * len(native_build.runnable_variants())
    assert f"{num_builds} of {num_builds} kernel builds" in run.stdout
    built = set(native_build.kernel_dir().iterdir())
    for variant in native_build.runnable_variants():  # what the engine builds is already there
        for name, flags in native_build.KERNEL_FLAGS.items():
            assert native_build.ensure_built(name, flags, variant) in built
