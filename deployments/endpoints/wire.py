"""Wire types of the model-endpoint routes, as the `llmengine` client sends and parses them.

The request bodies are what `Model.create(...)` / `Model.update(...)` post (`request.dict()` of the
client's `CreateLLMEndpointRequest`: 67 keys, most of them vLLM knobs that this engine ignores).
Fields this server cannot honour are refused with a 400 naming them, never silently dropped.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Framework = Literal["deepspeed", "text_generation_inference", "vllm", "lightllm", "tensorrt_llm"]
GpuType = Literal[
    "nvidia-tesla-t4",
    "nvidia-ampere-a10",
    "nvidia-ampere-a100",
    "nvidia-ampere-a100e",
    "nvidia-hopper-h100",
    "nvidia-hopper-h100-1g20gb",
    "nvidia-hopper-h100-3g40gb",
]
Status = Literal["READY", "UPDATE_PENDING", "UPDATE_IN_PROGRESS", "UPDATE_FAILED", "DELETE_IN_PROGRESS"]
Quantity = str | int | float  # "2", 0.5, "500m" (CPUs); "4Gi", 2**30 (bytes)
# The client's closed list has no entry for this project's engine; "vllm" (its default) names both
# engines here, and `inference_framework_image_tag` chooses (docs/engines.md).
FRAMEWORK = "vllm"
MAX_WORKERS = 1024  # replicas of one endpoint
MAX_PER_WORKER = 2**20  # target_ongoing_requests
MAX_GPUS = 64  # per replica
LATEST_TAG = "latest"
# A vLLM release number as an image tag ("0.29.0"), as LLM Engine's vLLM images are tagged
VLLM_VERSION_TAG = re.compile(r"v?([0-9]+\.[0-9]+(\.[0-9]+)?)")
# A DNS-1123-like name: it becomes part of a Serve application and deployment name and of URLs.
NAME_PATTERN = re.compile(r"[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?")


class _EndpointFields(BaseModel):
    """What create and update share. Unknown keys (the client's vLLM knobs) are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    inference_framework_image_tag: str | None = Field(
        None,
        description="The engine: 'llmserve' (this project's), 'vllm' or a vLLM version (vLLM, where its venv "
        "is installed), 'latest' or null = the app's configured default (docs/engines.md).",
    )
    num_shards: int | None = Field(
        None,
        ge=1,
        le=MAX_GPUS,
        description="Devices one replica spans; above 1 on vLLM only (tensor parallel).",
    )
    quantize: Literal["bitsandbytes", "awq"] | None = Field(None, description="Not supported: null.")
    checkpoint_path: str | None = Field(
        None,
        description="An absolute path to a local Hugging Face folder (config.json) under one of the "
        "server's endpoints.checkpoint_roots; refused when none is configured.",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="Prompt + generated tokens per sequence: at most the model's context, and one "
        "sequence must fit the server's KV cache (endpoints.engine.kv_cache_bytes).",
    )
    max_num_seqs: int | None = Field(None, ge=1, description="Sequences decoded together.")
    metadata: dict[str, Any] | None = Field(None, description="Free-form, returned in spec.metadata.")
    post_inference_hooks: list[str] | None = Field(None, description="Not supported: null or empty.")
    cpus: Quantity | None = Field(None, description="CPUs per replica (Ray num_cpus), e.g. 1, 0.5, '500m'.")
    gpus: int | None = Field(
        None, ge=0, le=MAX_GPUS, description="GPUs per replica; above 1 on vLLM only (tensor parallel)."
    )
    memory: Quantity | None = Field(None, description="Memory reserved per replica, e.g. '4Gi'.")
    gpu_type: GpuType | None = Field(None, description="GPU kind (Ray accelerator_type); needs gpus 1.")
    storage: Quantity | None = Field(None, description="Recorded only: Ray does not reserve disk.")
    min_workers: int | None = Field(None, ge=0, le=MAX_WORKERS, description="Serve min_replicas.")
    max_workers: int | None = Field(None, ge=1, le=MAX_WORKERS, description="Serve max_replicas.")
    per_worker: int | None = Field(
        None, ge=1, le=MAX_PER_WORKER, description="Serve target_ongoing_requests per replica."
    )
    labels: dict[str, str] | None = Field(None, description="Free-form, returned in spec.labels.")
    chat_template_override: str | None = Field(None, description="Not supported: null.")
    public_inference: bool | None = Field(None, description="Recorded only.")

    @field_validator("quantize", "chat_template_override")
    @classmethod
    def _unsupported(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("not supported by this server; leave it null")
        return value

    @field_validator("post_inference_hooks")
    @classmethod
    def _no_hooks(cls, hooks: list[str] | None) -> list[str] | None:
        if hooks:
            raise ValueError("post-inference hooks are not supported by this server; leave it null")
        return hooks

    @model_validator(mode="after")
    def _workers_in_order(self) -> _EndpointFields:
        workers = (self.min_workers, self.max_workers)
        if None not in workers and workers[1] < workers[0]:
            raise ValueError(f"max_workers ({workers[1]}) must be at least min_workers ({workers[0]})")
        if self.gpu_type is not None and not self.gpus:
            raise ValueError("gpu_type needs gpus: 1 (a GPU kind for a replica without a GPU)")
        if engine_kind_of(self.inference_framework_image_tag) == "llmserve":
            for field, value in (("gpus", self.gpus), ("num_shards", self.num_shards)):
                if value is not None and value > 1:
                    raise ValueError(f"{field} above 1 needs the vLLM engine; llmserve runs on one device")
        return self


class CreateLLMEndpointRequest(_EndpointFields):
    """Body of `POST /v1/llm/model-endpoints` (`Model.create`)."""

    name: str = Field(description="Endpoint name, used as model_endpoint_name.")
    model_name: str = Field(min_length=1, description="Model zoo name, or a label with checkpoint_path.")
    source: Literal["hugging_face"] = Field("hugging_face", description="Weight source.")
    inference_framework: Framework = Field(FRAMEWORK, description="Must be vllm, see FRAMEWORK.")
    endpoint_type: Literal["streaming"] = Field("streaming", description="Streaming and sync routes.")
    nodes_per_worker: int | None = Field(None, ge=1, le=1, description="Nodes per replica: 1.")
    min_workers: int = Field(0, ge=0, le=MAX_WORKERS, description="Serve min_replicas; 0 scales to zero.")
    max_workers: int = Field(1, ge=1, le=MAX_WORKERS, description="Serve max_replicas.")
    per_worker: int = Field(
        2, ge=1, le=MAX_PER_WORKER, description="Serve target_ongoing_requests per replica."
    )

    @field_validator("name")
    @classmethod
    def _valid_name(cls, name: str) -> str:
        if not NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"{name!r} is not a valid endpoint name: 1 to 63 characters of a-z, 0-9, '-', '.', '_', "
                "starting and ending with a letter or digit"
            )
        return name

    @field_validator("inference_framework")
    @classmethod
    def _this_engine(cls, framework: str) -> str:
        if framework != FRAMEWORK:
            raise ValueError(
                f"{framework!r} is not available; supported: {FRAMEWORK!r} (the client's name for both "
                "engines here: inference_framework_image_tag chooses 'llmserve' or 'vllm')"
            )
        return framework


class UpdateLLMEndpointRequest(_EndpointFields):
    """Body of `PUT /v1/llm/model-endpoints/{name}` (`Model.update`): null = unchanged."""

    model_name: str | None = Field(None, description="Must stay the same (delete and create to change).")
    source: Literal["hugging_face"] | None = Field(None, description="Weight source.")
    endpoint_type: Literal["streaming"] | None = Field(None, description="Streaming and sync routes.")


class CreateLLMEndpointResponse(BaseModel):
    endpoint_creation_task_id: str = Field(description="Id of this create (or update) operation.")


class UpdateLLMEndpointResponse(CreateLLMEndpointResponse):
    pass


class DeleteLLMEndpointResponse(BaseModel):
    deleted: bool = Field(description="True: the endpoint is gone; its replicas drain in the background.")


class DeploymentState(BaseModel):
    min_workers: int
    max_workers: int
    per_worker: int
    concurrent_requests_per_worker: int = Field(description="Serve max_ongoing_requests per replica.")
    available_workers: int | None = Field(None, description="Replicas running now.")
    unavailable_workers: int | None = Field(None, description="Replicas starting or stopping now.")


class ResourceState(BaseModel):
    cpus: Quantity
    gpus: int
    memory: Quantity = Field(description="Bytes reserved per replica; 0 = none.")
    gpu_type: GpuType | None = None
    storage: Quantity | None = None
    nodes_per_worker: int = 1
    optimize_costs: bool | None = None


class EndpointSpec(BaseModel):
    """`spec` of `Model.get` (the client's `GetModelEndpointResponse`), for runtime endpoints."""

    id: str
    name: str
    endpoint_type: Literal["streaming"] = "streaming"
    destination: str = Field(description="<Serve application>/<deployment>.")
    deployment_name: str
    metadata: dict[str, Any] = Field(description="The request's metadata, plus status_reason.")
    bundle_name: str = Field(description="The model: zoo name or checkpoint folder.")
    status: Status
    labels: dict[str, str] = Field(default_factory=dict)
    created_by: str = "llmserve"
    created_at: datetime
    last_updated_at: datetime
    deployment_state: DeploymentState
    resource_state: ResourceState
    public_inference: bool | None = True


def engine_kind_of(image_tag: str | None) -> Literal["llmserve", "vllm"] | None:
    """The engine an `inference_framework_image_tag` asks for; None = the configured default."""
    if image_tag is None or image_tag == LATEST_TAG:
        return None
    if image_tag in ("llmserve", "vllm") or VLLM_VERSION_TAG.fullmatch(image_tag):
        return "llmserve" if image_tag == "llmserve" else "vllm"
    raise ValueError(
        f"inference_framework_image_tag: {image_tag[:100]!r} is not one of 'llmserve', 'vllm', a vLLM "
        f"version (e.g. '0.29.0') or {LATEST_TAG!r}"
    )
