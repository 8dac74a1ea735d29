"""OpenAI response bodies and stream chunks, built from the model server's results and deltas.

`Completion` is both the `text_completion` body and its stream chunk, as in OpenAI's API. The chunk
builders (`CompletionChunks`, `ChatChunks`) hold the little state a stream needs (text offset, role).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from deployments.wire import CompletionResult
from engine.types import FinishReason, TokenDelta, TokenLogProb

_FINISH_REASONS = {FinishReason.STOP: "stop", FinishReason.LENGTH: "length", FinishReason.ABORT: "abort"}


def finish_reason_of(reason: FinishReason | None) -> str | None:
    return None if reason is None else _FINISH_REASONS[reason]


class Usage(BaseModel):
    prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template, for chat).")
    completion_tokens: int = Field(description="Tokens generated.")
    total_tokens: int = Field(description="Their sum.")

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int) -> Usage:
        total = num_prompt_tokens + num_completion_tokens
        return cls(
            prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens, total_tokens=total
        )


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(description="Each generated token's text.")
    token_logprobs: list[float] = Field(description="Each one's log prob.")
    top_logprobs: list[dict[str, float]] | None = Field(
        None, description="Per token, its position's most likely tokens (text -> log prob); null if 0 asked."
    )
    text_offset: list[int] = Field(description="Where each token starts in the completion's text.")

    @classmethod
    def of(cls, tokens: Sequence[TokenLogProb], start_offset: int = 0) -> CompletionLogprobs:
        offsets, offset = [], start_offset
        for token in tokens:
            offsets.append(offset)
            offset += len(token.text)
        top = [_top_dict(t) for t in tokens] if any(t.top for t in tokens) else None
        return cls(
            tokens=[t.text for t in tokens],
            token_logprobs=[t.log_prob for t in tokens],
            top_logprobs=top,
            text_offset=offsets,
        )


def _top_dict(token: TokenLogProb) -> dict[str, float]:
    """Alternatives by text, best first; two tokens with the same text keep the likelier one."""
    alternatives: dict[str, float] = {}
    for alternative in token.top:
        alternatives.setdefault(alternative.text, alternative.log_prob)
    return alternatives


class CompletionChoice(BaseModel):
    index: int = 0
    text: str = Field(description="The generated text (of this chunk, when streaming).")
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class Completion(BaseModel):
    """A `text_completion`: the whole answer, or one stream chunk (usage only on the last one)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(description="Unix time of the request.")
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None

    @classmethod
    def from_result(cls, id: str, created: int, model: str, result: CompletionResult) -> Completion:
        logprobs = CompletionLogprobs.of(result.tokens) if result.tokens is not None else None
        reason = finish_reason_of(result.finish_reason)
        choice = CompletionChoice(text=result.text, logprobs=logprobs, finish_reason=reason)
        usage = Usage.of(result.num_prompt_tokens, result.num_completion_tokens)
        return cls(id=id, created=created, model=model, choices=[choice], usage=usage)


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None

    @classmethod
    def of(cls, token: TokenLogProb) -> TopLogprob:
        return cls(token=token.text, logprob=token.log_prob, bytes=list(token.text.encode("utf-8")))


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(
        default_factory=list, description="The position's most likely tokens, best first (top_logprobs)."
    )

    @classmethod
    def of(cls, token: TokenLogProb) -> ChatTokenLogprob:
        top = [TopLogprob.of(t) for t in token.top]
        return cls(
            token=token.text, logprob=token.log_prob, bytes=list(token.text.encode("utf-8")), top_logprobs=top
        )


class ChoiceLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None
    refusal: None = None

    @classmethod
    def of(cls, tokens: Sequence[TokenLogProb]) -> ChoiceLogprobs:
        return cls(content=[ChatTokenLogprob.of(t) for t in tokens])


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(description="Unix time of the request.")
    model: str
    choices: list[ChatChoice]
    usage: Usage

    @classmethod
    def from_result(cls, id: str, created: int, model: str, result: CompletionResult) -> ChatCompletion:
        logprobs = ChoiceLogprobs.of(result.tokens) if result.tokens is not None else None
        message = AssistantMessage(content=result.text)
        reason = finish_reason_of(result.finish_reason)
        choice = ChatChoice(message=message, logprobs=logprobs, finish_reason=reason)
        usage = Usage.of(result.num_prompt_tokens, result.num_completion_tokens)
        return cls(id=id, created=created, model=model, choices=[choice], usage=usage)


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = Field(None, description="On the first chunk only.")
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(description="Unix time of the request.")
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


@dataclass(slots=True)
class CompletionChunks:
    """Builds the `text_completion` chunks of one stream."""

    id: str
    created: int
    model: str
    num_chars_sent: int = 0  # text offset of the next token

    def content(self, delta: TokenDelta) -> Completion:
        tokens = [delta.token] if delta.token is not None else []
        logprobs = CompletionLogprobs.of(tokens, self.num_chars_sent) if tokens else None
        self.num_chars_sent += len(delta.text)
        reason = finish_reason_of(delta.finish_reason)
        choice = CompletionChoice(text=delta.text, logprobs=logprobs, finish_reason=reason)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage(self, delta: TokenDelta) -> Completion:
        usage = Usage.of(delta.num_prompt_tokens, delta.num_completion_tokens)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)


@dataclass(slots=True)
class ChatChunks:
    """Builds the `chat.completion.chunk`s of one stream; the first one carries the role."""

    id: str
    created: int
    model: str
    is_role_sent: bool = False

    def content(self, delta: TokenDelta) -> ChatCompletionChunk:
        role = None if self.is_role_sent else "assistant"
        self.is_role_sent = True
        logprobs = ChoiceLogprobs.of([delta.token]) if delta.token is not None else None
        reason = finish_reason_of(delta.finish_reason)
        choice = ChatChunkChoice(
            delta=DeltaMessage(role=role, content=delta.text), logprobs=logprobs, finish_reason=reason
        )
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage(self, delta: TokenDelta) -> ChatCompletionChunk:
        usage = Usage.of(delta.num_prompt_tokens, delta.num_completion_tokens)
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )
