"""One Ray instance and one Serve HTTP proxy per test session, shared by every folder that needs them.

Each folder's conftest wraps `serve_session()` in its own session fixture; a use count makes the
first user start Ray + Serve and the last one stop them. Apps run side by side under their own
route prefixes, so a test session starts each app once.
"""

from __future__ import annotations

import os
import random
import shutil
import socket
import sysconfig
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import ray
from ray import serve

from deployments import serve_status
from deployments.cli import CONTROLLER_ENV
from deployments.haproxy_launcher import LAUNCHER as HAPROXY_LAUNCHER
from deployments.haproxy_launcher import LAUNCHER_COMMAND

NUM_LOGICAL_CPUS = 4  # logical: the machine has 2 cores; deployments ask for fractions


@dataclass(slots=True)
class _SessionState:
    num_users: int = 0
    port: int | None = None


_state = _SessionState()  # test-process state: which fixture started Ray, and its HTTP port


# Single ports for servers that bind later (Serve's HTTP port, HAProxy's stats and metrics ports) come
# from outside the kernel's ephemeral range: a port the kernel handed out (bind to 0) goes back to the pool
# and can be taken by any outgoing connection or by Ray's own ports before the server binds it (HAProxy's
# stats port was, once: "cannot bind socket (Address already in use)"). Also outside Ray's worker ports
# (10002-19999), the ingress ranges below (20000-29999) and Serve's default ingress ranges (30000-31000,
# 40000-41000: test_restart's servers use them).
SINGLE_PORTS = range(31100, 65536)


def ephemeral_ports() -> range:
    """The kernel's range for outgoing connections and port 0 (Linux: 32768-60999 unless changed)."""
    try:
        low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999
    return range(low, high + 1)


def free_port() -> int:
    """A port free now, at a random place in SINGLE_PORTS outside the ephemeral range, never handed out
    before by this process."""
    ephemeral = ephemeral_ports()
    candidates = [port for port in SINGLE_PORTS if port not in ephemeral and port not in _handed_out]
    port = _random_free(candidates, width=1)
    _handed_out.add(port)
    return port


_handed_out: set[int] = set()  # picked, maybe not bound yet: a later pick must not take it again


def serve_session() -> Iterator[int]:
    """Yield the HTTP port of a running Serve; starts Ray and Serve on first use, stops them on last."""
    if _state.num_users == 0:
        use_readme_serve_env()
        use_quiet_ray_env()
        # address="local": always a private instance, never someone else's running cluster.
        ray.init(address="local", num_cpus=NUM_LOGICAL_CPUS, include_dashboard=False)
        _state.port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": _state.port})
    _state.num_users += 1
    try:
        yield _state.port
    finally:
        _state.num_users -= 1
        if _state.num_users == 0:
            serve.shutdown()
            ray.shutdown()


# The Serve settings of the README's server command, as written there (docs/performance.md, "Serve's
# HAProxy mode"). Set here, after this process imported Serve, so only the processes Ray starts read
# them: this test process keeps its default router loop, which its blocking handle calls need.
README_SERVE_ENV = {
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    "RAY_SERVE_ENABLE_HA_PROXY": "1",
    "RAY_SERVE_HAPROXY_BINARY_PATH": LAUNCHER_COMMAND,
}


def use_readme_serve_env() -> None:
    """The README's Serve settings, unless the environment says otherwise (`RAY_SERVE_ENABLE_HA_PROXY=0
    python -m pytest` runs the suite through Serve's Python proxy)."""
    for name, value in README_SERVE_ENV.items():
        if name not in os.environ:  # the launcher is looked up only when it is the one to run
            os.environ[name] = launcher_path() if value == LAUNCHER_COMMAND else value
    if os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1":
        _use_haproxy(tempfile.mkdtemp(prefix="haproxy-serve-"))
        _use_own_ingress_ports()
    # The one departure from the README's Serve: an ingress replica that stops (every deleted test app)
    # holds on for Serve's minimum drain of 30 s, kept so that an outside load balancer can stop sending
    # to it. The tests delete apps with no traffic left, so 1 s (a whole suite ran ~6 min longer at 30).
    os.environ.setdefault("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")
    # Serve's handles and replicas push autoscaling metrics every 10 s; once a second here, so that the
    # autoscaling tests see each step in ~1-2 s (they wait on Serve's status, never on a fixed time).
    for name in ("HANDLE", "REPLICA"):
        os.environ.setdefault(f"RAY_SERVE_{name}_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
    # Serve's controller reconciles every 0.1 s, busy or idle; every 0.5 s here, as `llmserve serve` sets
    # it (deployments/cli.py: CONTROLLER_ENV). Three Serve-heavy modules on two workers (endpoint races,
    # model endpoints, multi-model): the two controllers used 15.0 CPU-s at 0.1 s and 9.6 at 0.5, the
    # modules' wall unchanged (156 / 158 s; 2026-12-05, Ice Lake, 2 cores).
    for name, value in CONTROLLER_ENV.items():
        os.environ.setdefault(name, value)
    # A proxy that answers its ready or health check in over 5 / 10 s is replaced (and a test that
    # deploys meanwhile fails): on a loaded 2-core machine, with pytest-xdist's workers each running a
    # Serve, a proxy starting beside model loads took that long. The tests test the app, not that bound.
    for name in ("READY", "HEALTH"):
        os.environ.setdefault(f"RAY_SERVE_PROXY_{name}_CHECK_TIMEOUT_S", "60")


# Ray's own background work that the tests do not need, lighter (2026-12-06, AMD EPYC Zen 3, 2 cores; a
# whole suite runs two of these Rays, ~12 min each, and the log monitors and dashboard agents of all its
# Rays took 44 and 45 CPU-s of ~1,300):
QUIET_RAY_ENV = {
    # The log monitor lists the log folder every 0.1 s while it holds under 1,000 files: every 5 s here
    # (a new worker's output reaches pytest's log up to 5 s later; the files have it at once).
    "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD": "0",
    "LOG_NAME_UPDATE_INTERVAL_S": "5",
    # The dashboard agent's reporter reads every worker's process stats every 5 s: every 60 s (the
    # dashboard's node view, which no test reads; Serve's and this app's metrics do not go through it).
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
}


def use_quiet_ray_env() -> None:
    """QUIET_RAY_ENV for the Ray this test process starts, unless the environment says otherwise."""
    for name, value in QUIET_RAY_ENV.items():
        os.environ.setdefault(name, value)


def launcher_path() -> str:
    """The installed `llmserve-haproxy`: beside this Python (its venv, activated or not), else on the PATH.
    Beside first: another Python's install of this project on the PATH may point at another checkout."""
    beside = Path(sysconfig.get_path("scripts")) / HAPROXY_LAUNCHER
    found = str(beside) if beside.is_file() else shutil.which(HAPROXY_LAUNCHER)
    if found is None:
        raise FileNotFoundError(f"{HAPROXY_LAUNCHER} is not installed: pip install -e .")
    return found


def _use_haproxy(state_dir: str) -> None:
    """Serve's HAProxy with its files in `state_dir` (not /tmp/haproxy-serve) and its stats and metrics
    listeners on free ports (not 8404 and 9101), so that it runs beside another Serve."""
    for name, file in (
        ("CONFIG_FILE_LOC", "haproxy.cfg"),
        ("SOCKET_PATH", "admin.sock"),
        ("SERVER_STATE_BASE", ""),
        ("SERVER_STATE_FILE", "server-state"),
    ):
        os.environ[f"RAY_SERVE_HAPROXY_{name}"] = os.path.join(state_dir, file).rstrip("/")
    for name in ("STATS_PORT", "METRICS_PORT"):
        os.environ[f"RAY_SERVE_HAPROXY_{name}"] = str(free_port())
    # HAProxy mode keeps Serve's Python proxy as a fallback on 8500 (gRPC 9500): ports of its own too
    for name in ("HTTP", "GRPC"):
        os.environ[f"RAY_SERVE_FALLBACK_PROXY_{name}_PORT"] = str(free_port())


def _use_own_ingress_ports() -> None:
    """In HAProxy mode each ingress replica serves on a port Serve picks from 30000-31000 (gRPC from
    40000-41000), counting from the start of the range: a second Serve on the machine (a pytest-xdist
    worker, another checkout's tests) would take the same ports. Each test session takes free ranges."""
    for kind, width in (("HTTP", 100), ("GRPC", 100)):
        base = _free_range(width)
        os.environ[f"RAY_SERVE_DIRECT_INGRESS_MIN_{kind}_PORT"] = str(base)
        os.environ[f"RAY_SERVE_DIRECT_INGRESS_MAX_{kind}_PORT"] = str(base + width)


def _free_range(width: int) -> int:
    """The start of `width` consecutive ports that are free now, at a random place in 20000-29999."""
    return _random_free(range(20000, 30000 - width, width), width)


def _random_free(starts: Sequence[int], width: int) -> int:
    """One of `starts` (picked at random) whose `width` ports from it are all free now, from this test
    process's share: the xdist workers pick at the same moments (each starts its Serve at once), and a port
    that is free when two of them look is then bound by only one (two workers once chose the same HTTP
    port), so worker k of n takes the starts whose place (start // width) is k modulo n. A subprocess of a
    worker (the two-node cluster) inherits its share."""
    share, num_shares = _xdist_share()
    starts = [base for base in starts if (base // width) % num_shares == share]
    rng = random.Random()
    for _ in range(200):
        base = rng.choice(starts)
        if all(_is_free(port) for port in range(base, base + width)):
            return base
    raise RuntimeError(f"no {width} free consecutive ports from any of {len(starts)} places")


def _xdist_share() -> tuple[int, int]:
    """(this worker's number, how many workers) under pytest-xdist; (0, 1) otherwise."""
    worker, count = os.environ.get("PYTEST_XDIST_WORKER", ""), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
    if not worker.startswith("gw") or not count:
        return 0, 1
    return int(worker.removeprefix("gw")), int(count)


def _is_free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_app(app: serve.Application, *, name: str, route_prefix: str, port: int) -> str:
    """Deploy `app` and wait until its HTTP routes answer; returns its base URL (ending in "/")."""
    serve.run(app, name=name, route_prefix=route_prefix)
    base_url = f"http://127.0.0.1:{port}{route_prefix.rstrip('/')}/"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the proxy learns new routes a moment after serve.run returns
        try:
            if httpx.get(base_url + "healthz", timeout=5).status_code == 200:
                return base_url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"app {name!r} did not answer on {base_url}healthz within 60 s")


def delete_app(name: str) -> None:
    """Delete a test app without waiting for its replicas to drain (~3 s each, with nobody left to serve)."""
    serve.delete(name, _blocking=False)


def replica_states(app_name: str, deployment_name: str) -> dict[str, int]:
    """Replica counts by state ("RUNNING", "STARTING"...) of one deployment; {} while it does not exist.
    From Serve's details (deployments/serve_status.py): the autoscaling tests ask several times a second."""
    status = serve_status.applications().get(app_name)
    if status is None or deployment_name not in status.deployments:
        return {}
    return status.deployments[deployment_name].replica_states


def replica_pid(app_name: str, model: str) -> int:
    """The process id of the (one) replica of `model` in `app_name`, asked of the replica through its
    handle: exact even when other Ray clusters on this machine run apps of the same name."""
    handle = serve.get_deployment_handle(f"ModelServer:{model}", app_name=app_name)
    return handle.pid.remote().result(timeout_s=60)
