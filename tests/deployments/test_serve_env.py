"""Serve's process settings (throughput mode behind HAProxy) are the same wherever they are written.

They are read where each Ray process starts, so they live in five places: the README's server command,
the `serve_config.yaml` comment, docs/cluster.md, the KubeRay example's container env and the tests'
Serve (`tests.serve_fixtures.README_SERVE_ENV`). The tests measure what the README ships only while
these agree. The KubeRay example is the one exception, on purpose: its pods install this project
through the app's runtime_env, after Ray (and Serve's HAProxy) started, so `llmserve-haproxy` is not
there to run; it keeps Serve's Python proxy (docs/cluster.md).
"""

import re

import pytest
import yaml

from deployments.config import REPO_ROOT
from tests.serve_fixtures import README_SERVE_ENV

_SETTING = re.compile(r"\b(RAY_SERVE_[A-Z_]+)=(\$\([^)]*\)|\S+)")  # a value, or a command's output: $(...)
KUBERAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}


def settings_on(line: str) -> dict[str, str]:
    return dict(_SETTING.findall(line))


def lines_with(path: str, needle: str) -> list[str]:
    lines = [ln for ln in (REPO_ROOT / path).read_text(encoding="utf-8").splitlines() if needle in ln]
    assert lines, f"{path}: no line with {needle!r}"
    return lines


def test_the_readme_server_command_sets_what_the_tests_run_with():
    (command,) = [ln for ln in lines_with("README.md", "serve run serve_config.yaml") if "pip install" in ln]
    assert settings_on(command) == README_SERVE_ENV


@pytest.mark.parametrize(
    ("path", "needle"),
    [
        ("serve_config.yaml", "serve run serve_config.yaml"),
        ("docs/cluster.md", "RAY_SERVE_THROUGHPUT_OPTIMIZED="),
    ],
)
def test_every_documented_start_command_sets_the_same(path: str, needle: str):
    for line in lines_with(path, needle):
        assert settings_on(line) == README_SERVE_ENV, line


def test_every_kuberay_container_sets_the_same():
    manifest = yaml.safe_load((REPO_ROOT / "configs/kuberay/rayservice.yaml").read_text(encoding="utf-8"))
    cluster = manifest["spec"]["rayClusterConfig"]
    specs = [cluster["headGroupSpec"]] + cluster["workerGroupSpecs"]
    for spec in specs:
        for container in spec["template"]["spec"]["containers"]:
            env = {
                e["name"]: e["value"] for e in container.get("env", []) if e["name"].startswith("RAY_SERVE_")
            }
            assert env == KUBERAY_SERVE_ENV, container["name"]


def test_a_changed_setting_is_seen():
    command = (
        "RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1 "
        "RAY_SERVE_HAPROXY_BINARY_PATH=$(command -v llmserve-haproxy) serve run serve_config.yaml"
    )
    assert settings_on(command) == README_SERVE_ENV
    assert settings_on(command.replace("HA_PROXY=1", "HA_PROXY=0")) != README_SERVE_ENV
    other_binary = command.replace("$(command -v llmserve-haproxy)", "/usr/sbin/haproxy")
    assert settings_on(other_binary) != README_SERVE_ENV
