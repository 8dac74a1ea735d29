"""What the ingress and a model replica send each other through Serve: one request in, and either the
whole completion (sync routes) or chunks of `engine.types.TokenDelta` (streams, one list per message).
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.types import FinishReason, SamplingParams, TokenLogProb


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
