"""AsyncEngine: the asyncio face of the engine. One dedicated thread runs every model step.

INTERFACE STUB (being implemented): callers may rely on these signatures.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

from engine.types import EngineConfig, GenerationRequest, TokenDelta


@dataclass(frozen=True, slots=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float  # 0..1
    max_model_len: int


class AsyncEngine:
    def __init__(self, model, tokenizer, config: EngineConfig) -> None:
        """`model` is a transformers causal LM, `tokenizer` its tokenizer. Starts the compute thread."""
        raise NotImplementedError

    @property
    def max_model_len(self) -> int:
        raise NotImplementedError

    def check_request(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Raise ContextLengthError (HTTP 400, message with the numbers) if it can never fit."""
        raise NotImplementedError

    def add_request(self, request: GenerationRequest) -> AsyncIterator[TokenDelta]:
        """Queue a request; iterate the result for its deltas. The last delta has a finish_reason.

        Raises ContextLengthError / OverloadedError synchronously (before iteration) when refused.
        Closing the iterator early (client gone) aborts the request.
        """
        raise NotImplementedError

    def abort(self, request_id: str) -> None:
        """Stop a request; its slot and cache are freed at the next step. Unknown ids are ignored."""
        raise NotImplementedError

    def stats(self) -> EngineStats:
        raise NotImplementedError

    def shutdown(self) -> None:
        raise NotImplementedError
