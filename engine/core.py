"""EngineCore: the synchronous, deterministic heart. step() = schedule -> forward -> sample -> update."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass

import torch

from engine import native_argmax
from engine.device import release_free_memory, synchronize
from engine.errors import (
    ContextLengthError,
    EngineDeadError,
    InvalidRequestError,
    RequestFailedError,
    ServingError,
)
from engine.guided import CompiledGuide, GuideState, apply_guides
from engine.kv_cache import KVCache, KVCacheShape, plan_num_blocks
from engine.model_runner import ModelRunner
from engine.output import RequestOutput
from engine.params import normalize_params
from engine.sampler import SamplingMetadata, make_generator, sample
from engine.scheduler import ScheduledBatch, Scheduler, Sequence
from engine.types import EngineConfig, GenerationRequest, StepTotals, TokenDelta

logger = logging.getLogger("engine")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return frozenset(ids)


@dataclass(slots=True, eq=False)
class _RequestState:
    """Everything the core keeps for one request, built whole before any shared structure sees it."""

    seq: Sequence
    output: RequestOutput
    generator: torch.Generator | None
    guide: GuideState | None


@dataclass(frozen=True, slots=True)
class _Sampled:
    token_id: int
    log_prob: float | None
    top: list[tuple[int, float]] | None


class EngineCore:
    """Owns the scheduler, the model runner and per-request output state. Not thread-safe.

    Failure model (docs/reliability.md): whatever fails for one request (its settings, seed, guide,
    detokenizing, stop matching, or a forward pass that fails only with it in the batch) ends that request
    with a FinishReason.ERROR delta and the rest go on; a forward that keeps failing for one lone sequence
    after another (`max_consecutive_failures`) raises EngineDeadError: the device is broken."""

    def __init__(self, model, tokenizer, config: EngineConfig, device: torch.device) -> None:
        self.config = config
        self.device = device
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.vocab_size = model.config.get_text_config().vocab_size
        dtype = next(model.parameters()).dtype
        shape = KVCacheShape.from_model_config(model.config)
        num_blocks = plan_num_blocks(
            shape,
            dtype,
            kv_cache_bytes=config.kv_cache_bytes,
            block_size=config.block_size,
            max_num_seqs=config.max_num_seqs,
            max_model_len=config.max_model_len,
        )
        self.kv_cache = KVCache(shape, num_blocks, config.block_size, dtype, device, config.huge_pages)
        num_slots, mib = num_blocks * config.block_size, self.kv_cache.num_bytes / 2**20
        logger.info("KV cache: %d blocks, %d tokens, %.1f MiB of %s", num_blocks, num_slots, mib, dtype)
        self.runner = ModelRunner(
            model,
            self.kv_cache,
            device,
            config.optimize_model,
            config.native_attention,
            config.fast_forward,
            config.native_linear,
            config.native_norm,
            config.int8_weights,
            config.native_rotary,
            config.native_silu,
            config.native_residual,
            config.native_layers,
            config.huge_pages,
            config.int8_lm_head,
        )
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            num_blocks=num_blocks,
            enable_prefix_caching=config.enable_prefix_caching,
        )
        # greedy picks in C on a CPU (the sampler checks each step's logits: CPU float32 or bf16 rows, else
        # torch's argmax)
        use_argmax = config.native_argmax and torch.device(device).type == "cpu"
        self._argmax = native_argmax.load() if use_argmax else None
        release_free_memory()
        self._requests: dict[str, _RequestState] = {}
        self._num_consecutive_failures = 0  # lone-sequence forward failures since the last success
        self.step_totals = StepTotals()  # read by the engine's stats (metrics), written here only

    def check_request(self, num_prompt_tokens: int, max_new_tokens: int) -> None:
        """Refuse what can never fit in the context."""
        if num_prompt_tokens == 0:
            raise InvalidRequestError("the prompt is empty after tokenization")
        total = num_prompt_tokens + max_new_tokens
        if total > self.config.max_model_len:
            raise ContextLengthError(
                f"prompt ({num_prompt_tokens} tokens) + max_new_tokens ({max_new_tokens}) = {total} tokens "
                f"exceeds this model's context of {self.config.max_model_len} tokens"
            )

    def add_request(self, request: GenerationRequest, guide: CompiledGuide | None = None) -> None:
        """Queue a request; a guided one comes with its compiled guide (compiled off this thread).

        Its whole state is built first: a failure raises a ServingError and leaves nothing behind."""
        if request.request_id in self._requests:
            raise InvalidRequestError(f"duplicate request id {request.request_id}")
        self.check_request(len(request.prompt_token_ids), request.params.max_new_tokens)
        if (guide is None) != (request.params.guided is None):
            raise InvalidRequestError("a guided request needs its compiled guide, and only it")
        if guide is not None and request.params.ignore_eos:
            raise InvalidRequestError("ignore_eos cannot be combined with guided decoding")
        if not all(0 <= t < self.vocab_size for t in request.prompt_token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size}) for this model")
        params = normalize_params(request.params, self.vocab_size)
        request = dataclasses.replace(request, params=params)
        try:
            state = _RequestState(
                seq=Sequence(request.request_id, list(request.prompt_token_ids), params),
                output=RequestOutput(request, self.tokenizer, self.eos_token_ids),
                generator=make_generator(params.seed, self.device),
                guide=guide.new_state() if guide is not None else None,
            )
        except Exception as exc:  # not the request's fault as far as we know, but only its problem
            logger.exception("setting up request %s failed", request.request_id)
            raise RequestFailedError(f"setting up the request failed: {exc}") from exc
        self._requests[request.request_id] = state
        self.scheduler.add(state.seq)

    def abort(self, request_id: str) -> TokenDelta | None:
        """Drop a request now; returns its final ABORT delta, or None if it is unknown."""
        state = self._requests.get(request_id)
        if state is None:
            return None
        self._drop(state.seq)
        return state.output.on_abort()

    def abort_all(self) -> list[str]:
        ids = list(self._requests)
        for request_id in ids:
            self._drop(self._requests[request_id].seq)
        return ids

    @property
    def has_unfinished(self) -> bool:
        return bool(self._requests)

    def step(self) -> list[TokenDelta]:
        """One forward pass and one sampled token per ready sequence; failed requests get ERROR deltas."""
        start_s = time.perf_counter()
        batch = self.scheduler.schedule()
        if batch.is_empty():
            return []
        deltas: list[TokenDelta] = []
        lone_failures: list[tuple[Sequence, Exception]] = []
        ready, logits = self._forward(batch, lone_failures)  # (S, V) for the sequences that sample
        self._fail_lone_failures(lone_failures, deltas)
        if ready:
            for seq, sampled in zip(ready, self._sample(ready, logits, deltas), strict=True):
                if sampled is not None:
                    deltas.append(self._emit(self._requests[seq.request_id], sampled))
        is_prefill = len(batch.items) > batch.num_decode
        self.step_totals.add(is_prefill=is_prefill, seconds=time.perf_counter() - start_s)
        return deltas

    def _forward(
        self, batch: ScheduledBatch, lone_failures: list[tuple[Sequence, Exception]]
    ) -> tuple[list[Sequence], torch.Tensor | None]:
        """The sequences that sample this step and their logits. A failing forward is retried on halves
        of the batch until the sequence that makes it fail is alone (listed in `lone_failures`)."""
        try:
            logits = self.runner.execute(batch)
            synchronize(self.device)  # a device error is this forward's, caught here (not in the sampler)
        except Exception as exc:
            if len(batch.items) == 1:
                self._num_consecutive_failures += 1
                logger.error("the forward failed with %s alone: %r", batch.items[0][0].request_id, exc)
                lone_failures.append((batch.items[0][0], exc))
                return [], None
            logger.warning("a forward of %d sequences failed (%s); retrying in halves", len(batch.items), exc)
            parts = [self._forward(half, lone_failures) for half in _halves(batch)]
            tensors = [t for _, t in parts if t is not None]
            return [s for seqs, _ in parts for s in seqs], (torch.cat(tensors) if tensors else None)
        self._num_consecutive_failures = 0
        batch.mark_computed()
        return [seq for seq, _ in batch.items if seq.num_computed == seq.num_tokens], logits

    def _fail_lone_failures(
        self, failures: list[tuple[Sequence, Exception]], deltas: list[TokenDelta]
    ) -> None:
        """Requests that failed alone fail, unless too many in a row did: then the device is to blame, and
        the engine dies with every request still open (each gets the 503, not a 500 of its own)."""
        if not failures:
            return
        if self._num_consecutive_failures >= self.config.max_consecutive_failures:
            last = failures[-1][1]
            raise EngineDeadError(
                f"the forward pass failed for {self._num_consecutive_failures} requests in a row, each "
                f"alone in its batch: the device looks broken (last error: {last})"
            ) from last
        for seq, exc in failures:
            error = RequestFailedError(f"the model's forward pass failed for this request: {exc}")
            deltas.append(self._fail(seq.request_id, error))

    def _sample(
        self, seqs: list[Sequence], logits: torch.Tensor, failed: list[TokenDelta]
    ) -> list[_Sampled | None]:
        """One token per sequence, batched; if that fails, row by row so that only the bad rows fail."""
        try:
            return self._sample_rows(seqs, logits)
        except Exception as exc:
            logger.warning("batched sampling failed (%s); sampling row by row", exc)
        results: list[_Sampled | None] = []
        for i, seq in enumerate(seqs):
            try:
                results += self._sample_rows([seq], logits[i : i + 1])
            except Exception as exc:
                logger.exception("sampling failed for %s", seq.request_id)
                failed.append(self._fail(seq.request_id, RequestFailedError(f"sampling failed: {exc}")))
                results.append(None)
        return results

    def _sample_rows(self, seqs: list[Sequence], logits: torch.Tensor) -> list[_Sampled]:
        states = [self._requests[s.request_id] for s in seqs]
        meta = SamplingMetadata.build(
            [s.params for s in seqs], [s.output_ids for s in seqs], [r.generator for r in states], self.device
        )
        guides = [r.guide for r in states]
        if any(guide is not None for guide in guides):
            logits = logits.float()  # the guides' masks have their fast path on float32 rows
        result = sample(apply_guides(logits, guides), meta, logits, self._argmax)
        log_probs = result.log_probs or [None] * len(seqs)
        tops = result.top_log_probs or [None] * len(seqs)
        return [_Sampled(*row) for row in zip(result.token_ids, log_probs, tops, strict=True)]

    def _emit(self, state: _RequestState, sampled: _Sampled) -> TokenDelta:
        """Append the token and turn it into the request's delta; a failure here fails this request only."""
        seq = state.seq
        try:
            if state.guide is not None and not state.guide.accept(sampled.token_id):
                raise RequestFailedError(
                    f"guided decoding: the grammar matcher rejected token {sampled.token_id} "
                    f"({state.guide.error}); the output cannot follow the constraint"
                )
            seq.output_ids.append(sampled.token_id)
            delta = state.output.on_token(sampled.token_id, sampled.log_prob, sampled.top)
        except Exception as exc:
            logger.exception("output processing failed for %s", seq.request_id)
            error = exc if isinstance(exc, ServingError) else RequestFailedError(f"output failed: {exc}")
            return self._fail(seq.request_id, error)
        if delta.num_completion_tokens == 1 and seq.admitted_s is not None:
            delta = dataclasses.replace(delta, queue_time_s=seq.admitted_s - seq.arrival_s)
        if delta.is_finished:
            self._drop(seq)
        return delta

    def _fail(self, request_id: str, error: ServingError) -> TokenDelta:
        state = self._requests[request_id]
        self._drop(state.seq)
        return state.output.on_error(error)

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._requests[seq.request_id]


def _halves(batch: ScheduledBatch) -> list[ScheduledBatch]:
    """Split a batch in two, each keeping its single-token (decode) items first."""
    mid = len(batch.items) // 2
    return [
        ScheduledBatch(items=batch.items[:mid], num_decode=min(batch.num_decode, mid)),
        ScheduledBatch(items=batch.items[mid:], num_decode=max(batch.num_decode - mid, 0)),
    ]
