"""Serve and Ray calls for runtime endpoints: deploy one as its own application, delete it, read its state.

Each endpoint is a Serve application of one `ModelServer` deployment with no HTTP route (the ingress
reaches it by handle), deployed imperatively (like `serve.run`): a later `serve deploy` of a config
replaces only the applications deployed from configs, so runtime endpoints survive it.
These calls block on the Serve controller; the endpoint controller runs them in a worker thread.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import ray
from ray import serve
from ray.serve import RunTarget
from ray.serve.handle import DeploymentHandle

from deployments import serve_status
from deployments.config import EndpointSettings, ModelConfig
from deployments.endpoints.resources import Resources, code_version
from deployments.engines.placement import deployment_for
from deployments.model_server import EngineFactory, ModelServer

MAX_REASON_CHARS = 2000
# Serve's client API is not thread-safe in Ray 2.60: every DeploymentConfig it builds (a deployment's
# options, and each one `serve.status()` reads back; states() does not call it) registers, then
# unregisters, a module with cloudpickle's process-wide "pickle by value" set. The endpoint controller
# calls Serve from several threads (each change, and the watcher), which unregistered each other's
# module: a create failed with "is not registered for pickle by value" (found by the schema fuzzer's
# success paths). One call at a time.
_SERVE_LOCK = threading.Lock()


@dataclass(frozen=True, slots=True)
class AppState:
    """What Serve says of one endpoint's application."""

    status: str  # ApplicationStatus: DEPLOYING, RUNNING, DEPLOY_FAILED, UNHEALTHY, DELETING, ...
    message: str  # Serve's reason (app or deployment message), shortened
    num_running: int  # replicas RUNNING
    num_other: int  # replicas starting, stopping, pending placement
    deployment_names: tuple[str, ...] = ()


def deploy(
    app_name: str,
    deployment_name: str,
    config: ModelConfig,
    settings: EndpointSettings,
    engine_factory: EngineFactory | None = None,
) -> None:
    """(Re)deploy `config` as application `app_name`; returns once Serve has the new target.

    Serve's default is 20 constructor failures in a row before DEPLOY_FAILED (minutes for a big model);
    `settings.max_start_attempts` (3) is enough: a model that fails to load three times will not load.
    `engine_factory`: the app's own (tests serve a fake engine); None = the real engine.
    """
    options, factory = deployment_for(config, engine_factory)  # by its engine: vLLM runs in its own venv
    with _SERVE_LOCK:
        deployment = serve.deployment(ModelServer).options(
            name=deployment_name,
            version=code_version(config),
            graceful_shutdown_timeout_s=settings.drain_timeout_s,
            max_constructor_retry_count=settings.max_start_attempts,
            _internal=True,  # `version` is internal in Ray 2.60; with it a scaling change does not restart
            **options,
        )
        target = RunTarget(target=deployment.bind(config, factory), name=app_name, route_prefix=None)
        serve.run_many(
            [target], wait_for_ingress_deployment_creation=False, wait_for_applications_running=False
        )


def handle(app_name: str, deployment_name: str) -> DeploymentHandle:
    """A handle to the endpoint's deployment (no controller call: it is built locally)."""
    return serve.get_deployment_handle(deployment_name, app_name, _check_exists=False)


def delete(app_name: str) -> None:
    """Remove the application; its replicas finish in-flight requests first (graceful shutdown)."""
    with _SERVE_LOCK:
        serve.delete(app_name, _blocking=False)


def states(app_names: set[str] | None = None) -> dict[str, AppState]:
    """Serve's state of each application (all, or those named). Serve's details, not `serve.status()`
    (deployments/serve_status.py): no config is built, so no `_SERVE_LOCK` either."""
    return {
        name: _app_state(app)
        for name, app in serve_status.applications().items()
        if app_names is None or name in app_names
    }


def _app_state(app: serve_status.ApplicationStatus) -> AppState:
    messages = [d.message for d in app.deployments.values()] + [app.message]
    counts: dict[str, int] = {}
    for deployment in app.deployments.values():
        for state, count in deployment.replica_states.items():
            counts[state] = counts.get(state, 0) + count
    num_running = counts.pop("RUNNING", 0)
    message = next((m for m in messages if m), "")
    names = tuple(app.deployments)
    return AppState(app.status, shorten(message), num_running, sum(counts.values()), names)


def shorten(message: str) -> str:
    """Serve's messages can hold a whole traceback: keep its head and its last lines."""
    message = message.strip()
    if len(message) <= MAX_REASON_CHARS:
        return message
    return message[:500] + "\n...\n" + message[-(MAX_REASON_CHARS - 505) :]


def unplaceable(resources: Resources, min_replicas: int = 1, per_node: int | None = None) -> str | None:
    """Why the alive nodes could never hold `min_replicas` replicas (each its total resources, at most
    `per_node` of them on one node), or None if they could."""
    needs = {"CPU": resources.num_cpus, "GPU": float(resources.num_gpus), "memory": resources.memory_bytes}
    if resources.gpu_type is not None:
        needs[f"accelerator_type:{resources.to_ray_actor_options()['accelerator_type']}"] = 0.001
    needs = {k: v for k, v in needs.items() if v}
    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    fitting = sum(all(node.get(k, 0.0) >= v for k, v in needs.items()) for node in nodes)
    if fitting == 0:
        have = "; ".join(", ".join(f"{k}={node.get(k, 0):g}" for k in needs) for node in nodes)
        asked = ", ".join(f"{k}={v:g}" for k, v in needs.items())
        return f"no node of the cluster has the resources one replica asks for ({asked}); nodes have: {have}"
    if per_node is not None and min_replicas > fitting * per_node:
        return (
            f"min_workers {min_replicas} needs {math.ceil(min_replicas / per_node)} nodes: a replica of "
            "this engine on CPU takes a node to itself (its threads use every core), and "
            f"{fitting} node(s) of the cluster can hold one (endpoints.engine.num_threads set in the "
            "app's config lets replicas share a node)"
        )
    return None
