"""The per-model deployment: owns one engine and its tokenizer; prompts in, token deltas out.

`ModelServer` is a plain class (app.py wraps it with `serve.deployment`), so tests can also build it
directly. Its engine comes from an `EngineFactory`, so HTTP-layer tests can inject a small fake one.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.config import ModelConfig
from deployments.metrics import ModelMetrics
from deployments.replica_logging import LOADING_LOGGER, forward_library_logs_in_replica
from deployments.request_validation import RequestValidator
from deployments.served_stream import DeltaSource, ServedStream, status_code_of
from deployments.wire import ChatMessage, CompletionResult, ModelRequest
from engine.types import (
    EngineStats,
    GenerationRequest,
    TokenDelta,
    TokenLogProb,
)

logger = logging.getLogger(LOADING_LOGGER)  # forwarded to Serve's replica log (replica_logging.py)


class Engine(Protocol):
    """What the server needs of an engine: this project's `engine.async_engine.AsyncEngine`, vLLM's
    (deployments/engines/vllm_engine.py) or a test fake. Requests arrive validated (request_validation.py)."""

    def add_request(self, request: GenerationRequest) -> DeltaSource: ...
    def abort(self, request_id: str) -> None: ...
    def stats(self) -> EngineStats: ...
    def check_health(self) -> None: ...
    def shutdown(self) -> None: ...


@dataclass(slots=True)
class ServingModel:
    """A started engine with the tokenizer that turns prompts into its token ids."""

    engine: Engine
    tokenizer: Any  # a transformers tokenizer, or any object with the same __call__/apply_chat_template
    use_chat_template: bool
    max_model_len: int | None = None  # prompt + generated tokens; None: the engine's stats() say
    vocab_size: int | None = None  # None: unknown (a test fake); top_k is then not clamped to it


EngineFactory = Callable[[ModelConfig], ServingModel]


def load_serving_model(config: ModelConfig) -> ServingModel:
    """The default factory: resolve the model in the zoo, then load it on the engine's own thread."""
    from engine.async_engine import AsyncEngine
    from engine.device import resolve_device, resolve_dtype
    from model_zoo import resolve
    from model_zoo.loader import load_model

    spec = resolve(config.model, name=config.name)
    device = resolve_device(config.engine.device)
    dtype = resolve_dtype(config.engine.dtype, device)
    engine_config = config.engine.to_engine_config(
        context_length=spec.context_length, device=str(device), dtype=str(dtype).removeprefix("torch.")
    )

    def load():
        loaded = load_model(spec, dtype=dtype, device=device)
        return loaded.model, loaded.tokenizer

    return serving_model(AsyncEngine.from_loader(load, engine_config, device), spec, config)


def serving_model(engine: Any, spec: Any, config: ModelConfig) -> ServingModel:
    """A started engine (this project's or vLLM's: both expose `tokenizer`, `max_model_len` and
    `vocab_size`) as a ServingModel; the config's `use_chat_template` wins over the zoo entry's. An
    engine whose tokenizer has no chat template while one is asked for is shut down: ValueError."""
    use_chat_template = (
        spec.use_chat_template if config.use_chat_template is None else config.use_chat_template
    )
    if use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
        engine.shutdown()
        raise ValueError(
            f"model {config.name!r}: use_chat_template is set but its tokenizer has no chat template"
        )
    return ServingModel(
        engine=engine,
        tokenizer=engine.tokenizer,
        use_chat_template=use_chat_template,
        max_model_len=engine.max_model_len,
        vocab_size=engine.vocab_size,
    )


class ModelServer:
    """One model behind Serve: tokenizes, checks the context limit, streams the engine's deltas."""

    def __init__(self, model_config: ModelConfig, engine_factory: EngineFactory | None = None) -> None:
        self._config = model_config
        forward_library_logs_in_replica()  # model_zoo's and engine's loading messages into this replica's log
        logger.info("model %s: loading %s", model_config.name, model_config.model)
        start_s = time.perf_counter()
        serving = (engine_factory or load_serving_model)(model_config)
        self._engine = serving.engine
        self._validator = RequestValidator(
            model_name=model_config.name,
            tokenizer=serving.tokenizer,
            use_chat_template=serving.use_chat_template,
            max_model_len=serving.max_model_len or self._engine.stats().max_model_len,
            vocab_size=serving.vocab_size,
        )
        self._metrics = ModelMetrics(model_config.name)
        self._coalesce_ms = model_config.stream_coalesce_ms
        self._max_num_seqs = model_config.engine.max_num_seqs
        load_s = time.perf_counter() - start_s
        logger.info("model %s (%s) ready in %.1f s", model_config.name, model_config.model, load_s)

    def encode(self, prompt: str, *, is_raw: bool = False) -> list[int]:
        """Prompt token ids: the prompt as a user turn of the chat template, or the raw prompt."""
        return self._validator.encode(prompt, is_raw=is_raw)

    def encode_chat(self, messages: Sequence[ChatMessage], field: str = "messages") -> list[int]:
        """Token ids of a conversation through the chat template, ending with the assistant's turn."""
        return self._validator.encode_chat(messages, field)

    def _open(self, request: ModelRequest) -> ServedStream:
        """The request's stream: queued in the engine, timed and counted in this model's metrics."""
        self._metrics.ensure_stats_task(self._engine.stats)
        timer = self._metrics.start_request()
        try:  # validated once, here; the engine only asserts (a full queue, a dead engine still raise)
            source = self._engine.add_request(self._validator.validate(request))
        except Exception as exc:
            timer.on_error(status_code_of(exc))
            raise
        return ServedStream(
            source,
            abort=lambda: self._engine.abort(request.request_id),
            timer=timer,
            timeout_s=self._config.request_timeout_s,
            interval_s=self._coalesce_interval_s,
        )

    def _coalesce_interval_s(self) -> float:
        """The least time between two messages of one stream: `stream_coalesce_ms` scaled by how full
        the batch is, so a lone stream gets each token at once and a full batch sends about one
        message per `stream_coalesce_ms` per request."""
        if self._coalesce_ms <= 0:
            return 0.0
        fullness = min(1.0, self._engine.stats().num_running / self._max_num_seqs)
        return self._coalesce_ms * fullness / 1000

    async def generate_stream(self, request: ModelRequest) -> AsyncIterator[list[TokenDelta]]:
        """Chunks of deltas as the engine produces them (one Serve stream item each); use with
        `handle.options(stream=True)`. Each chunk has at least one delta; the last ends with the
        finished one."""
        stream = self._open(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:  # Serve cancels this generator when the caller goes away: free the engine's slot now.
            await stream.aclose()

    async def generate(self, request: ModelRequest) -> CompletionResult:
        """The whole completion at once (sync route): one wake-up per engine step at most."""
        stream = self._open(request)
        texts: list[str] = []
        tokens: list[TokenLogProb] = []
        last: TokenDelta | None = None
        try:
            while chunk := await stream.next_chunk(linger_s=self._config.request_timeout_s):
                for last in chunk:
                    texts.append(last.text)
                    if last.token is not None:
                        tokens.append(last.token)
        finally:
            await stream.aclose()
        return CompletionResult(
            request_id=request.request_id,
            text="".join(texts),
            num_prompt_tokens=last.num_prompt_tokens if last else 0,
            num_completion_tokens=last.num_completion_tokens if last else 0,
            tokens=tuple(tokens) if request.params.return_log_probs else None,
            finish_reason=last.finish_reason if last else None,
        )

    async def stats(self) -> EngineStats:
        return self._engine.stats()

    async def ready(self) -> bool:
        """True once the replica loaded its model (Serve holds the call until then); EngineDeadError
        once its engine has stopped, so /readyz reports the model unavailable (503)."""
        self._engine.check_health()
        return True

    async def pid(self) -> int:
        """This replica's process id (through a handle, not HTTP): tests check that bad input leaves
        the same process serving."""
        return os.getpid()

    async def check_health(self) -> None:
        """Serve's periodic health probe: fails once the engine's thread has stopped."""
        self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()
