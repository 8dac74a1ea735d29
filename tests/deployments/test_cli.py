"""`llmserve serve` / `llmserve env` (deployments/cli.py): arguments, environment, launcher, warnings.

No Ray starts here. That the command really serves, answers both clients and frees its port on one
SIGTERM was checked by hand (docs/ports.md); the session-wide Serve of the tests runs behind the same
launcher (tests/serve_fixtures.py), and the stop-signal relay is tested in test_serve_process.py.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import yaml

from deployments import cli
from deployments.config import REPO_ROOT
from deployments.haproxy_launcher import LAUNCHER, PID_DIR_ENV

LAUNCHER_PATH = "/venv/bin/llmserve-haproxy"
OURS = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_BINARY_PATH": LAUNCHER_PATH,
}


@pytest.fixture(autouse=True)
def no_real_serve_run(monkeypatch):
    """No test here may start Ray: `serve` hands its command to this instead."""

    def refuse(*args):
        raise AssertionError(f"a test started serve run: {args}")

    monkeypatch.setattr("deployments.serve_process.run_supervised", refuse)


def found() -> str:
    return LAUNCHER_PATH


def missing() -> str:
    raise cli.LauncherNotFoundError("not installed")


# --- the environment Ray starts in ------------------------------------------------------------------


def test_settings_are_the_throughput_mode_behind_the_launcher():
    assert cli.serve_settings({}, find=found) == OURS


def test_a_variable_already_set_wins_and_haproxy_off_needs_no_launcher():
    python_proxy = cli.serve_settings({"RAY_SERVE_ENABLE_HA_PROXY": "0"}, find=missing)
    assert python_proxy == {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "0"}
    own = cli.serve_settings({"RAY_SERVE_HAPROXY_BINARY_PATH": "/opt/haproxy"}, find=missing)
    assert own["RAY_SERVE_HAPROXY_BINARY_PATH"] == "/opt/haproxy"


def test_a_missing_launcher_is_an_error_not_an_empty_variable():
    with pytest.raises(cli.LauncherNotFoundError):
        cli.serve_settings({}, find=missing)
    with pytest.raises(cli.LauncherNotFoundError):  # an empty value counts as unset
        cli.serve_settings({"RAY_SERVE_HAPROXY_BINARY_PATH": ""}, find=missing)


def test_the_launcher_is_found_beside_the_interpreter_then_on_the_path(tmp_path, monkeypatch):
    scripts, on_path = tmp_path / "venv-bin", tmp_path / "path-bin"
    scripts.mkdir(), on_path.mkdir()
    monkeypatch.setattr(cli.sysconfig, "get_path", lambda name: str(scripts))
    monkeypatch.setenv("PATH", str(on_path))
    with pytest.raises(cli.LauncherNotFoundError, match=LAUNCHER):
        cli.find_launcher()
    (on_path / LAUNCHER).write_text("#!/bin/sh\n")
    (on_path / LAUNCHER).chmod(0o755)
    assert cli.find_launcher() == str(on_path / LAUNCHER)
    (scripts / LAUNCHER).write_text("#!/bin/sh\n")
    assert cli.find_launcher() == str(scripts / LAUNCHER)


def test_the_installed_launcher_is_found():
    assert Path(cli.find_launcher()).name == LAUNCHER


# --- arguments and what `serve` runs ----------------------------------------------------------------


def test_env_prints_export_lines(capsys, monkeypatch):
    monkeypatch.setattr(cli, "find_launcher", found)
    assert cli.main(["env"], environ={}) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [f"export {name}={value}" for name, value in OURS.items()]


@pytest.mark.parametrize("argv", [[], ["serve", "--no-such-flag"], ["start"]])
def test_bad_arguments_exit_with_usage(argv):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv, environ={})
    assert exited.value.code == 2


def test_a_missing_config_or_launcher_is_reported(capsys, monkeypatch):
    monkeypatch.setattr(cli, "find_launcher", found)
    assert cli.main(["serve", "no-such.yaml"], environ={}) == 2
    assert "no config file no-such.yaml" in capsys.readouterr().err
    monkeypatch.setattr(cli, "find_launcher", missing)
    assert cli.main(["serve"], environ={}) == 2
    assert "pip install -e ." in capsys.readouterr().err


def test_serve_runs_serve_run_with_the_settings(monkeypatch):
    runs = []
    monkeypatch.setattr(cli, "find_launcher", found)
    monkeypatch.setattr("deployments.serve_process.run_supervised", lambda *a: runs.append(a) or 7)
    monkeypatch.chdir(REPO_ROOT)
    assert cli.main(["serve"], environ={"RAY_ADDRESS": "local", "HOME": "/h"}) == 7
    ((command, env, pid_dir),) = runs
    assert command == [sys.executable, "-m", "ray.serve.scripts", "run", "serve_config.yaml"]
    assert env == {
        "RAY_ADDRESS": "local",
        "HOME": "/h",
        **OURS,
        **cli.DRAIN_ENV,
        **cli.CONTROLLER_ENV,
        PID_DIR_ENV: str(pid_dir),
    }
    cli.main(["serve", "configs/gpu/serve_multi_gpu.yaml", "--address", "10.0.0.1:6379"], environ={})
    assert runs[1][0][-3:] == ["configs/gpu/serve_multi_gpu.yaml", "--address", "10.0.0.1:6379"]


# --- joining a running Ray --------------------------------------------------------------------------


def test_which_ray_serve_run_joins(monkeypatch):
    listening = socket.create_server(("127.0.0.1", 0))
    live = f"127.0.0.1:{listening.getsockname()[1]}"
    with listening:
        monkeypatch.setattr("ray._private.utils.read_ray_address", lambda *a: live)
        assert cli.attached_address(None, {}) == live  # the cluster `ray start` left, still up
        assert cli.attached_address(None, {"RAY_ADDRESS": "local"}) is None
        assert cli.attached_address("local", {"RAY_ADDRESS": "10.0.0.1:6379"}) is None
        assert cli.attached_address(None, {"RAY_ADDRESS": "10.0.0.1:6379"}) == "10.0.0.1:6379"
        assert cli.attached_address("10.0.0.2:6379", {}) == "10.0.0.2:6379"
    assert cli.attached_address(None, {}) is None  # the file names a Ray that is gone
    monkeypatch.setattr("ray._private.utils.read_ray_address", lambda *a: None)
    assert cli.attached_address(None, {}) is None


def fake_process(proc: Path, pid: int, argv: list[str], environ: dict[str, str]) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    (proc / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}\0".encode() for k, v in environ.items()))


def test_the_environment_of_a_local_ray_is_read_from_its_raylet(tmp_path):
    fake_process(tmp_path, 10, ["/x/raylet", "--gcs-address=10.1.1.1:6379"], {"A": "1"})
    fake_process(tmp_path, 11, ["/x/raylet", "--gcs-address=10.1.1.1:7000"], {"B": "2"})
    fake_process(tmp_path, 12, ["/x/gcs_server", "--gcs-address=10.1.1.1:6380"], {"C": "3"})
    assert cli.ray_environment("127.0.0.1:6379", proc=tmp_path) == {"A": "1"}
    assert cli.ray_environment("10.1.1.1:7000", proc=tmp_path) == {"B": "2"}
    assert cli.ray_environment("10.1.1.1:6380", proc=tmp_path) is None  # no raylet of that Ray here


def test_joining_a_ray_started_without_the_settings_warns():
    assert (
        cli.attach_warning("h:1", {**OURS, "RAY_SERVE_HAPROXY_BINARY_PATH": "/o/llmserve-haproxy"}, OURS)
        == ""
    )
    warning = cli.attach_warning("h:1", {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"}, OURS)
    assert "RAY_SERVE_ENABLE_HA_PROXY=1" in warning and "THROUGHPUT" not in warning
    assert "llmserve env" in cli.attach_warning("h:1", None, OURS)  # a remote Ray: cannot tell


# --- exposure ---------------------------------------------------------------------------------------


def write_config(tmp_path: Path, http_options: dict | None, auth: dict | None = None) -> Path:
    args: dict = {"models": ["configs/smollm2-135m-instruct.yaml"]}
    if auth is not None:
        args["auth"] = auth
    config: dict = {
        "applications": [{"name": "llm", "import_path": "deployments.app:build_app", "args": args}]
    }
    if http_options is not None:
        config["http_options"] = http_options
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "::1", "127.0.0.2"])
def test_loopback_needs_no_key(tmp_path, host):
    assert cli.exposure_warning(write_config(tmp_path, {"host": host}), {}) is None


@pytest.mark.parametrize("http_options", [{"host": "0.0.0.0"}, {"host": "10.0.0.5"}, None])
def test_a_reachable_host_without_keys_warns(tmp_path, http_options):
    warning = cli.exposure_warning(write_config(tmp_path, http_options), {})
    assert warning is not None and "auth.api_keys" in warning  # no http_options: Serve's 0.0.0.0


def test_keys_from_the_config_or_the_environment_silence_it(tmp_path):
    assert cli.exposure_warning(write_config(tmp_path, {"host": "0.0.0.0"}, {"api_keys": ["k"]}), {}) is None
    config = write_config(tmp_path, {"host": "0.0.0.0"})
    assert cli.exposure_warning(config, {"LLMSERVE_API_KEYS": "a,b"}) is None
    assert cli.exposure_warning(config, {"LLMSERVE_API_KEYS": " , "}) is not None


def test_the_shipped_default_config_is_on_loopback():
    assert cli.exposure_warning(REPO_ROOT / "serve_config.yaml", dict(os.environ)) is None
