"""Configuration of the served application: one `ModelConfig` per model, gathered in an `AppConfig`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from deployments.batch.config import BatchSettings
from deployments.limits import AuthSettings, LimitSettings
from engine.types import EngineConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
# Default autoscaling target per replica, as a fraction of the engine's batch (max_num_seqs); see
# DeploymentSettings.with_engine_defaults. Ray Serve LLM's default (1e9) never scales up.
TARGET_BATCH_FRACTION = 0.75
_ENGINE_DEFAULTS = EngineConfig()
# Outside /tmp so that records outlive a reboot; `~` is the home of the user that runs `serve run`.
DEFAULT_STATE_ROOT = "~/.local/state/llmserve"


class ConfigError(ValueError):
    """A configuration file or `args` dict is invalid; the message says which and why."""


EngineKind = Literal["auto", "llmserve", "vllm"]
ENGINE_KINDS: tuple[str, ...] = ("auto", "llmserve", "vllm")


class EngineSettings(BaseModel):
    """The engine's knobs; they mirror `engine.types.EngineConfig`. `kind` chooses the engine
    (docs/engines.md); `engine: vllm` in YAML is short for `engine: {kind: vllm}`."""

    model_config = ConfigDict(extra="forbid")

    kind: EngineKind = Field(
        "auto",
        description="Which engine runs the model: 'llmserve' (this project's), 'vllm' (vLLM's AsyncLLM, in "
        "the venv `llmserve vllm-env` builds), or 'auto': vLLM when the replica has a GPU "
        "(ray_actor_options.num_gpus > 0) and the vLLM venv exists, this project's engine otherwise.",
    )
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="vLLM only: GPUs one replica shards the model over, each in its own bundle of the "
        "replica's placement group (docs/engines.md).",
    )
    vllm_args: dict[str, Any] = Field(
        default_factory=dict,
        description="vLLM only: more keyword arguments of vLLM's AsyncEngineArgs (gpu_memory_utilization, "
        "enforce_eager, quantization...); they win over the ones derived from the knobs here.",
    )
    max_num_seqs: int = Field(_ENGINE_DEFAULTS.max_num_seqs, ge=1, description="Sequences decoded together.")
    max_model_len: int | None = Field(
        None, ge=1, description="Prompt + generated tokens per sequence; null = the model's context length."
    )
    max_num_batched_tokens: int = Field(
        _ENGINE_DEFAULTS.max_num_batched_tokens, ge=1, description="Tokens per forward pass."
    )
    kv_cache_bytes: int = Field(
        _ENGINE_DEFAULTS.kv_cache_bytes, ge=1, description="Memory budget of the KV cache."
    )
    block_size: int = Field(_ENGINE_DEFAULTS.block_size, ge=1, description="Tokens per KV-cache block.")
    dtype: Literal["float32", "bfloat16", "float16", "auto"] = Field(
        _ENGINE_DEFAULTS.dtype, description="Weight and activation dtype."
    )
    device: str = Field(
        _ENGINE_DEFAULTS.device, description='"auto" (cuda if available else cpu), "cpu", "cuda".'
    )
    num_threads: int | None = Field(
        _ENGINE_DEFAULTS.num_threads, ge=1, description="Torch threads on CPU; null = every usable core."
    )
    max_waiting: int = Field(
        _ENGINE_DEFAULTS.max_waiting, ge=1, description="Requests queued in the engine before 429s."
    )
    refill_wait_ms: float = Field(
        _ENGINE_DEFAULTS.refill_wait_ms,
        ge=0,
        le=1000,
        description="After a step that finished requests, how long the engine may wait for the requests "
        "that replace them (a client's next turn) before its next step, while recent finishes were "
        "followed by new requests within this time; 0 (the default) = never wait; the served SmolLM2 "
        "config sets 80 (docs/engine.md).",
    )
    enable_prefix_caching: bool = Field(
        _ENGINE_DEFAULTS.enable_prefix_caching,
        description="Reuse the KV blocks of prompt prefixes that requests share (docs/kv_cache.md).",
    )
    native_attention: bool = Field(
        _ENGINE_DEFAULTS.native_attention,
        description="CPU attention (decode and prefill) in the engine's C kernel; false = torch's attention.",
    )
    native_linear: bool = Field(
        _ENGINE_DEFAULTS.native_linear,
        description="CPU bf16 matrix products in the engine's C kernel (CPUs with AVX512-BF16 or "
        "AVX2 + FMA; on AMX tiles where the CPU has them); false = oneDNN's (torch's where oneDNN has "
        "no bf16 path).",
    )
    int8_weights: bool = Field(
        _ENGINE_DEFAULTS.int8_weights,
        description="bf16 CPU products with int8 weights and int8 rows (a scale per group of 32 "
        "inputs) in the engine's C kernel: about twice the bf16 kernel's speed on CPUs with "
        "AVX512-VNNI and no bf16 dot product, slower on CPUs with AMX, at a small cost in accuracy "
        "(docs/engine.md).",
    )
    int8_lm_head: bool = Field(
        _ENGINE_DEFAULTS.int8_lm_head,
        description="With int8_weights, the lm head's product in int8 too (it stays bf16 otherwise): "
        "a decode step ~0.9x the time again, greedy text departing from bf16's a little sooner "
        "(docs/engine.md).",
    )
    native_norm: bool = Field(
        _ENGINE_DEFAULTS.native_norm,
        description="The fast forward's bf16 CPU RMSNorms in the engine's C kernel (the same bits as "
        "torch's operations, checked at load); false = torch's operations.",
    )
    native_rotary: bool = Field(
        _ENGINE_DEFAULTS.native_rotary,
        description="The fast forward's bf16 CPU rotary embedding and KV-cache write of Llama-like layers "
        "in one C call a layer (the same bits as torch's operations, checked at load); false = torch's "
        "operations.",
    )
    native_argmax: bool = Field(
        _ENGINE_DEFAULTS.native_argmax,
        description="Greedy picks over CPU logits in the engine's C kernel (the index torch's argmax "
        "gives, ~5x faster); false = torch's argmax.",
    )
    native_silu: bool = Field(
        _ENGINE_DEFAULTS.native_silu,
        description="The fast forward's SiLU-gated MLPs (Llama-like) compute SiLU and the multiply "
        "inside the gate/up product's C kernel (bf16 on the CPU; the same bits as torch's operations, "
        "checked at load); false = torch's operations.",
    )
    native_residual: bool = Field(
        _ENGINE_DEFAULTS.native_residual,
        description="The fast forward's Llama-like layers add their attention-output and down products "
        "into the residual stream inside the products' C kernel (bf16 on the CPU, with `native_rotary`; "
        "the same bits as torch's add, checked at load); false = torch's adds.",
    )
    native_layers: bool = Field(
        _ENGINE_DEFAULTS.native_layers,
        description="The fast forward's Llama-like layers that run every part in C (bf16 on the CPU) "
        "run as one fixed sequence of C calls with their weights' pointers read at load (the same C "
        "functions and bits, less Python a layer); false = each kernel through its Python wrapper.",
    )
    huge_pages: bool = Field(
        _ENGINE_DEFAULTS.huge_pages,
        description="On the CPU, the bf16 kernel's packed weights and the KV cache live in memory advised "
        "for transparent huge pages (2 MiB; where Linux gives them: THP `always` or `madvise`), "
        "fewer TLB misses a step; false = ordinary pages. Same results either way.",
    )
    fast_forward: bool = Field(
        _ENGINE_DEFAULTS.fast_forward,
        description="Llama, Mistral and Gemma 3 models step through the engine's own forward (same "
        "operations and results as transformers' code, less Python); false = transformers' modules.",
    )

    @model_validator(mode="before")
    @classmethod
    def _kind_shorthand(cls, value: Any) -> Any:
        return {"kind": value} if isinstance(value, str) else value

    def to_engine_config(self, *, context_length: int | None = None, **overrides: Any) -> EngineConfig:
        """This project's engine config; `max_model_len` defaults to the model's `context_length`."""
        values = self.model_dump(exclude={"kind", "tensor_parallel_size", "vllm_args"})
        values["max_model_len"] = self.max_model_len or context_length or _ENGINE_DEFAULTS.max_model_len
        values.update(overrides)
        return EngineConfig(**values)


# A stopping replica (a scale-down, a deleted endpoint, Ctrl-C) waits this long between checks of its
# requests in flight before it exits; Serve's default, 2 s, made every stop take at least 2 s.
DRAIN_CHECK_PERIOD_S = 0.2
DrainCheckPeriod = Annotated[
    float,
    Field(
        gt=0,
        le=60,
        description="How often a stopping replica checks whether its requests in flight have ended (Serve's "
        "graceful_shutdown_wait_loop_s; Serve's own default, 2 s, makes every stop take at least 2 s).",
    ),
]


class DeploymentSettings(BaseModel):
    """Ray Serve options of one model's deployment."""

    model_config = ConfigDict(extra="forbid")

    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 1}, description="Resources of each replica (num_cpus, num_gpus)."
    )
    max_ongoing_requests: int = Field(64, ge=1, description="Requests one replica handles at once.")
    max_queued_requests: int = Field(
        128,
        ge=-1,
        description="Requests queued per caller (ingress replica) before an immediate 429; -1 = no limit.",
    )
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="Serve autoscaling (min_replicas, max_replicas, target_ongoing_requests...)."
    )
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count; only without autoscaling.")
    max_replicas_per_node: int | None = Field(
        None,
        ge=1,
        description="At most this many replicas of the model on one node; null = 1 for this project's engine "
        "on CPU with engine.num_threads null (its threads use every core of the node, so a second replica "
        "there would only split them), no limit otherwise.",
    )
    health_check_period_s: float = Field(
        10.0, gt=0, le=3600, description="How often Serve asks a replica whether its engine is alive."
    )
    graceful_shutdown_wait_loop_s: DrainCheckPeriod = DRAIN_CHECK_PERIOD_S

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentSettings:
        if self.autoscaling_config is not None and self.num_replicas is not None:
            raise ValueError("set either num_replicas or autoscaling_config, not both")
        return self

    def to_options(self) -> dict[str, Any]:
        """Keyword arguments of `Deployment.options`."""
        return self.model_dump(exclude_none=True)

    def with_engine_defaults(self, max_num_seqs: int, max_waiting: int) -> DeploymentSettings:
        """Fill what the user left out from the engine's batch size (docs/models.md, "Autoscaling").

        max_ongoing_requests = one full batch running + at most one batch waiting in the engine, so Serve
        keeps the rest in the handle's queue (where autoscaling counts it and any new replica can take it);
        target_ongoing_requests = TARGET_BATCH_FRACTION of a batch, so scaling starts before queueing.
        """
        update: dict[str, Any] = {}
        if "max_ongoing_requests" not in self.model_fields_set:
            update["max_ongoing_requests"] = max_num_seqs + min(max_waiting, max_num_seqs)
        max_ongoing = update.get("max_ongoing_requests", self.max_ongoing_requests)
        autoscaling = self.autoscaling_config
        if autoscaling is not None and "target_ongoing_requests" not in autoscaling:
            # Never above max_ongoing_requests: a replica can never hold more than that.
            target = max(1, min(round(max_num_seqs * TARGET_BATCH_FRACTION), max_ongoing))
            update["autoscaling_config"] = {**autoscaling, "target_ongoing_requests": target}
        target = (update.get("autoscaling_config") or autoscaling or {}).get("target_ongoing_requests")
        if target is not None and target > max_ongoing:
            raise ValueError(
                f"autoscaling_config.target_ongoing_requests ({target}) exceeds max_ongoing_requests "
                f"({max_ongoing}): a replica could never reach its target, so it would never scale up"
            )
        return self.model_copy(update=update) if update else self


class ModelConfig(BaseModel):
    """One served model: its name on the API, its weights, its engine and its deployment."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, description="Served name: the `model_endpoint_name` clients use.")
    model: str = Field(min_length=1, description="Model zoo name or local Hugging Face folder.")
    use_chat_template: bool | None = Field(
        None, description="Wrap prompts in the chat template as a user turn; null = the zoo's default."
    )
    engine: EngineSettings = Field(default_factory=EngineSettings, description="Engine knobs.")
    deployment: DeploymentSettings = Field(default_factory=DeploymentSettings, description="Serve options.")
    request_timeout_s: float = Field(
        600.0, gt=0, description="Longest time one generation may take; then it is aborted (504/error event)."
    )
    stream_coalesce_ms: float = Field(
        250.0,
        ge=0,
        le=1000,
        description=(
            "Stream messages (replica to ingress to client) carry the tokens of up to this many "
            "milliseconds when the batch is full, scaled down with the batch: a lone stream gets every "
            "token at once, a full batch sends about one message per request per interval (at the "
            "first engine step after it). 0 = one message per token. The first token is never held. "
            "See docs/performance.md."
        ),
    )
    replica_wait_timeout_s: float = Field(
        300.0,
        gt=0,
        description="Longest wait for a replica to take a request (cold start from 0 replicas); then 503.",
    )

    @model_validator(mode="after")
    def _deployment_defaults(self) -> ModelConfig:
        self.deployment = self.deployment.with_engine_defaults(
            self.engine.max_num_seqs, self.engine.max_waiting
        )
        return self


class IngressSettings(BaseModel):
    """Ray Serve options of the ingress (HTTP) deployment."""

    model_config = ConfigDict(extra="forbid")

    ray_actor_options: dict[str, Any] = Field(
        default_factory=lambda: {"num_cpus": 0.1}, description="Resources of each ingress replica."
    )
    max_ongoing_requests: int = Field(1024, ge=1, description="Requests one ingress replica handles at once.")
    num_replicas: int = Field(1, ge=1, description="Ingress replicas.")
    graceful_shutdown_wait_loop_s: DrainCheckPeriod = DRAIN_CHECK_PERIOD_S

    def to_options(self) -> dict[str, Any]:
        return self.model_dump()


class EndpointSettings(BaseModel):
    """Defaults and limits of the endpoints that `Model.create` adds to a running app."""

    model_config = ConfigDict(extra="forbid")

    engine: EngineSettings = Field(
        default_factory=EngineSettings,
        description="Engine knobs of a runtime endpoint; the request's max_model_len / max_num_seqs win.",
    )
    default_num_cpus: float = Field(
        0.1,
        gt=0,
        description="num_cpus of a replica when the request gives no `cpus`: 0.1 fits a third model on the "
        "default app on 2 CPUs (0.9 + 0.9 + ingress 0.1 + 0.1). It reserves scheduling room only.",
    )
    start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="A create or update with no running replica after this long is UPDATE_FAILED.",
    )
    drain_timeout_s: float = Field(
        60.0, gt=0, description="On delete, how long a replica may finish its in-flight requests."
    )
    max_start_attempts: int = Field(
        3, ge=1, description="Replica starts that fail in a row before a change is UPDATE_FAILED (Serve: 20)."
    )
    check_node_resources: bool = Field(
        True,
        description="Refuse at once (UPDATE_FAILED) a replica that no node of the cluster could ever hold; "
        "turn off on a cluster whose autoscaler adds nodes of new kinds.",
    )
    replica_wait_timeout_s: float = Field(
        300.0, gt=0, description="Longest wait of a request for a replica (cold start from 0), then 503."
    )
    checkpoint_roots: list[str] = Field(
        default_factory=list,
        description="Local folders under which a create's `checkpoint_path` may lie (symlinks resolved, "
        "no '..'); none = `checkpoint_path` is refused (400) and only zoo models can be created.",
    )


class AppConfig(BaseModel):
    """The `args:` of serve_config.yaml: the models (inline or YAML paths) and the ingress options."""

    model_config = ConfigDict(extra="forbid")

    models: list[ModelConfig] = Field(
        min_length=1, description="Served models, or paths to their YAML files."
    )
    ingress: IngressSettings = Field(default_factory=IngressSettings, description="Ingress options.")
    limits: LimitSettings = Field(default_factory=LimitSettings, description="What one request may ask for.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys; none = open.")
    endpoints: EndpointSettings = Field(
        default_factory=EndpointSettings, description="Endpoints created at runtime (docs/endpoints.md)."
    )
    batch: BatchSettings = Field(default_factory=BatchSettings, description="Batch jobs (docs/batch.md).")
    state_root: str = Field(
        DEFAULT_STATE_ROOT,
        min_length=1,
        description="Folder or fsspec URL (file://, s3://...) where the app keeps the records it must not "
        "lose across restarts (runtime endpoints: docs/endpoints.md). Shared storage on multi-node clusters.",
    )

    @field_validator("models", mode="before")
    @classmethod
    def _load_model_files(cls, models: Any) -> Any:
        if not isinstance(models, list):
            return models
        return [load_yaml(m) if isinstance(m, str | Path) else m for m in models]

    @model_validator(mode="after")
    def _unique_names(self) -> AppConfig:
        names = [m.name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"model names must be unique; repeated: {', '.join(duplicates)}")
        return self


def find_file(path: str | Path) -> Path:
    """`path` as given, or relative to the current directory, or relative to the repository root."""
    candidates = [Path(path).expanduser()]
    if not candidates[0].is_absolute():
        candidates.append(REPO_ROOT / path)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ConfigError(f"config file {str(path)!r} not found (looked in {Path.cwd()} and {REPO_ROOT})")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML file found by `find_file`."""
    found = find_file(path)
    try:
        data = yaml.safe_load(found.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read {found}: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"{found} must hold a mapping, not {type(data).__name__}")
    return data


def load_model_config(path: str | Path) -> ModelConfig:
    """A `ModelConfig` from its YAML file."""
    try:
        return ModelConfig.model_validate(load_yaml(path))
    except ValidationError as exc:
        raise ConfigError(f"invalid model config {path}: {exc}") from exc


def parse_app_config(args: dict[str, Any]) -> AppConfig:
    """Validate serve_config.yaml's `args:`; raises ConfigError with every problem listed."""
    try:
        return AppConfig.model_validate(args)
    except ValidationError as exc:
        raise ConfigError(f"invalid application config: {exc}") from exc
