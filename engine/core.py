"""EngineCore: the synchronous, deterministic heart. step() = schedule -> forward -> sample -> update."""

from __future__ import annotations

import dataclasses
import logging

import torch

from engine.device import release_free_memory
from engine.errors import ContextLengthError, InvalidRequestError
from engine.guided import CompiledGuide, GuideState, apply_guides
from engine.kv_cache import KVCache, KVCacheShape, plan_num_blocks
from engine.model_runner import ModelRunner
from engine.output import RequestOutput
from engine.sampler import SamplingMetadata, make_generator, sample
from engine.scheduler import Scheduler, Sequence
from engine.types import EngineConfig, GenerationRequest, TokenDelta

logger = logging.getLogger("engine")


def eos_token_ids(model, tokenizer) -> frozenset[int]:
    """EOS ids from the generation config (may be a list) and the tokenizer."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return frozenset(ids)


class EngineCore:
    """Owns the scheduler, the model runner and per-request output state. Not thread-safe."""

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
        self.kv_cache = KVCache(shape, num_blocks, config.block_size, dtype, device)
        num_slots, mib = num_blocks * config.block_size, self.kv_cache.num_bytes / 2**20
        logger.info("KV cache: %d blocks, %d tokens, %.1f MiB of %s", num_blocks, num_slots, mib, dtype)
        self.runner = ModelRunner(
            model, self.kv_cache, device, config.optimize_model, config.native_attention
        )
        self.scheduler = Scheduler(
            max_num_seqs=config.max_num_seqs,
            max_num_batched_tokens=config.max_num_batched_tokens,
            block_size=config.block_size,
            num_blocks=num_blocks,
        )
        release_free_memory()
        self._seqs: dict[str, Sequence] = {}
        self._outputs: dict[str, RequestOutput] = {}
        self._generators: dict[str, torch.Generator | None] = {}
        self._guides: dict[str, GuideState] = {}

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
        """Queue a request; a guided one comes with its compiled guide (compiled off this thread)."""
        self.check_request(len(request.prompt_token_ids), request.params.max_new_tokens)
        if (guide is None) != (request.params.guided is None):
            raise InvalidRequestError("a guided request needs its compiled guide, and only it")
        if guide is not None and request.params.ignore_eos:
            raise InvalidRequestError("ignore_eos cannot be combined with guided decoding")
        if guide is not None:
            self._guides[request.request_id] = guide.new_state()
        seq = Sequence(request.request_id, list(request.prompt_token_ids), request.params)
        self._seqs[request.request_id] = seq
        self._outputs[request.request_id] = RequestOutput(request, self.tokenizer, self.eos_token_ids)
        self._generators[request.request_id] = make_generator(request.params.seed, self.device)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> TokenDelta | None:
        """Drop a request now; returns its final ABORT delta, or None if it is unknown."""
        seq = self._seqs.get(request_id)
        if seq is None:
            return None
        delta = self._outputs[request_id].on_abort()
        self._drop(seq)
        return delta

    def abort_all(self) -> list[str]:
        ids = list(self._seqs)
        for request_id in ids:
            self._drop(self._seqs[request_id])
        return ids

    @property
    def has_unfinished(self) -> bool:
        return bool(self._seqs)

    def step(self) -> list[TokenDelta]:
        batch = self.scheduler.schedule()
        if batch.is_empty():
            return []
        logits = self.runner.execute(batch)  # (S, V) for sequences that sample
        ready = [seq for seq, _ in batch.items if seq.num_computed == seq.num_tokens]
        if not ready:
            return []
        meta = SamplingMetadata.build(
            [s.params for s in ready],
            [s.output_ids for s in ready],
            [self._generators[s.request_id] for s in ready],
            self.device,
        )
        guides = [self._guides.get(s.request_id) for s in ready]
        result = sample(apply_guides(logits, guides), meta, raw_logits=logits)
        deltas = []
        for i, seq in enumerate(ready):
            token_id = result.token_ids[i]
            if guides[i] is not None and not guides[i].accept(token_id):
                logger.warning("guide of %s rejected token %d: %s", seq.request_id, token_id, guides[i].error)
            seq.output_ids.append(token_id)
            log_prob = result.log_probs[i] if result.log_probs is not None else None
            delta = self._outputs[seq.request_id].on_token(token_id, log_prob)
            if delta.num_completion_tokens == 1 and seq.admitted_s is not None:
                delta = dataclasses.replace(delta, queue_time_s=seq.admitted_s - seq.arrival_s)
            deltas.append(delta)
            if delta.is_finished:
                self._drop(seq)
        return deltas

    def _drop(self, seq: Sequence) -> None:
        self.scheduler.finish(seq)
        del self._seqs[seq.request_id], self._outputs[seq.request_id], self._generators[seq.request_id]
        self._guides.pop(seq.request_id, None)
