"""Serve options of a vLLM model's deployment: the vLLM venv's interpreter, and for several devices
the replica's placement group, as Ray Serve LLM builds it (ray.llm's LLMServer.get_deployment_options):
one bundle per device, the replica's own resources merged into the first, PACK. vLLM's workers then
take the device bundles (distributed_executor_backend="ray" on a GPU)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from deployments.config import ConfigError, ModelConfig
from deployments.engines import has_gpu, require_engine, resolve_engine_kind, vllm_python

if TYPE_CHECKING:
    from deployments.model_server import EngineFactory

PLACEMENT_STRATEGY = "PACK"


def num_devices(config: ModelConfig) -> int:
    """Devices one replica shards the model over: `tensor_parallel_size`, or `num_gpus` when only that
    is set above 1."""
    tp = config.engine.tensor_parallel_size
    num_gpus = float(config.deployment.ray_actor_options.get("num_gpus", 0) or 0)
    if tp == 1 and num_gpus > 1:
        return int(num_gpus)
    return tp


def device_bundles(config: ModelConfig) -> list[dict[str, float]]:
    """One bundle per device: {"GPU": 1} on a GPU replica, {"CPU": 1} on a CPU one."""
    device = "GPU" if has_gpu(config) else "CPU"
    return [{device: 1.0} for _ in range(num_devices(config))]


def merge_replica_bundle(
    bundles: list[dict[str, float]], replica: dict[str, float]
) -> list[dict[str, float]]:
    """The replica's resources added to the first bundle (the replica is placed in bundle 0, beside
    its first worker)."""
    first = {k: bundles[0].get(k, 0.0) + replica.get(k, 0.0) for k in bundles[0].keys() | replica.keys()}
    return [{k: v for k, v in first.items() if v}, *(dict(b) for b in bundles[1:])]


def vllm_deployment_options(config: ModelConfig, python: Path) -> dict[str, Any]:
    """`Deployment.options` keywords for a vLLM model: its replica runs `python` (the vLLM venv's),
    and on a GPU or with several devices inside a placement group of one bundle per device."""
    options = config.deployment.to_options()
    actor = copy.deepcopy(options.get("ray_actor_options", {}))
    runtime_env = dict(actor.get("runtime_env") or {})
    runtime_env["py_executable"] = str(python)
    actor["runtime_env"] = runtime_env
    if has_gpu(config) or num_devices(config) > 1:
        if "max_replicas_per_node" in options:  # Serve refuses it beside placement_group_bundles
            raise ConfigError(
                f"model {config.name!r}: deployment.max_replicas_per_node cannot be set for vLLM on GPUs or "
                "several devices (the replica's placement group decides where it runs)"
            )
        replica = {"CPU": float(actor.get("num_cpus", 1)), **actor.get("resources", {})}
        if "memory" in actor:
            replica["memory"] = actor["memory"]
        actor["num_gpus"] = 0  # the devices are the workers', in their bundles
        options["placement_group_bundles"] = merge_replica_bundle(device_bundles(config), replica)
        options["placement_group_strategy"] = PLACEMENT_STRATEGY
    options["ray_actor_options"] = actor
    return options


def deployment_for(
    config: ModelConfig, engine_factory: EngineFactory | None = None
) -> tuple[dict[str, Any], EngineFactory | None]:
    """The Serve options and engine factory of one model's deployment, by its engine (docs/engines.md);
    EngineUnavailableError (naming the install command) for vLLM without its venv. A given
    `engine_factory` (tests) wins over the engine's own."""
    if require_engine(config) == "vllm":
        from deployments.engines.vllm_engine import load_vllm_model

        python = vllm_python()
        assert python is not None  # require_engine checked it
        return vllm_deployment_options(config, python), engine_factory or load_vllm_model
    options = config.deployment.to_options()
    per_node = replicas_per_node(config)
    if per_node is not None:
        options["max_replicas_per_node"] = per_node
    return options, engine_factory


def replicas_per_node(config: ModelConfig) -> int | None:
    """`deployment.max_replicas_per_node`, or where it is null, 1 for this project's engine on CPU with
    `engine.num_threads` null: such a replica's torch threads use every core of its node, so a second
    replica beside it would only split the same cores between two engines (on 2 cores, SmolLM2 at c=64
    fell from ~250 to 73-98 tok/s when autoscaling placed one there). None: no limit."""
    if config.deployment.max_replicas_per_node is not None:
        return config.deployment.max_replicas_per_node
    whole_node = config.engine.num_threads is None and not has_gpu(config)
    return 1 if whole_node and resolve_engine_kind(config) == "llmserve" else None
