"""The per-model deployment: owns one engine and its tokenizer; prompts in, token deltas out.

`ModelServer` is a plain class (app.py wraps it with `serve.deployment`), so tests can also build it
directly. Its engine comes from an `EngineFactory`, so HTTP-layer tests can inject a small fake one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jinja2

from deployments.config import ModelConfig
from deployments.metrics import ModelMetrics, RequestTimer
from deployments.protocol.bounds import check_unicode
from deployments.replica_logging import forward_library_logs_in_replica
from engine.errors import InvalidRequestError, RequestTimeoutError, ServingError
from engine.types import (
    EngineStats,
    FinishReason,
    GenerationRequest,
    SamplingParams,
    TokenDelta,
    TokenLogProb,
)

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One turn of a conversation, as the chat template reads it."""

    role: str  # "system" | "user" | "assistant"
    content: str


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """What the ingress asks one model for: a prompt or a conversation, and validated sampling settings.

    A text prompt goes through the chat template when the model's config says so (the LLM Engine
    routes), or never with `is_raw_prompt` (OpenAI's /v1/completions). A conversation always does.
    """

    request_id: str
    prompt: str | tuple[ChatMessage, ...]
    params: SamplingParams
    is_raw_prompt: bool = False
    # True: generate up to the context limit (OpenAI chat without max_tokens); params.max_new_tokens unused.
    is_max_tokens_auto: bool = False


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
        forward_library_logs_in_replica()  # model_zoo's and engine's loading messages into this replica's log
        logger.info("model %s: loading %s", model_config.name, model_config.model)
        start_s = time.perf_counter()
        serving = (engine_factory or load_serving_model)(model_config)
        self._engine = serving.engine
        self._tokenizer = serving.tokenizer
        self._use_chat_template = serving.use_chat_template
        self._metrics = ModelMetrics(model_config.name)
        load_s = time.perf_counter() - start_s
        logger.info("model %s (%s) ready in %.1f s", model_config.name, model_config.model, load_s)

    def encode(self, prompt: str, *, is_raw: bool = False) -> list[int]:
        """Prompt token ids: the prompt as a user turn of the chat template, or the raw prompt."""
        if is_raw or not self._use_chat_template:
            check_unicode(prompt, "prompt")
            return list(self._tokenizer(prompt).input_ids)
        return self.encode_chat([ChatMessage(role="user", content=prompt)], field="prompt")

    def encode_chat(self, messages: Sequence[ChatMessage], field: str = "messages") -> list[int]:
        """Token ids of a conversation through the chat template, ending with the assistant's turn."""
        if not getattr(self._tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self._config.name} has no chat template; use /v1/completions")
        for i, message in enumerate(messages):
            check_unicode(message.content, field if field == "prompt" else f"{field}.{i}.content")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            encoded = self._tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as exc:  # e.g. Gemma's raise_exception on a system turn
            raise InvalidRequestError(
                f"{field}: the chat template of model {self._config.name} refused the conversation: {exc}"
            ) from None
        # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
        return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)

    def _start(self, request: ModelRequest) -> AsyncIterator[TokenDelta]:
        if isinstance(request.prompt, str):
            prompt_ids = self.encode(request.prompt, is_raw=request.is_raw_prompt)
        else:
            prompt_ids = self.encode_chat(request.prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty after tokenization")
        params = request.params
        if request.is_max_tokens_auto:  # the room the context leaves; at least 1, so too long still fails
            room = self._engine.stats().max_model_len - len(prompt_ids)
            params = dataclasses.replace(params, max_new_tokens=max(room, 1))
        self._engine.check_request(len(prompt_ids), params.max_new_tokens)
        deltas = self._engine.add_request(GenerationRequest(request.request_id, tuple(prompt_ids), params))
        return _with_deadline(deltas, self._config.request_timeout_s)

    def _open(self, request: ModelRequest) -> AsyncIterator[TokenDelta]:
        """`_start`, timed and counted in this model's metrics."""
        self._metrics.ensure_stats_task(self._engine.stats)
        timer = self._metrics.start_request()
        try:
            deltas = self._start(request)
        except Exception as exc:
            timer.on_error(_status_code(exc))
            raise
        return _timed(deltas, timer)

    async def generate_stream(self, request: ModelRequest) -> AsyncIterator[TokenDelta]:
        """Deltas as the engine produces them; use with `handle.options(stream=True)`."""
        deltas = self._open(request)
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
        deltas = self._open(request)
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


def _status_code(exc: Exception) -> int:
    return exc.status_code if isinstance(exc, ServingError) else 500


async def _timed(deltas: AsyncIterator[TokenDelta], timer: RequestTimer) -> AsyncIterator[TokenDelta]:
    """The same deltas; the timer sees each one, then the end or the error."""
    try:
        async for delta in deltas:
            timer.on_delta(delta)
            yield delta
    except Exception as exc:
        timer.on_error(_status_code(exc))
        raise
    finally:
        timer.on_end()
        await _close(deltas)


async def _with_deadline(deltas: AsyncIterator[TokenDelta], timeout_s: float) -> AsyncIterator[TokenDelta]:
    """The same deltas, or RequestTimeoutError once `timeout_s` have passed; closing aborts the request."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    try:
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    delta = await anext(deltas)
            except StopAsyncIteration:
                return
            except TimeoutError:
                raise RequestTimeoutError(
                    f"the generation took longer than the limit of {timeout_s:g} s and was stopped "
                    "(request_timeout_s of the model's config)"
                ) from None
            yield delta
    finally:
        await _close(deltas)


async def _close(iterator: AsyncIterator[TokenDelta]) -> None:
    aclose = getattr(iterator, "aclose", None)
    if aclose is not None:
        with contextlib.suppress(RuntimeError):  # "already running": closed from elsewhere
            await aclose()
