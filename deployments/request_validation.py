"""A request checked once, in the replica, before any engine sees it: the prompt through the tokenizer
(and the chat template), the sampling settings normalized for this model, "auto" max tokens resolved,
the context limit checked. Engines get the result and only assert (docs/engines.md)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jinja2

from deployments.protocol.bounds import check_unicode
from deployments.wire import ChatMessage, ModelRequest
from engine.errors import ContextLengthError, InvalidRequestError
from engine.params import normalize_params
from engine.types import GenerationRequest


@dataclass(slots=True)
class RequestValidator:
    """Turns a `ModelRequest` into the one validated `GenerationRequest` an engine receives."""

    model_name: str
    tokenizer: Any  # a transformers tokenizer, or any object with the same __call__/apply_chat_template
    use_chat_template: bool
    max_model_len: int
    vocab_size: int | None  # None: unknown (a test fake); top_k is then not clamped to it

    def encode(self, prompt: str, *, is_raw: bool = False) -> list[int]:
        """Prompt token ids: the prompt as a user turn of the chat template, or the raw prompt."""
        if is_raw or not self.use_chat_template:
            check_unicode(prompt, "prompt")
            return list(self.tokenizer(prompt).input_ids)
        return self.encode_chat([ChatMessage(role="user", content=prompt)], field="prompt")

    def encode_chat(self, messages: Sequence[ChatMessage], field: str = "messages") -> list[int]:
        """Token ids of a conversation through the chat template, ending with the assistant's turn."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise InvalidRequestError(f"model {self.model_name} has no chat template; use /v1/completions")
        for i, message in enumerate(messages):
            check_unicode(message.content, field if field == "prompt" else f"{field}.{i}.content")
        turns = [{"role": m.role, "content": m.content} for m in messages]
        try:
            encoded = self.tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=True)
        except jinja2.TemplateError as exc:  # e.g. Gemma's raise_exception on a system turn
            raise InvalidRequestError(
                f"{field}: the chat template of model {self.model_name} refused the conversation: {exc}"
            ) from None
        # transformers 5 returns a BatchEncoding (a Mapping); older versions a plain list of ids.
        return list(encoded["input_ids"] if isinstance(encoded, Mapping) else encoded)

    def validate(self, request: ModelRequest) -> GenerationRequest:
        """The engine's request; InvalidRequestError (400) naming the field or limit otherwise."""
        if isinstance(request.prompt, str):
            prompt_ids = self.encode(request.prompt, is_raw=request.is_raw_prompt)
        else:
            prompt_ids = self.encode_chat(request.prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty after tokenization")
        params = request.params
        if request.is_max_tokens_auto:  # the room the context leaves; at least 1, so too long still fails
            params = dataclasses.replace(params, max_new_tokens=max(self.max_model_len - len(prompt_ids), 1))
        params = normalize_params(params, self.vocab_size or 2**62)
        total = len(prompt_ids) + params.max_new_tokens
        if total > self.max_model_len:
            raise ContextLengthError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = {total} "
                f"tokens exceeds this model's context of {self.max_model_len} tokens"
            )
        return GenerationRequest(request.request_id, tuple(prompt_ids), params)
