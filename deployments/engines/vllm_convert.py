"""Between this project's types and vLLM's: sampling settings in, RequestOutputs out (as TokenDeltas),
vLLM's errors as this project's. `vllm` is imported inside functions only."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

from engine.errors import (
    EngineDeadError,
    InvalidRequestError,
    ModelUnavailableError,
    OverloadedError,
    RequestFailedError,
    ServingError,
)
from engine.guided_spec import GuidedSpec, GuideKind
from engine.types import FinishReason, GenerationRequest, SamplingParams, TokenDelta, TokenLogProb

_FINISH_REASONS = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}
VLLM_SEED_MODULUS = 2**63  # vLLM keeps seeds in a signed 64-bit field


def structured_outputs(spec: GuidedSpec | None) -> Any:
    """vLLM's StructuredOutputsParams for a guided request (None when unguided)."""
    if spec is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    by_kind: dict[GuideKind, Callable[[str], dict[str, Any]]] = {
        GuideKind.JSON: lambda v: {"json": json.loads(v)},
        GuideKind.REGEX: lambda v: {"regex": v},
        GuideKind.CHOICE: lambda v: {"choice": json.loads(v)},
        GuideKind.GRAMMAR: lambda v: {"grammar": v},
    }
    return StructuredOutputsParams(**by_kind[spec.kind](spec.value))


def to_vllm_params(params: SamplingParams) -> Any:
    """vLLM's SamplingParams for validated, normalized settings; deltas out (RequestOutputKind.DELTA)."""
    from vllm import SamplingParams as VLLMSamplingParams
    from vllm.sampling_params import RequestOutputKind

    return VLLMSamplingParams(
        n=1,
        max_tokens=params.max_new_tokens,
        temperature=0.0 if params.is_greedy else params.temperature,
        top_k=params.top_k if params.top_k > 0 else 0,
        top_p=params.top_p,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        stop=list(params.stop_sequences) or None,
        include_stop_str_in_output=params.include_stop_str_in_output,
        logprobs=params.num_top_logprobs if params.return_log_probs else None,
        skip_special_tokens=params.skip_special_tokens,
        seed=None if params.seed is None else params.seed % VLLM_SEED_MODULUS,
        ignore_eos=params.ignore_eos,
        structured_outputs=structured_outputs(params.guided),
        output_kind=RequestOutputKind.DELTA,
    )


def as_serving_error(exc: BaseException) -> BaseException:
    """vLLM's exceptions in this project's hierarchy: its request checks (VLLMClientError, ValueError)
    are a 400, an error that carries an HTTP status keeps it (429 overload, 503), a dead engine is a
    503, anything else a failed request (500)."""
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError as VLLMEngineDeadError

    if isinstance(exc, ServingError | asyncio.CancelledError):
        return exc
    if isinstance(exc, VLLMEngineDeadError):
        return EngineDeadError(f"the model's engine has stopped ({exc}); the replica is being replaced")
    status = getattr(exc, "http_status", None) or getattr(exc, "status_code", None)
    if isinstance(exc, GracefulHTTPError | VLLMClientError) and status in _BY_STATUS:
        return _BY_STATUS[int(status)](str(exc))
    if isinstance(exc, VLLMClientError | ValueError):
        return InvalidRequestError(str(exc))
    return RequestFailedError(f"generation failed: {exc!r}")


_BY_STATUS: dict[int, type[ServingError]] = {
    429: OverloadedError,
    503: ModelUnavailableError,
    400: InvalidRequestError,
}


def token_log_prob(token_id: int, position: Mapping[int, Any], num_top: int) -> TokenLogProb:
    """One position's log probs: the sampled token's, with the `num_top` most likely ones (by rank)."""
    ranked = sorted(position.items(), key=lambda item: item[1].rank)[:num_top]
    top = tuple(TokenLogProb(t, lp.decoded_token or "", lp.logprob) for t, lp in ranked)
    sampled = position[token_id]
    return TokenLogProb(token_id, sampled.decoded_token or "", sampled.logprob, top)


class VLLMStream:
    """One request's DeltaSource over vLLM's per-request output collector (which merges the steps a
    slow reader has not taken yet). Waiting on it never aborts: the serving stream sends the abort."""

    def __init__(
        self, request: GenerationRequest, adding: asyncio.Future, forget: Callable[[str], None]
    ) -> None:
        self.request_id = request.request_id
        self._params = request.params
        self._num_prompt_tokens = len(request.prompt_token_ids)
        self._num_completion_tokens = 0
        self._is_first = True
        self._adding, self._forget = adding, forget
        self._collector: Any = None

    async def next_items(self) -> list[TokenDelta | BaseException]:
        try:
            if self._collector is None:
                self._collector = await asyncio.shield(self._adding)
            while True:
                if items := self.to_deltas(await self._collector.get()):
                    return items
        except Exception as exc:
            return [as_serving_error(exc)]

    def ready_items(self) -> list[TokenDelta | BaseException]:
        try:
            if self._collector is None:
                if not self._adding.done():
                    return []
                self._collector = self._adding.result()
            output = self._collector.get_nowait()
        except Exception as exc:
            return [as_serving_error(exc)]
        return [] if output is None else self.to_deltas(output)

    def close(self) -> None:
        self._forget(self.request_id)
        if not self._adding.done():
            self._adding.cancel()

    def to_deltas(self, output: Any) -> list[TokenDelta | BaseException]:
        """One RequestOutput (one or more steps' tokens) as deltas: one per token when log probs are
        asked for (the text on the last), else one; `[]` when it brings nothing."""
        completion = output.outputs[0]
        token_ids = list(completion.token_ids)
        finish = self._finish_reason(output, completion)
        if isinstance(finish, BaseException):
            return [finish]
        if not token_ids and not completion.text and finish is None:
            return []
        queue_time_s = self._queue_time_s(output)
        if not self._params.return_log_probs or not token_ids or not completion.logprobs:
            self._num_completion_tokens += len(token_ids)
            return [self._delta(completion.text, None, finish, queue_time_s)]
        deltas: list[TokenDelta | BaseException] = []
        for i, (token_id, position) in enumerate(zip(token_ids, completion.logprobs, strict=True)):
            self._num_completion_tokens += 1
            is_last = i == len(token_ids) - 1
            token = token_log_prob(token_id, position, self._params.num_top_logprobs)
            deltas.append(
                self._delta(
                    completion.text if is_last else "",
                    token,
                    finish if is_last else None,
                    queue_time_s if i == 0 else None,
                )
            )
        return deltas

    def _delta(self, text: str, token: TokenLogProb | None, finish, queue_time_s) -> TokenDelta:
        return TokenDelta(
            self.request_id,
            text,
            self._num_prompt_tokens,
            self._num_completion_tokens,
            token,
            finish,
            queue_time_s,
        )

    def _finish_reason(self, output: Any, completion: Any) -> FinishReason | BaseException | None:
        if not output.finished:
            return None
        reason = completion.finish_reason
        if reason == "error":
            return RequestFailedError("generation failed in vLLM's engine")
        return _FINISH_REASONS.get(reason or "stop", FinishReason.STOP)

    def _queue_time_s(self, output: Any) -> float | None:
        """On the first delta: from vLLM's queueing of the request to its first schedule."""
        if not self._is_first:
            return None
        self._is_first = False
        metrics = getattr(output, "metrics", None)
        if metrics is None or not getattr(metrics, "scheduled_ts", 0.0):
            return None
        return max(0.0, metrics.scheduled_ts - metrics.queued_ts)
