"""Wire types of the LLM Engine v1 completions API (see shared/reference/llm-engine-protocol.md).

Requests validate their own bounds and convert themselves to engine types; responses serialize to
exactly the JSON the official `llmengine` client parses.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

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
)
from engine.guided_spec import GuidedSpec
from engine.types import SamplingParams, TokenDelta, TokenLogProb

GUIDED_FIELDS = ("guided_json", "guided_choice", "guided_regex", "guided_grammar")
ONE_GUIDED_MESSAGE = "Only one of guided_json, guided_choice, guided_regex, guided_grammar can be enabled."


class CompletionRequest(BaseModel):
    """Body of `completions-sync` and `completions-stream`; the client always sends all 15 keys."""

    # Unknown keys are ignored (other clients send extras); NaN and infinities are never valid numbers.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: Text = Field(description="The text to complete; valid Unicode (no lone surrogates).")
    max_new_tokens: int = Field(
        ge=1, le=MAX_NEW_TOKENS_MAX, description=f"Most tokens to generate. {MAX_TOKENS_NOTE}"
    )
    temperature: float = Field(ge=0.0, le=1.0, description=f"Sampling temperature; {GREEDY_NOTE}")
    stop_sequences: list[Text] | None = Field(
        None,
        max_length=MAX_STOP_SEQUENCES,
        description=f"Generation stops at the first match. {STOP_NOTE}",
    )
    return_token_log_probs: bool | None = Field(False, description="List every token with its log prob.")
    presence_penalty: float | None = Field(None, ge=0.0, le=2.0, description="OpenAI-style presence penalty.")
    frequency_penalty: float | None = Field(
        None, ge=0.0, le=2.0, description="OpenAI-style frequency penalty."
    )
    top_k: int | None = Field(
        None, ge=-1, le=TOP_K_MAX, json_schema_extra={"not": {"const": 0}}, description=TOP_K_DESCRIPTION
    )
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling mass; null = 1.")
    include_stop_str_in_output: bool | None = Field(None, description="Keep the matched stop string.")
    guided_json: UnicodeJson | None = Field(None, description="JSON schema the output must satisfy.")
    guided_regex: Text | None = Field(None, description="Regular expression the output must match.")
    guided_choice: list[Text] | None = Field(
        None, max_length=MAX_GUIDED_CHOICES, description="The output is exactly one of these."
    )
    guided_grammar: Text | None = Field(None, description="Context-free grammar of the output.")
    skip_special_tokens: bool | None = Field(True, description="Drop special tokens from the text.")
    seed: int | None = Field(None, **SEED_BOUNDS, description=f"Extension. {SEED_DESCRIPTION}")

    @field_validator("top_k")
    @classmethod
    def _top_k_not_zero(cls, top_k: int | None) -> int | None:
        if top_k == 0:
            raise ValueError("top_k must be -1 (off) or at least 1, not 0")
        return top_k

    @model_validator(mode="after")
    def _check_combinations(self) -> CompletionRequest:
        if sum(getattr(self, name) is not None for name in GUIDED_FIELDS) > 1:
            raise ValueError(ONE_GUIDED_MESSAGE)
        if self.temperature == 0.0:
            if self.top_k not in (None, -1):
                raise ValueError("top_k must be null or -1 when temperature is 0 (greedy)")
            if self.top_p not in (None, 1.0):
                raise ValueError("top_p must be null or 1 when temperature is 0 (greedy)")
        return self

    def to_sampling_params(self) -> SamplingParams:
        """The engine's settings for this request."""
        guided = GuidedSpec.from_fields(
            guided_json=self.guided_json,
            guided_regex=self.guided_regex,
            guided_choice=self.guided_choice,
            guided_grammar=self.guided_grammar,
        )
        temperature = greedy_below_epsilon(self.temperature)
        is_greedy = temperature == 0.0  # top_k/top_p do nothing then (1e-40 with top_k 5 is fine)
        return SamplingParams(
            max_new_tokens=self.max_new_tokens,
            temperature=temperature,
            top_k=-1 if is_greedy or self.top_k is None else self.top_k,
            top_p=1.0 if is_greedy or self.top_p is None else self.top_p,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            # An empty stop string would match before any text: it means "no stop string".
            stop_sequences=tuple(s for s in self.stop_sequences or () if s),
            include_stop_str_in_output=bool(self.include_stop_str_in_output),
            return_log_probs=bool(self.return_token_log_probs),
            skip_special_tokens=self.skip_special_tokens is not False,
            seed=self.seed,
            guided=guided,
        )


class TokenOutput(BaseModel):
    token: str = Field(description="The token's text.")
    log_prob: float = Field(description="Its log probability under the model.")

    @classmethod
    def from_engine(cls, token: TokenLogProb) -> TokenOutput:
        return cls(token=token.text, log_prob=token.log_prob)


class CompletionOutput(BaseModel):
    text: str = Field(description="The generated text.")
    num_prompt_tokens: int = Field(description="Tokens in the prompt (after the chat template).")
    num_completion_tokens: int = Field(description="Tokens generated.")
    tokens: list[TokenOutput] | None = Field(description="Every token with its log prob, when asked.")


class CompletionSyncResponse(BaseModel):
    request_id: str = Field(description="The id of this request.")
    output: CompletionOutput = Field(description="The completion.")


class CompletionStreamOutput(BaseModel):
    text: str = Field(description="The new text of this event only.")
    finished: bool = Field(description="True on the last event.")
    num_prompt_tokens: int | None = Field(description="Tokens in the prompt; on the last event only.")
    num_completion_tokens: int = Field(description="Tokens generated so far.")
    token: TokenOutput | None = Field(description="This event's token with its log prob, when asked.")

    @classmethod
    def from_delta(cls, delta: TokenDelta) -> CompletionStreamOutput:
        return cls(
            text=delta.text,
            finished=delta.is_finished,
            num_prompt_tokens=delta.num_prompt_tokens if delta.is_finished else None,
            num_completion_tokens=delta.num_completion_tokens,
            token=TokenOutput.from_engine(delta.token) if delta.token is not None else None,
        )


class StreamErrorContent(BaseModel):
    error: str = Field(description="What went wrong.")
    timestamp: str = Field(description="When, as an ISO 8601 UTC time.")


class StreamError(BaseModel):
    status_code: int = Field(description="The HTTP status this error would have had.")
    content: StreamErrorContent = Field(description="Message and time.")


class CompletionStreamResponse(BaseModel):
    """One server-sent event: either `output` or `error` is set."""

    request_id: str = Field(description="The id of this request.")
    output: CompletionStreamOutput | None = Field(description="This event's output.")
    error: StreamError | None = Field(description="The error that ended the stream.")

    @classmethod
    def from_error(cls, request_id: str, status_code: int, message: str) -> CompletionStreamResponse:
        timestamp = datetime.now(UTC).isoformat()
        content = StreamErrorContent(error=message, timestamp=timestamp)
        return cls(
            request_id=request_id, output=None, error=StreamError(status_code=status_code, content=content)
        )


class ModelEndpoint(BaseModel):
    """One served model as `Model.get()` / `Model.list()` of the client parse it."""

    id: str | None = Field(None, description="Endpoint id; the served name here.")
    name: str = Field(description="Served name; pass it as `model_endpoint_name`.")
    model_name: str | None = Field(None, description="Underlying model (zoo name).")
    source: Literal["hugging_face"] = Field("hugging_face", description="Weight source (client's list).")
    status: Literal[
        "READY", "UPDATE_PENDING", "UPDATE_IN_PROGRESS", "UPDATE_FAILED", "DELETE_IN_PROGRESS"
    ] = Field("READY", description="Endpoint status.")
    # The client accepts only its closed list of frameworks; "vllm" is the closest to this engine.
    inference_framework: Literal[
        "deepspeed", "text_generation_inference", "vllm", "lightllm", "tensorrt_llm"
    ] = Field("vllm", description="Inference framework (client's closed list).")
    inference_framework_tag: str | None = Field(None, description="Framework image tag.")
    num_shards: int | None = Field(1, description="GPUs one replica spans.")
    quantize: str | None = Field(None, description="Quantization, if any.")
    spec: dict[str, Any] | None = Field(None, description="Deployment details.")


class ListModelEndpointsResponse(BaseModel):
    model_endpoints: list[ModelEndpoint] = Field(description="Every served model.")
