"""The per-model deployment: owns one engine and its tokenizer; prompts in, token deltas out.

`ModelServer` is a plain class (app.py wraps it with `serve.deployment`), so tests can also build it
directly. Its engine comes from an `EngineFactory`, so HTTP-layer tests can inject a small fake one.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from deployments.config import ModelConfig
from engine.async_engine import EngineStats
from engine.errors import InvalidRequestError
from engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, TokenLogProb

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What the ingress asks one model for: a prompt and validated sampling settings."""

    request_id: str
    prompt: str
    params: SamplingParams


@dataclass(frozen=True, slots=True)
class CompletionResult:
    """A whole completion, aggregated from the engine's deltas."""

    request_id: str
    text: str
    num_prompt_tokens: int
    num_completion_tokens: int
    tokens: tuple[TokenLogProb, ...] | None  # set when log probs were asked for
    finish_reason: FinishReason | None


class Engine(Protocol):
    """What the server needs of an engine: `engine.async_engine.AsyncEngine` or a test fake."""

    def check_request(self, num_prompt_tokens: int, max_new_tokens: int) -> None: ...
    def add_request(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]: ...
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

    engine = AsyncEngine.from_loader(load, engine_config, device)
    use_chat_template = (
        spec.use_chat_template if config.use_chat_template is None else config.use_chat_template
    )
    if use_chat_template and not getattr(engine.tokenizer, "chat_template", None):
        engine.shutdown()
        raise ValueError(
            f"model {config.name!r}: use_chat_template is set but its tokenizer has no chat template"
        )
    return ServingModel(engine=engine, tokenizer=engine.tokenizer, use_chat_template=use_chat_template)


class ModelServer:
    """One model behind Serve: tokenizes, checks the context limit, streams the engine's deltas."""

    def __init__(self, model_config: ModelConfig, engine_factory: EngineFactory | None = None) -> None:
        self._config = model_config
        serving = (engine_factory or load_serving_model)(model_config)
        self._engine = serving.engine
        self._tokenizer = serving.tokenizer
        self._use_chat_template = serving.use_chat_template
        logger.info("model %s (%s) ready", model_config.name, model_config.model)

    def encode(self, prompt: str) -> list[int]:
        """Prompt token ids: the prompt as a user turn of the chat template, or the raw prompt."""
        if not self._use_chat_template:
            return list(self._tokenizer(prompt).input_ids)
        encoded = self._tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
        return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)

    def _start(self, request: ModelRequest) -> AsyncIterator[TokenDelta]:
        prompt_ids = self.encode(request.prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty after tokenization")
        self._engine.check_request(len(prompt_ids), request.params.max_new_tokens)
        return self._engine.add_request(
            GenerationRequest(request.request_id, tuple(prompt_ids), request.params)
        )

    async def generate_stream(self, request: ModelRequest) -> AsyncIterator[TokenDelta]:
        """Deltas as the engine produces them; use with `handle.options(stream=True)`."""
        deltas = self._start(request)
        is_finished = False
        try:
            async for delta in deltas:
                is_finished = delta.is_finished
                yield delta
        finally:
            # Serve cancels this generator when the caller goes away: free the engine's slot now.
            if not is_finished:
                self._engine.abort(request.request_id)
            await _close(deltas)

    async def generate(self, request: ModelRequest) -> CompletionResult:
        """The whole completion at once (sync route)."""
        deltas = self._start(request)
        texts: list[str] = []
        tokens: list[TokenLogProb] = []
        last: TokenDelta | None = None
        try:
            async for last in deltas:
                texts.append(last.text)
                if last.token is not None:
                    tokens.append(last.token)
        finally:
            if last is None or not last.is_finished:
                self._engine.abort(request.request_id)
            await _close(deltas)
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
        return True

    async def check_health(self) -> None:
        """Serve's periodic health probe: fails once the engine's thread has stopped."""
        self._engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "_engine", None)
        if engine is not None:
            engine.shutdown()


async def _close(iterator: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # "already running": closed from elsewhere
            await aclose()
