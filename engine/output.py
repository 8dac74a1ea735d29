"""Per-request output processing: sampled token -> released text, log prob entry and finish."""

from __future__ import annotations

from engine.detokenizer import IncrementalDetokenizer, token_text
from engine.errors import ServingError
from engine.stopping import StopStringMatcher, check_token_finish
from engine.types import FinishReason, GenerationRequest, TokenDelta, TokenLogProb

_DETOKENIZER_CONTEXT = 4  # prompt ids that precede the first generated token in the decode window


class RequestOutput:
    """Turns one request's sampled tokens into TokenDeltas (detokenize, stop strings, EOS, length)."""

    def __init__(self, request: GenerationRequest, tokenizer, eos_token_ids: frozenset[int]) -> None:
        self.request_id = request.request_id
        self.params = request.params
        self.num_prompt_tokens = len(request.prompt_token_ids)
        self.num_generated = 0
        self._tokenizer = tokenizer
        self._eos = eos_token_ids
        context = request.prompt_token_ids[-_DETOKENIZER_CONTEXT:]
        self._detok = IncrementalDetokenizer(tokenizer, request.params.skip_special_tokens, context)
        stops = request.params.stop_sequences
        self._stops = StopStringMatcher(stops, request.params.include_stop_str_in_output) if stops else None

    def on_token(
        self, token_id: int, log_prob: float | None, top: list[tuple[int, float]] | None = None
    ) -> TokenDelta:
        self.num_generated += 1
        finish = check_token_finish(token_id, self.num_generated, self.params, self._eos)
        is_eos = finish is FinishReason.STOP
        # EOS ends the text; its own text is never part of the output (as in vLLM).
        text = "" if is_eos else self._detok.add_token(token_id)
        if finish is not None:
            text += self._detok.flush()
        if self._stops is not None:
            text, is_stopped = self._stops.feed(text)
            if is_stopped:
                finish = FinishReason.STOP
            elif finish is not None:
                text += self._stops.flush()
        token = None
        if self.params.return_log_probs:
            alternatives = tuple(
                TokenLogProb(i, token_text(self._tokenizer, i), lp)
                for i, lp in (top or ())[: self.params.num_top_logprobs]
            )
            token = TokenLogProb(
                token_id, token_text(self._tokenizer, token_id), float(log_prob), alternatives
            )
        return TokenDelta(
            request_id=self.request_id,
            text=text,
            num_prompt_tokens=self.num_prompt_tokens,
            num_completion_tokens=self.num_generated,
            token=token,
            finish_reason=finish,
        )

    def on_abort(self) -> TokenDelta:
        return self._final(FinishReason.ABORT)

    def on_error(self, error: ServingError) -> TokenDelta:
        return self._final(FinishReason.ERROR, error)

    def _final(self, reason: FinishReason, error: ServingError | None = None) -> TokenDelta:
        return TokenDelta(
            request_id=self.request_id,
            text="",
            num_prompt_tokens=self.num_prompt_tokens,
            num_completion_tokens=self.num_generated,
            finish_reason=reason,
            error=error,
        )
