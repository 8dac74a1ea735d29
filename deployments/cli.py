"""`llmserve`: start the app in one short command, with Serve's settings set where Ray starts.

`llmserve serve [CONFIG]` runs `serve run CONFIG` (serve_config.yaml by default) in Serve's
throughput-optimized mode behind HAProxy, through this project's `llmserve-haproxy` (HAProxy without
splicing, its stats and metrics ports on loopback). Ray reads these settings when each of its processes
starts, so they cannot live in a Serve config: plain `serve run` runs Serve's Python proxy instead.
`llmserve env` prints the same settings as `export` lines, for `ray start` on a cluster's nodes.
A variable already set in the environment wins (`RAY_SERVE_ENABLE_HA_PROXY=0 llmserve serve`).
`llmserve vllm-env [PATH]` builds the venv that `engine: vllm` replicas run in (docs/engines.md).
"""

from __future__ import annotations

import argparse
import ipaddress
import shlex
import shutil
import socket
import sys
import sysconfig
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import yaml

from deployments.haproxy_launcher import LAUNCHER, PID_DIR_ENV

THROUGHPUT_ENV = {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1", "RAY_SERVE_ENABLE_HA_PROXY": "1"}
BINARY_ENV = "RAY_SERVE_HAPROXY_BINARY_PATH"
# Serve keeps a stopping ingress replica's own port open 30 s so that an outside load balancer can stop
# sending to it. In front of `llmserve serve` there is only Serve's HAProxy, told at once; so Ctrl-C
# takes ~7 s instead of ~37 s (docs/ports.md).
DRAIN_ENV = {"RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "2"}
# Serve's controller reconciles every 0.1 s, busy or idle: ~5 % of a core on a 2-core machine, taken from
# the engine's threads; every 0.5 s, 1.7-2 % (docs/ports.md). A deploy, an autoscaling decision or a dead
# replica is acted on at most 0.4 s later, against autoscaling delays of seconds.
CONTROLLER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}
DEFAULT_CONFIG = "serve_config.yaml"


class LauncherNotFoundError(FileNotFoundError):
    pass


def find_launcher() -> str:
    """`llmserve-haproxy` beside this Python (its venv, activated or not), else on the PATH."""
    beside = Path(sysconfig.get_path("scripts")) / LAUNCHER
    found = str(beside) if beside.is_file() else shutil.which(LAUNCHER)
    if found is None:
        raise LauncherNotFoundError(f"{LAUNCHER} is not installed beside {sys.executable} nor on the PATH")
    return found


def serve_settings(environ: Mapping[str, str], find: Callable[[], str] | None = None) -> dict[str, str]:
    """Serve's settings for Ray's processes: ours, except where `environ` already sets one."""
    settings = {name: environ.get(name, value) for name, value in THROUGHPUT_ENV.items()}
    if settings["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        settings[BINARY_ENV] = environ.get(BINARY_ENV) or (find or find_launcher)()
    return settings


def attached_address(address: str | None, environ: Mapping[str, str]) -> str | None:
    """The Ray that `serve run` will join instead of starting its own, or None (as `ray.init` decides)."""
    address = address or environ.get("RAY_ADDRESS") or None
    if address in (None, "auto"):
        from ray._private.utils import read_ray_address  # the cluster the last `ray start` left

        found = read_ray_address()
        return found if found and _answers(found) else None
    return None if address == "local" else address


def _answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=1):
            return True
    except (OSError, ValueError):
        return False


def ray_environment(address: str, proc: Path = Path("/proc")) -> dict[str, str] | None:
    """The environment the raylet of the Ray at `address` started with, when it runs on this machine."""
    port = address.rpartition(":")[2]
    for cmdline in proc.glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if not argv[0].endswith(b"raylet") or not any(
                a.startswith(b"--gcs-address=") and a.endswith(f":{port}".encode()) for a in argv
            ):
                continue
            pairs = (cmdline.parent / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        return dict(p.decode(errors="replace").split("=", 1) for p in pairs if b"=" in p)
    return None


def attach_warning(address: str, cluster_env: Mapping[str, str] | None, wanted: Mapping[str, str]) -> str:
    """What joining a running Ray means for Serve's settings: this command cannot set them there."""
    if cluster_env is None:
        return (
            f"joining the Ray at {address}: Serve's settings are those its nodes started with, not this "
            'command\'s; start them after `eval "$(llmserve env)"` (docs/cluster.md)'
        )
    missing = [
        f"{name}={value}"
        for name, value in wanted.items()
        if cluster_env.get(name) != value and not (name == BINARY_ENV and _is_launcher(cluster_env.get(name)))
    ]
    if not missing:
        return ""
    return (
        f"joining the Ray at {address}, started without {' '.join(missing)}: Serve runs as that Ray was "
        "started, not in the mode this command sets. Stop it and run `llmserve serve` alone, or restart "
        'it after `eval "$(llmserve env)"`'
    )


def _is_launcher(path: str | None) -> bool:
    return bool(path) and Path(path).name == LAUNCHER


def exposure_warning(config: Path, environ: Mapping[str, str]) -> str | None:
    """A warning when the HTTP host is not loopback and no API key is configured, else None."""
    from ray.serve.schema import ServeDeploySchema

    from deployments.limits import AuthSettings

    schema = ServeDeploySchema.model_validate(yaml.safe_load(config.read_text(encoding="utf-8")))
    host = schema.http_options.host
    if _is_loopback(host):
        return None
    ours = [app.args or {} for app in schema.applications if app.import_path == "deployments.app:build_app"]
    if ours and all(AuthSettings.model_validate(a.get("auth") or {}).resolve_keys(environ) for a in ours):
        return None
    return (
        f"{config}: http_options.host is {host!r}, not loopback, and no API key is configured: anyone who "
        "reaches this machine can use the models (set auth.api_keys or LLMSERVE_API_KEYS; docs/ports.md)"
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmserve", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run `serve run CONFIG` with Serve's settings (Ctrl-C stops)")
    serve.add_argument("config", nargs="?", default=DEFAULT_CONFIG, help="a Serve config file")
    serve.add_argument("--address", help="a running Ray to join (`serve run --address`); default: a new one")
    commands.add_parser("env", help="print Serve's settings as `export` lines, for `ray start`")
    vllm_env = commands.add_parser("vllm-env", help="build the venv that vLLM-backed replicas run in")
    vllm_env.add_argument("path", nargs="?", type=Path, help="where (default: .venv-vllm in the repository)")
    vllm_env.add_argument("--target", choices=["cpu", "cuda"], help="default: cuda where nvidia-smi answers")
    return parser


def main(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    import os

    args = _parser().parse_args(argv)
    environ = dict(os.environ if environ is None else environ)
    if args.command == "vllm-env":
        from deployments.engines import DEFAULT_VLLM_VENV, vllm_env

        return vllm_env.main(args.path or DEFAULT_VLLM_VENV, args.target)
    try:
        settings = serve_settings(environ)
    except LauncherNotFoundError as exc:
        print(f"llmserve: {exc}: pip install -e . (from the repository root)", file=sys.stderr)
        return 2
    if args.command == "env":
        print("\n".join(f"export {name}={shlex.quote(value)}" for name, value in settings.items()))
        return 0
    return _serve(Path(args.config), args.address, environ, settings)


def _serve(config: Path, address: str | None, environ: dict[str, str], settings: dict[str, str]) -> int:
    from deployments.serve_process import run_supervised

    if not config.is_file():
        print(f"llmserve: no config file {config}", file=sys.stderr)
        return 2
    warnings = [exposure_warning(config, environ)]
    if joined := attached_address(address, environ):
        warnings.append(attach_warning(joined, ray_environment(joined), settings))
    for warning in filter(None, warnings):
        print(f"llmserve: warning: {warning}", file=sys.stderr)
    command = [sys.executable, "-m", "ray.serve.scripts", "run", str(config)]
    if address:
        command += ["--address", address]
    with tempfile.TemporaryDirectory(prefix="llmserve-haproxy-pids-") as pid_dir:
        env = {**DRAIN_ENV, **CONTROLLER_ENV, **environ, **settings, PID_DIR_ENV: pid_dir}
        return run_supervised(command, env, Path(pid_dir))


if __name__ == "__main__":
    sys.exit(main())
