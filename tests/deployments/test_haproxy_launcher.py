"""`llmserve-haproxy`, the HAProxy the README's command hands to Serve (deployments/haproxy_launcher.py).

What it is for (a client that hangs up stops its generation behind HAProxy) is tested end to end by
tests/integration/test_reliability.py::test_a_sync_client_that_times_out_frees_its_slot, which runs
behind it.
"""

import os
import subprocess

import pytest

from deployments.haproxy_launcher import serve_env_warning
from tests.serve_fixtures import launcher_path


def test_it_runs_the_bundled_haproxy_even_when_serve_names_the_launcher_itself():
    launcher = launcher_path()
    # Serve passes RAY_SERVE_HAPROXY_BINARY_PATH on to HAProxy's process: the launcher must not exec itself.
    env = {**os.environ, "RAY_SERVE_HAPROXY_BINARY_PATH": launcher}
    done = subprocess.run([launcher, "-vv"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HAProxy version 2.8."), done.stdout[:200]


HA = {"RAY_SERVE_ENABLE_HA_PROXY": "1"}


@pytest.mark.parametrize(
    ("environ", "warns"),
    [
        ({}, False),  # Serve's Python proxy
        ({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, False),
        ({**HA, "RAY_SERVE_HAPROXY_BINARY_PATH": "/venv/bin/llmserve-haproxy"}, False),
        (HA, True),  # the wheel's binary: splicing on
        ({**HA, "RAY_SERVE_HAPROXY_BINARY_PATH": ""}, True),  # `command -v llmserve-haproxy` found none
        ({**HA, "RAY_SERVE_HAPROXY_BINARY_PATH": "/usr/sbin/haproxy"}, True),
    ],
)
def test_the_ingress_warns_when_haproxy_would_splice(environ: dict[str, str], warns: bool):
    warning = serve_env_warning(environ)
    assert (warning is not None) == warns
    if warns:
        assert "llmserve-haproxy" in warning and "sync completion" in warning
