"""A small fake engine and tokenizer for fast HTTP-layer tests; behaviour is steered by the prompt.

Tokens are the prompt's UTF-8 bytes. The completion is "w0 w1 w2 ..." (one word per token).
Markers in the prompt: "[slow]" 0.2 s per token, "[fail-after-2]" a failure of that request alone
(500) after two tokens, "[crash]" a plain RuntimeError before the first token, "[overload]" a
refusal (429), "[stop]" ends with finish reason STOP after 3 tokens, "[kill-worker]" ends the whole
process at once (a worker that dies: a segfault, the OOM killer), "[wait-for:<path>]" holds the first
token until a file exists at <path> (an event the test controls, not a timing), "[step-gate:<dir>]"
holds each token after the first until a file named by its index (1, 2, ...) exists in <dir>.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

from deployments.config import ModelConfig
from deployments.model_server import ServingModel
from engine.errors import ContextLengthError, OverloadedError, RequestFailedError
from engine.types import EngineStats, FinishReason, GenerationRequest, TokenDelta, TokenLogProb

FAKE_MODELS = ("fake", "fake-chat.v1:2024-01-01")  # the second name has the characters fine-tunes use
MAX_MODEL_LEN = 256
SLOW_TOKEN_S = 0.2
WAIT_FOR = re.compile(r"\[wait-for:([^\]]+)\]")
STEP_GATE = re.compile(r"\[step-gate:([^\]]+)\]")
GATE_POLL_S = 0.02


@dataclass(slots=True)
class Encoded:
    input_ids: list[int]


class FakeTokenizer:
    chat_template = "fake"

    def __call__(self, text: str) -> Encoded:
        return Encoded(list(text.encode("utf-8")))

    def apply_chat_template(self, messages, add_generation_prompt: bool, tokenize: bool) -> dict:
        text = "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"
        return {"input_ids": list(text.encode("utf-8"))}


class FakeEngine:
    def __init__(self) -> None:
        self._running: set[str] = set()
        self.aborted: list[str] = []

    def check_request(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        if num_prompt_tokens + max_new_tokens > MAX_MODEL_LEN:
            raise ContextLengthError(
                f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                f"the context length {MAX_MODEL_LEN}"
            )

    def add_request(self, request: GenerationRequest) -> FakeStream:
        self.check_request(len(request.prompt_token_ids), request.params.max_new_tokens)
        prompt = bytes(request.prompt_token_ids).decode("utf-8", errors="replace")
        if "[overload]" in prompt:
            raise OverloadedError("the fake engine's queue is full")
        self._running.add(request.request_id)
        return FakeStream(self._generate(request, prompt))

    async def _generate(self, request: GenerationRequest, prompt: str) -> AsyncIterator[TokenDelta]:
        params, num_prompt = request.params, len(request.prompt_token_ids)
        num_tokens = 3 if "[stop]" in prompt else params.max_new_tokens
        try:
            if "[crash]" in prompt:
                raise RuntimeError("fake engine crashed")
            if "[kill-worker]" in prompt:
                os._exit(17)
            if gate := WAIT_FOR.search(prompt):
                while not os.path.exists(gate.group(1)):
                    await asyncio.sleep(GATE_POLL_S)
            step_gate = STEP_GATE.search(prompt)
            for i in range(num_tokens):
                await asyncio.sleep(SLOW_TOKEN_S if "[slow]" in prompt else 0.001)
                while step_gate and i and not os.path.exists(os.path.join(step_gate.group(1), str(i))):
                    await asyncio.sleep(GATE_POLL_S)
                if request.request_id not in self._running:
                    return  # aborted
                if "[fail-after-2]" in prompt and i == 2:
                    raise RequestFailedError("fake request failed mid-stream")
                text = f"w{i} "
                token = (
                    TokenLogProb(token_id=i, text=text, log_prob=-0.5) if params.return_log_probs else None
                )
                is_last = i == num_tokens - 1
                reason = (
                    (FinishReason.STOP if "[stop]" in prompt else FinishReason.LENGTH) if is_last else None
                )
                yield TokenDelta(request.request_id, text, num_prompt, i + 1, token, reason)
        finally:
            self._running.discard(request.request_id)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)  # every call, known id or not: tests check who aborted what
        self._running.discard(request_id)

    def stats(self) -> EngineStats:
        return EngineStats(len(self._running), 0, 0.0, MAX_MODEL_LEN)

    def check_health(self) -> None:
        pass

    def shutdown(self) -> None:
        self._running.clear()


class FakeStream:
    """The engine's stream interface over the fake's generator: one delta per step, pumped by a task
    (so that waiting on it is cancel-safe, as the engines' streams are)."""

    def __init__(self, deltas: AsyncIterator[TokenDelta]) -> None:
        self._out: asyncio.Queue[list] = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(deltas))

    async def _pump(self, deltas: AsyncIterator[TokenDelta]) -> None:
        try:
            async for delta in deltas:
                self._out.put_nowait([delta])
        except Exception as exc:  # the request's error, as an engine hands it over
            self._out.put_nowait([exc])
        self._out.put_nowait([])  # ended (after its last delta, or aborted)

    async def next_items(self) -> list:
        return await self._out.get()

    def ready_items(self) -> list:
        items: list = []
        while not self._out.empty():
            items.extend(self._out.get_nowait())
        return items

    def close(self) -> None:
        self._task.cancel()


def fake_factory(config: ModelConfig) -> ServingModel:
    """An EngineFactory for `ModelServer`: a FakeEngine with a byte tokenizer."""
    use_chat_template = bool(config.use_chat_template)
    return ServingModel(
        engine=FakeEngine(),
        tokenizer=FakeTokenizer(),
        use_chat_template=use_chat_template,
        max_model_len=MAX_MODEL_LEN,
        vocab_size=256,
    )
