"""A request's fields as a model config: workers → autoscaling, cpus/gpus/memory/gpu_type → resources.

Pure functions: they raise `InvalidRequestError` (400) naming the field and the limit.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from deployments.config import DeploymentSettings, EngineSettings, ModelConfig
from deployments.endpoints.wire import Quantity, engine_kind_of
from deployments.engines import EngineUnavailableError, require_engine, vllm_version
from deployments.engines.placement import num_devices
from deployments.errors import validation_message
from engine.errors import InvalidRequestError
from model_zoo import CATALOGUE

MAX_CPUS = 1024.0
MAX_MEMORY_BYTES = 16 * 1024**4  # 16 TiB
# LLM Engine GPU names → Ray accelerator types. Ray labels an A100 node "A100" by itself; "A100-80G"
# must be set on 80 GB nodes by hand (ray start --resources). MIG slices have no Ray equivalent.
ACCELERATOR_TYPES: dict[str, str] = {
    "nvidia-tesla-t4": "T4",
    "nvidia-ampere-a10": "A10G",
    "nvidia-ampere-a100": "A100",
    "nvidia-ampere-a100e": "A100-80G",
    "nvidia-hopper-h100": "H100",
}
_MEMORY_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_MEMORY_UNITS |= {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_QUANTITY = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")


@dataclass(frozen=True, slots=True)
class Resources:
    """What one replica reserves on a node."""

    num_cpus: float
    num_gpus: int
    memory_bytes: int  # 0 = no reservation
    gpu_type: str | None  # LLM Engine name

    def to_ray_actor_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"num_cpus": self.num_cpus}
        if self.num_gpus:
            options["num_gpus"] = self.num_gpus
        if self.memory_bytes:
            options["memory"] = self.memory_bytes
        if self.gpu_type is not None:
            options["accelerator_type"] = ACCELERATOR_TYPES[self.gpu_type]
        return options


def resources_of(config: ModelConfig) -> Resources:
    """What a deployed config reserves per replica (the inverse of `Resources.to_ray_actor_options`)."""
    options = config.deployment.ray_actor_options
    gpu_types = {ray_name: name for name, ray_name in ACCELERATOR_TYPES.items()}
    return Resources(
        num_cpus=float(options.get("num_cpus", 1)),
        num_gpus=int(options.get("num_gpus", 0)),
        memory_bytes=int(options.get("memory", 0)),
        gpu_type=gpu_types.get(options.get("accelerator_type", "")),
    )


def scaling_of(config: ModelConfig) -> tuple[int, int, int]:
    """(min_workers, max_workers, per_worker) of a deployed config."""
    scaling = config.deployment.autoscaling_config or {}
    return scaling["min_replicas"], scaling["max_replicas"], int(scaling["target_ongoing_requests"])


def parse_cpus(value: Quantity) -> float:
    """1, 0.5, "2", "500m" (millicores) → CPUs; (0, MAX_CPUS]."""
    number, unit = _split(value, "cpus")
    if unit not in ("", "m"):
        raise InvalidRequestError(f"cpus: {value!r} is not a CPU count (e.g. 1, 0.5, '500m')")
    cpus = number / 1000 if unit == "m" else number
    if not 0 < cpus <= MAX_CPUS:
        raise InvalidRequestError(f"cpus: {value!r} is out of range: more than 0 and at most {MAX_CPUS:g}")
    return cpus


def parse_memory(value: Quantity) -> int:
    """4294967296, "4Gi", "512Mi", "8G" → bytes; (0, MAX_MEMORY_BYTES]."""
    number, unit = _split(value, "memory")
    factor = _MEMORY_UNITS.get(unit.lower().removesuffix("b") if unit.lower() != "b" else "")
    if factor is None:
        raise InvalidRequestError(f"memory: {value!r} has an unknown unit (use Ki, Mi, Gi, Ti, K, M, G, T)")
    num_bytes = int(number * factor)
    if not 0 < num_bytes <= MAX_MEMORY_BYTES:
        raise InvalidRequestError(f"memory: {value!r} is out of range: more than 0 bytes and at most 16Ti")
    return num_bytes


def _split(value: Quantity, field: str) -> tuple[float, str]:
    if isinstance(value, bool):
        raise InvalidRequestError(f"{field}: {value!r} is not a quantity")
    if isinstance(value, int | float):
        return float(value), ""
    match = _QUANTITY.fullmatch(value)
    if match is None:
        raise InvalidRequestError(f"{field}: {value!r} is not a quantity (e.g. 2, 0.5, '500m', '4Gi')")
    return float(match.group(1)), match.group(2)


def resources(
    *,
    cpus: Quantity | None,
    gpus: int | None,
    memory: Quantity | None,
    gpu_type: str | None,
    default_num_cpus: float,
) -> Resources:
    if gpu_type is not None and gpu_type not in ACCELERATOR_TYPES:
        raise InvalidRequestError(
            f"gpu_type: {gpu_type!r} (a MIG slice) has no Ray accelerator type; use one of "
            f"{', '.join(ACCELERATOR_TYPES)}"
        )
    return Resources(
        num_cpus=parse_cpus(cpus) if cpus is not None else default_num_cpus,
        num_gpus=gpus or 0,
        memory_bytes=parse_memory(memory) if memory is not None else 0,
        gpu_type=gpu_type,
    )


def autoscaling(min_workers: int, max_workers: int, per_worker: int) -> dict[str, Any]:
    """Serve autoscaling. One replica starts even with min_workers 0, so a model that cannot load is
    UPDATE_FAILED at once, not at its first request; autoscaling then takes it down to zero."""
    if max_workers < min_workers:
        raise InvalidRequestError(f"max_workers ({max_workers}) must be at least min_workers ({min_workers})")
    return {
        "min_replicas": min_workers,
        "max_replicas": max_workers,
        "initial_replicas": max(min_workers, 1),
        "target_ongoing_requests": per_worker,
    }


def check_model(model_name: str, checkpoint_path: str | None, checkpoint_roots: Sequence[str] = ()) -> str:
    """The `ModelConfig.model` to serve: the checkpoint folder, else the zoo name; 400 if neither.

    A checkpoint folder must lie under one of `checkpoint_roots` (endpoints.checkpoint_roots) once
    symlinks are resolved: the API cannot make the server read any folder of its host."""
    if checkpoint_path is not None:
        folder = _allowed_folder(checkpoint_path, checkpoint_roots)
        try:  # a name past the OS's limit raises OSError
            is_folder = (folder / "config.json").is_file()
        except (OSError, ValueError):
            is_folder = False
        if not is_folder:
            raise InvalidRequestError(
                f"checkpoint_path: {checkpoint_path[:200]!r} is not a local Hugging Face folder (one holding "
                "config.json) on the server's node; remote paths (s3://, gs://) are not supported"
            )
        return str(folder)
    if model_name not in CATALOGUE:
        raise InvalidRequestError(
            f"model_name: {model_name[:200]!r} is not in the model zoo (or give checkpoint_path, a local "
            f"Hugging Face folder); zoo names: {', '.join(sorted(CATALOGUE))}"
        )
    return model_name


def _allowed_folder(checkpoint_path: str, roots: Sequence[str]) -> Path:
    """The real path of `checkpoint_path` if it lies under one of `roots`; 400 otherwise."""
    shown = repr(checkpoint_path[:200])
    if not roots:
        raise InvalidRequestError(
            f"checkpoint_path: {shown} is refused: this server allows no checkpoint folder "
            "(endpoints.checkpoint_roots is empty); create the endpoint from a zoo model_name"
        )
    if "://" in checkpoint_path or "\x00" in checkpoint_path or ".." in checkpoint_path.split("/"):
        raise InvalidRequestError(
            f"checkpoint_path: {shown} must be a local folder path without '..' (remote paths such as "
            "s3:// are not supported)"
        )
    try:  # "~nobody/x" raises RuntimeError
        given = Path(checkpoint_path).expanduser()
        if not given.is_absolute():
            raise InvalidRequestError(f"checkpoint_path: {shown} must be an absolute path")
        real = Path(os.path.realpath(given))
        allowed = [Path(os.path.realpath(Path(root).expanduser())) for root in roots]
    except (OSError, RuntimeError, ValueError):
        real, allowed = None, []
    if real is None or not any(real == root or root in real.parents for root in allowed):
        raise InvalidRequestError(
            f"checkpoint_path: {shown} is not under an allowed folder (endpoints.checkpoint_roots: "
            f"{', '.join(roots)})"
        )
    return real


def engine_for(engine: EngineSettings, *, image_tag: str | None, num_shards: int | None) -> EngineSettings:
    """The endpoint's engine settings: `inference_framework_image_tag` chooses the engine (null or
    'latest' keep the configured one), `num_shards` the devices of one replica; a vLLM version that
    is not the installed one is a 400."""
    try:
        kind = engine_kind_of(image_tag)
    except ValueError as exc:
        raise InvalidRequestError(str(exc)) from None
    installed = vllm_version()
    if kind == "vllm" and image_tag not in (None, "vllm") and installed is not None:
        wanted = image_tag.removeprefix("v")
        if installed.rsplit(" ", 1)[-1] != wanted:
            raise InvalidRequestError(
                f"inference_framework_image_tag: vLLM {wanted} is not installed here ({installed} is); "
                "send 'vllm' for it"
            )
    update: dict[str, Any] = {} if kind is None else {"kind": kind}
    if num_shards is not None:
        update["tensor_parallel_size"] = num_shards
    return engine.model_copy(update=update)


def model_config(
    name: str, model: str, engine: EngineSettings, deployment: dict[str, Any], replica_wait_timeout_s: float
) -> ModelConfig:
    """The served model's config; a per_worker above what a replica takes at once, several devices
    on this project's engine, or vLLM where it is not installed are a 400."""
    try:
        config = ModelConfig(
            name=name,
            model=model,
            engine=engine,
            deployment=DeploymentSettings(**deployment),
            replica_wait_timeout_s=replica_wait_timeout_s,
        )
    except ValidationError as exc:
        message = validation_message(list(exc.errors()))
        raise InvalidRequestError(f"per_worker or max_num_seqs: {message}") from None
    try:
        kind = require_engine(config)
    except EngineUnavailableError as exc:
        raise InvalidRequestError(f"inference_framework_image_tag: {exc}") from None
    if kind != "vllm" and num_devices(config) > 1:
        raise InvalidRequestError(
            "gpus and num_shards above 1 need the vLLM engine (inference_framework_image_tag 'vllm'); "
            "this project's engine runs a replica on one device"
        )
    return config


def code_version(config: ModelConfig) -> str:
    """Serve's deployment version: the same for the same model and engine, so a change of scaling
    only is applied in place (no replica restarts); any other change restarts the replicas."""
    identity = config.model_dump_json(include={"model", "engine", "use_chat_template", "request_timeout_s"})
    return hashlib.sha256(identity.encode()).hexdigest()[:16]
