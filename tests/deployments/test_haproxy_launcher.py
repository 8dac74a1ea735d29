"""`llmserve-haproxy`, the HAProxy the README's command hands to Serve (deployments/haproxy_launcher.py).

What it is for (a client that hangs up stops its generation behind HAProxy) is tested end to end by
tests/integration/test_reliability.py::test_a_sync_client_that_times_out_frees_its_slot, which runs
behind it.
"""

import os
import subprocess

from tests.serve_fixtures import launcher_path


def test_it_runs_the_bundled_haproxy_even_when_serve_names_the_launcher_itself():
    launcher = launcher_path()
    # Serve passes RAY_SERVE_HAPROXY_BINARY_PATH on to HAProxy's process: the launcher must not exec itself.
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": launcher}
    done = subprocess.run([launcher, "-vv"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HAProxy version 2.8."), done.stdout[:200]
