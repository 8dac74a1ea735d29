"""Wire types of OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`.

Requests validate their own bounds and convert themselves to engine types; responses have exactly
OpenAI's shape. One completion per request (`n` = `best_of` = 1). Log probs: the chosen token's and
the most likely alternatives of each position (completions `logprobs` 0-5, chat `top_logprobs` 0-20).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from deployments.protocol.bounds import (
    GREEDY_NOTE,
    MAX_GUIDED_CHOICES,
    MAX_NEW_TOKENS_MAX,
    MAX_STOP_SEQUENCES,
    MAX_TOKENS_NOTE,
    SEED_BOUNDS,
    SEED_DESCRIPTION,
    STOP_NOTE,
    TOP_K_DESCRIPTION,
    TOP_K_MAX,
    Text,
    UnicodeJson,
    greedy_below_epsilon,
    require_unicode,
)
from deployments.wire import ChatMessage
from engine.errors import InvalidRequestError
from engine.guided_spec import GuidedSpec
from engine.types import SamplingParams

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
ERROR_TYPES = {400: "invalid_request_error", 404: "not_found_error", 429: "rate_limit_error"}  # else:
SERVER_ERROR_TYPE = "server_error"  # 5xx


class StreamOptions(BaseModel):
    include_usage: bool | None = Field(False, description="Send a last chunk with the token usage.")


class SamplingFields(BaseModel):
    """Settings shared by both routes; the vLLM extras (top_k, ignore_eos...) included."""

    # Unknown keys are ignored (clients send extras); NaN and infinities are never valid numbers.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Text = Field(min_length=1, description="The served model's name (see /v1/models).")
    temperature: float | None = Field(1.0, ge=0.0, le=2.0, description=f"Sampling temperature; {GREEDY_NOTE}")
    top_p: float | None = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass.")
    stop: Text | Annotated[list[Text], Field(max_length=MAX_STOP_SEQUENCES)] | None = Field(
        None, description=f"Generation stops at the first match. {STOP_NOTE}"
    )
    seed: int | None = Field(None, **SEED_BOUNDS, description=SEED_DESCRIPTION)
    n: int | None = Field(
        1, json_schema_extra={"enum": [1, None]}, description="Completions per request; only 1 is supported."
    )
    stream: bool | None = Field(False, description="Answer with server-sent events.")
    stream_options: StreamOptions | None = Field(None, description="Streaming options (include_usage).")
    presence_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, description="OpenAI presence penalty.")
    frequency_penalty: float | None = Field(0.0, ge=-2.0, le=2.0, description="OpenAI frequency penalty.")
    logit_bias: dict[str, float] | None = Field(
        None, json_schema_extra={"maxProperties": 0}, description="Not supported; must be empty."
    )
    user: str | None = Field(None, description="End-user id; accepted and ignored.")
    top_k: int | None = Field(
        None, ge=-1, le=TOP_K_MAX, description=f"vLLM extra; 0 = off too. {TOP_K_DESCRIPTION}"
    )
    ignore_eos: bool | None = Field(False, description="vLLM extra: keep generating after EOS.")
    skip_special_tokens: bool | None = Field(True, description="vLLM extra: drop special tokens.")
    include_stop_str_in_output: bool | None = Field(False, description="vLLM extra: keep the stop string.")
    guided_json: UnicodeJson | Text | None = Field(None, description="vLLM extra: JSON schema of the output.")
    guided_regex: Text | None = Field(None, description="vLLM extra: the output matches this regex in full.")
    guided_choice: list[Text] | None = Field(
        None, max_length=MAX_GUIDED_CHOICES, description="vLLM extra: the output is one of these."
    )
    guided_grammar: Text | None = Field(None, description="vLLM extra: grammar of the output (Lark or GBNF).")

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int | None) -> int | None:
        if n not in (None, 1):
            raise ValueError(f"only n=1 is supported, got {n}")
        return n

    @field_validator("guided_json")
    @classmethod
    def _guided_json_text_is_unicode(cls, guided_json: Any) -> Any:
        """JSON text whose escapes ("\\ud800") decode to a lone surrogate is refused like a dict's."""
        if isinstance(guided_json, str):
            try:
                parsed = json.loads(guided_json)
            except ValueError:  # not JSON: GuidedSpec answers 400 with the reason
                return guided_json
            require_unicode(json.dumps(parsed, ensure_ascii=False))
        return guided_json

    @field_validator("logit_bias")
    @classmethod
    def _no_logit_bias(cls, logit_bias: dict[str, float] | None) -> dict[str, float] | None:
        if logit_bias:
            raise ValueError("logit_bias is not supported")
        return logit_bias

    @model_validator(mode="after")
    def _stream_options_need_stream(self) -> SamplingFields:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def is_usage_streamed(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def _guided_spec(self) -> GuidedSpec | None:
        return GuidedSpec.from_fields(
            guided_json=self.guided_json,
            guided_regex=self.guided_regex,
            guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
        )

    def _sampling_params(
        self,
        max_new_tokens: int,
        is_log_probs: bool,
        num_top_logprobs: int = 0,
        guided: GuidedSpec | None = None,
    ) -> SamplingParams:
        temperature = greedy_below_epsilon(1.0 if self.temperature is None else self.temperature)
        is_greedy = temperature == 0.0  # OpenAI accepts top_p/top_k with temperature 0: they do nothing
        stops = [self.stop] if isinstance(self.stop, str) else self.stop or []
        return SamplingParams(
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=-1 if is_greedy or not self.top_k else self.top_k,
            top_p=1.0 if is_greedy or self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            # An empty stop string would match before any text: it means "no stop string".
            stop_sequences=tuple(s for s in stops if s),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            return_log_probs=is_log_probs,
            num_top_logprobs=num_top_logprobs if is_log_probs else 0,
            skip_special_tokens=self.skip_special_tokens is not False,
            seed=self.seed,
            ignore_eos=bool(self.ignore_eos),
            guided=guided or self._guided_spec(),
        )


class CompletionRequest(SamplingFields):
    """Body of `POST /v1/completions`: one text prompt, sent to the model raw (no chat template)."""

    prompt: Text = Field(
        description="The text to complete (valid Unicode); a list holding exactly one string also works."
    )
    max_tokens: int | None = Field(
        DEFAULT_COMPLETION_MAX_TOKENS,
        ge=1,
        le=MAX_NEW_TOKENS_MAX,
        description=f"Most tokens to make. {MAX_TOKENS_NOTE}",
    )
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Return the chosen tokens' log probs and this many alternatives (0-5)."
    )
    echo: bool | None = Field(
        False, json_schema_extra={"enum": [False, None]}, description="Not supported; must be false."
    )
    best_of: int | None = Field(1, json_schema_extra={"enum": [1, None]}, description="Only 1 is supported.")
    suffix: str | None = Field(
        None, json_schema_extra={"enum": ["", None]}, description="Not supported; must be null."
    )

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if not isinstance(prompt, list):
            return prompt
        if len(prompt) != 1:
            raise ValueError(f"exactly one prompt per request is supported, got {len(prompt)}")
        if not isinstance(prompt[0], str):
            raise ValueError("token id prompts are not supported; send the prompt as text")
        return prompt[0]

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, echo: bool | None) -> bool | None:
        if echo:
            raise ValueError("echo is not supported")
        return echo

    @field_validator("best_of")
    @classmethod
    def _best_of_one(cls, best_of: int | None) -> int | None:
        if best_of not in (None, 1):
            raise ValueError(f"only best_of=1 is supported, got {best_of}")
        return best_of

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, suffix: str | None) -> str | None:
        if suffix:
            raise ValueError("suffix is not supported")
        return suffix

    def to_sampling_params(self) -> SamplingParams:
        max_tokens = self.max_tokens or DEFAULT_COMPLETION_MAX_TOKENS
        return self._sampling_params(
            max_tokens, is_log_probs=self.logprobs is not None, num_top_logprobs=self.logprobs or 0
        )


class TextPart(BaseModel):
    type: str = Field(json_schema_extra={"enum": ["text"]}, description='Only "text" is supported.')
    text: Text = Field("", description="The text of this part.")

    @field_validator("type")
    @classmethod
    def _text_only(cls, part_type: str) -> str:
        if part_type != "text":
            raise ValueError(f"content parts of type {part_type!r} are not supported; only 'text'")
        return part_type


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"] = Field(
        description='Who says it; "developer" is OpenAI\'s newer name for "system".'
    )
    content: Text | list[TextPart] = Field(description="Text, or a list of text parts (joined by newlines).")

    def to_chat_message(self) -> ChatMessage:
        text = self.content if isinstance(self.content, str) else "\n".join(p.text for p in self.content)
        return ChatMessage(role="system" if self.role == "developer" else self.role, content=text)


class JsonSchemaFormat(BaseModel):
    name: str | None = Field(None, description="The schema's name (informative).")
    schema_: UnicodeJson = Field(default_factory=dict, alias="schema", description="The JSON schema.")
    strict: bool | None = Field(None, description="Accepted; the output always follows the schema.")


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"] = Field(
        description="text, json_object or json_schema."
    )
    json_schema: JsonSchemaFormat | None = Field(None, description="The schema, for type json_schema.")

    def to_guided_spec(self) -> GuidedSpec | None:
        if self.type == "json_object":
            return GuidedSpec.json_schema({"type": "object"})
        if self.type == "json_schema":
            if self.json_schema is None:
                raise InvalidRequestError("response_format json_schema needs a json_schema object")
            return GuidedSpec.json_schema(self.json_schema.schema_)
        return None


class ChatCompletionRequest(SamplingFields):
    """Body of `POST /v1/chat/completions`: the whole conversation goes through the chat template."""

    messages: list[Message] = Field(min_length=1, description="The conversation so far.")
    max_tokens: int | None = Field(
        None,
        ge=1,
        le=MAX_NEW_TOKENS_MAX,
        description=f"Most tokens to make; null = up to the context. {MAX_TOKENS_NOTE}",
    )
    max_completion_tokens: int | None = Field(
        None, ge=1, le=MAX_NEW_TOKENS_MAX, description="Replaces max_tokens when set; bounded as max_tokens."
    )
    logprobs: bool | None = Field(False, description="Return the chosen tokens' log probs.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="Most likely alternatives per token (0-20); needs logprobs true."
    )
    response_format: ResponseFormat | None = Field(None, description="text, json_object or json_schema.")
    tools: list[Any] | None = Field(
        None, json_schema_extra={"maxItems": 0}, description="Not supported; must be empty."
    )

    @model_validator(mode="after")
    def _check_chat_fields(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs set to true")
        if self.tools:
            raise ValueError("tools are not supported")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """The asked limit; None means as many as the context leaves room for (OpenAI's chat default)."""
        return self.max_completion_tokens or self.max_tokens

    def to_messages(self) -> tuple[ChatMessage, ...]:
        return tuple(m.to_chat_message() for m in self.messages)

    def to_sampling_params(self) -> SamplingParams:
        """The engine's settings; with no max tokens given, the model server fills in the context's room."""
        guided = self.response_format.to_guided_spec() if self.response_format is not None else None
        if guided is not None and self._guided_spec() is not None:
            raise InvalidRequestError("use either response_format or a guided_* field, not both")
        return self._sampling_params(
            self.max_new_tokens or 1, bool(self.logprobs), self.top_logprobs or 0, guided=guided
        )


class ErrorDetail(BaseModel):
    message: str = Field(description="What went wrong.")
    type: str = Field(description="invalid_request_error, not_found_error, rate_limit_error, server_error...")
    param: str | None = Field(None, description="The offending parameter, when known.")
    code: int = Field(description="The HTTP status.")


class ErrorResponse(BaseModel):
    """OpenAI's error body; also the payload of the error event that ends a failed stream."""

    error: ErrorDetail

    @classmethod
    def of(cls, status_code: int, message: str) -> ErrorResponse:
        default_type = SERVER_ERROR_TYPE if status_code >= 500 else ERROR_TYPES[400]
        error_type = ERROR_TYPES.get(status_code, default_type)
        return cls(error=ErrorDetail(message=message, type=error_type, code=status_code))


class ModelCard(BaseModel):
    id: str = Field(description="The served name; pass it as `model`.")
    object: Literal["model"] = "model"
    created: int = Field(description="Unix time the server started serving it.")
    owned_by: str = "llmserve"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard] = Field(description="Every served model.")
