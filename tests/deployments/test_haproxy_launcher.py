"""`llmserve-haproxy`, the HAProxy `llmserve serve` hands to Serve (deployments/haproxy_launcher.py).

What it is for (a client that hangs up stops its generation behind HAProxy) is tested end to end by
tests/integration/test_reliability.py::test_a_sync_client_that_times_out_frees_its_slot, which runs
behind it.
"""

import os
import subprocess
from pathlib import Path

import pytest

from deployments.haproxy_launcher import (
    PID_DIR_ENV,
    STATS_HOST_ENV,
    bind_side_ports,
    haproxy_args,
    serve_env_warning,
)
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
        ({**HA, "RAY_SERVE_HAPROXY_BINARY_PATH": ""}, True),  # a shell's `command -v` that found none
        ({**HA, "RAY_SERVE_HAPROXY_BINARY_PATH": "/usr/sbin/haproxy"}, True),
    ],
)
def test_the_ingress_warns_when_haproxy_would_splice(environ: dict[str, str], warns: bool):
    warning = serve_env_warning(environ)
    assert (warning is not None) == warns
    if warns:
        assert "llmserve-haproxy" in warning and "sync completion" in warning


# Serve's listeners, as its template writes them (ray/serve/_private/haproxy_templates.py)
SERVE_CONFIG = """global
    stats socket /tmp/h/admin.sock mode 666 level admin expose-fd listeners
frontend prometheus
    bind :9101
    mode http
frontend http_frontend
    bind 127.0.0.1:8000
backend http-llm
    server r1 127.0.0.1:30000 check
listen stats
  bind *:8404
  stats enable
"""


def test_the_stats_and_metrics_listeners_move_to_the_stats_host_and_nothing_else_moves():
    moved = bind_side_ports(SERVE_CONFIG, "127.0.0.1")
    assert "    bind 127.0.0.1:9101\n" in moved and "  bind 127.0.0.1:8404\n" in moved
    assert moved.replace("127.0.0.1:9101", ":9101").replace("127.0.0.1:8404", "*:8404") == SERVE_CONFIG
    assert "bind ::1:8404" in bind_side_ports(SERVE_CONFIG, "::1")


def test_serves_template_still_writes_those_listeners():
    from ray.serve._private.haproxy_templates import HAPROXY_CONFIG_TEMPLATE

    rendered = HAPROXY_CONFIG_TEMPLATE.replace("{{ config.metrics_port }}", "9101").replace(
        "{{ config.stats_port }}", "8404"
    )
    moved = bind_side_ports(rendered, "127.0.0.1")
    assert "bind 127.0.0.1:9101" in moved and "bind 127.0.0.1:8404" in moved


def test_haproxy_gets_a_copy_of_serves_config(tmp_path):
    config = tmp_path / "haproxy.cfg"
    config.write_text(SERVE_CONFIG)
    args = haproxy_args(["-db", "-f", str(config), "-sf", "12"], {})
    assert args == ["-db", "-f", f"{config}.llmserve", "-sf", "12"]
    assert "bind 127.0.0.1:8404" in Path(args[2]).read_text()
    assert config.read_text() == SERVE_CONFIG  # Serve's own file is left as Serve wrote it
    assert haproxy_args(["-db", "-f", str(config)], {STATS_HOST_ENV: "0.0.0.0"}) == ["-db", "-f", str(config)]
    assert haproxy_args(["-vv"], {}) == ["-vv"]


def test_a_config_it_cannot_copy_is_used_as_is(tmp_path):
    missing = str(tmp_path / "gone" / "haproxy.cfg")
    assert haproxy_args(["-f", missing], {}) == ["-f", missing]


def test_the_launcher_records_its_pid_for_llmserve_serve(tmp_path):
    launcher = launcher_path()
    env = {**os.environ, PID_DIR_ENV: str(tmp_path)}
    done = subprocess.run([launcher, "-vv"], env=env, capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert [p.name.isdigit() for p in tmp_path.iterdir()] == [True]
