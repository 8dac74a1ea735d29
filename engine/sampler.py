"""Batched per-request sampling: small pure functions on logits, plus one `sample()` per engine step.

Every function works on whatever device the logits live on; nothing here holds state.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import native_argmax
from engine.native_argmax import ArgmaxKernel
from engine.types import SamplingParams


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]  # one per row
    log_probs: list[float] | None  # raw-model log prob of each chosen token; None if no row asked
    # each row's most likely (token id, raw log prob), best first, as many as the batch's largest ask
    top_log_probs: list[list[tuple[int, float]]] | None = None


def make_generator(seed: int | None, device: torch.device | str | None = None) -> torch.Generator | None:
    """One generator per seeded request, created once and kept for the request's lifetime.

    It lives on the host whatever `device` is: a draw takes one uniform per row (see sample_from_probs).
    Any int seeds it: torch takes [0, 2**64), so the seed is reduced modulo 2**64 (as documented)."""
    del device  # kept so callers need not know where draws happen
    if seed is None:
        return None
    return torch.Generator().manual_seed(seed % 2**64)


# ---------------------------------------------------------------------------------------------
# Pure functions. Each returns a new tensor and never writes to its input (the raw logits are
# still needed for log probs).


def apply_penalties(
    logits: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor
) -> torch.Tensor:
    """OpenAI penalties: logits - frequency * count - presence * (count > 0)."""
    # logits, counts: (B, V); presence, frequency: (B,)
    return logits - frequency[:, None] * counts - presence[:, None] * (counts > 0).to(logits.dtype)


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature; rows with temperature 0 (greedy) are left as they are."""
    # logits: (B, V); temperature: (B,)
    safe = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / safe[:, None].to(logits.dtype)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_k: int | None = None) -> torch.Tensor:
    """Keep each row's k largest logits (and anything tied with the k-th); k <= 0 leaves a row alone.

    `max_k` (at least the largest k in use, if the caller knows it) saves a device-to-host sync."""
    # logits: (B, V); top_k: (B,) int
    vocab_size = logits.shape[-1]
    is_off = (top_k <= 0) | (top_k >= vocab_size)
    if max_k is None:
        max_k = int(top_k.max())
    max_k = min(max(max_k, 1), vocab_size)
    top_values = logits.topk(max_k, dim=-1).values  # (B, max_k), sorted descending
    kth = top_values.gather(1, (top_k.long().clamp(1, max_k) - 1)[:, None])  # (B, 1)
    kth = kth.masked_fill(is_off[:, None], float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


# The nucleus of a real model's distribution almost always lies in its top few hundred tokens, and a
# top-k that size costs a fraction of a full sort (which is very slow on CPU).
_NUM_TOP_P_CANDIDATES = 256


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus: keep the fewest top tokens whose probability reaches top_p (at least one), plus ties."""
    # logits: (B, V); top_p: (B,)
    top_p = top_p.float()[:, None]  # (B, 1)
    probs = logits.float().softmax(dim=-1)  # (B, V)
    candidates = probs.topk(min(_NUM_TOP_P_CANDIDATES, probs.shape[-1]), dim=-1).values  # (B, C)
    is_covered = (candidates.sum(dim=-1, keepdim=True) >= top_p) | (top_p >= 1.0)
    if not bool(is_covered.all()):  # a flat distribution: its nucleus needs the full sort
        candidates = probs.sort(dim=-1, descending=True).values  # (B, V)
    mass_before = candidates.cumsum(dim=-1) - candidates  # probability of strictly better tokens
    num_keep = (mass_before < top_p).sum(dim=-1, keepdim=True).clamp_min(1)  # (B, 1)
    threshold = candidates.gather(1, num_keep - 1)  # (B, 1) smallest kept probability
    threshold = threshold.masked_fill(top_p >= 1.0, 0.0)
    return logits.masked_fill(probs < threshold, float("-inf"))


def sample_from_probs(probs: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Draw one token per row; a row with a generator uses only its own, so its draw ignores the batch."""
    # probs: (B, V) float32 -> (B,) int64. Inverse CDF: one uniform per row, no (B, V) random tensor.
    cdf = probs.float().cumsum(dim=-1)  # (B, V), non-decreasing
    uniform = _uniforms(generators).to(device=cdf.device)  # (B, 1) in [0, 1)
    # u < 1 puts the target below the row's total, so the first cdf entry above it is a token with p > 0.
    token_ids = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True)  # (B, 1)
    return token_ids.squeeze(1).clamp_max(probs.shape[-1] - 1)


def _uniforms(generators: list[torch.Generator | None]) -> torch.Tensor:
    """(B, 1) float32 uniforms on the host: unseeded rows from torch's default generator."""
    # Host draws cost no kernel launch per seeded row, and a seed gives the same draws on CPU and GPU.
    uniform = torch.rand(len(generators), 1)
    for row, generator in enumerate(generators):
        if generator is not None:
            uniform[row] = torch.rand(1, generator=generator, device=generator.device).cpu()
    return uniform


def compute_log_probs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """log_softmax of the raw logits at the chosen tokens; every value is <= 0."""
    # logits: (B, V); token_ids: (B,) -> (B,) float32
    logits = logits.float()
    chosen = logits.gather(1, token_ids[:, None]).squeeze(1)
    return (chosen - logits.logsumexp(dim=-1)).clamp_max(0.0)


def top_log_probs(logits: torch.Tensor, num: int) -> list[list[tuple[int, float]]]:
    """Each row's `num` most likely tokens under log_softmax of the raw logits, best first."""
    # logits: (B, V) -> B lists of (token id, log prob)
    logits = logits.float()
    values, ids = logits.topk(min(num, logits.shape[-1]), dim=-1)  # (B, num)
    values = (values - logits.logsumexp(dim=-1, keepdim=True)).clamp_max(0.0)
    return [
        list(zip(row_ids, row_values, strict=True))
        for row_ids, row_values in zip(ids.tolist(), values.tolist(), strict=True)
    ]


def token_counts(output_ids: torch.Tensor, output_lens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """How often each vocabulary entry appears in each row's generated tokens."""
    # output_ids: (N,) int64, every row's ids back to back; output_lens: (B,) int64 -> (B, V) float32
    batch_size = output_lens.shape[0]
    rows = torch.arange(batch_size, device=output_ids.device)
    # output_size spares a device-to-host sync on CUDA.
    rows = rows.repeat_interleave(output_lens, output_size=output_ids.shape[0])  # (N,)
    counts = torch.zeros(batch_size * vocab_size, dtype=torch.float32, device=output_ids.device)
    ones = torch.ones_like(output_ids, dtype=torch.float32)
    return counts.scatter_add_(0, rows * vocab_size + output_ids, ones).view(batch_size, vocab_size)


# ---------------------------------------------------------------------------------------------
# The per-step entry point.


@dataclass(slots=True)
class SamplingMetadata:
    """One step's sampling settings as tensors; a field is None when no row in the batch needs it."""

    generators: list[torch.Generator | None]  # (B,) own generator of each seeded, non-greedy row
    is_all_greedy: bool
    needs_log_probs: bool
    max_top_logprobs: int = 0  # the most alternatives any row asked for
    is_greedy: torch.Tensor | None = None  # (B,) bool; None when no row or every row is greedy
    temperature: torch.Tensor | None = None  # (B,) float32; None when every sampled row uses 1.0
    top_k_rows: torch.Tensor | None = None  # (R,) int64 rows that use top-k; None = every row
    top_k: torch.Tensor | None = None  # (R,) int64
    max_top_k: int = 0
    top_p_rows: torch.Tensor | None = None  # (R,) int64 rows that use top-p; None = every row
    top_p: torch.Tensor | None = None  # (R,) float32
    presence_penalty: torch.Tensor | None = None  # (B,) float32
    frequency_penalty: torch.Tensor | None = None  # (B,) float32
    output_ids: torch.Tensor | None = None  # (N,) int64 every row's generated ids, back to back
    output_lens: torch.Tensor | None = None  # (B,) int64 how many of them belong to each row

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        output_token_ids: list[list[int]],
        generators: list[torch.Generator | None],
        device: torch.device | str,
    ) -> SamplingMetadata:
        """Turn per-request settings into batch tensors on `device` (one row per request)."""
        is_greedy = [p.is_greedy for p in params]
        meta = cls(
            generators=[None if greedy else g for greedy, g in zip(is_greedy, generators, strict=True)],
            is_all_greedy=all(is_greedy),
            needs_log_probs=any(p.return_log_probs for p in params),
            max_top_logprobs=max((p.num_top_logprobs for p in params if p.return_log_probs), default=0),
        )
        if not meta.is_all_greedy:
            _fill_random_fields(meta, params, is_greedy, device)
        if any(p.presence_penalty or p.frequency_penalty for p in params):
            _fill_penalty_fields(meta, params, output_token_ids, device)
        return meta


def _fill_random_fields(
    meta: SamplingMetadata, params: list[SamplingParams], is_greedy: list[bool], device: torch.device | str
) -> None:
    """Temperature, top-k and top-p tensors, for the rows that actually sample."""
    if any(is_greedy):
        meta.is_greedy = torch.tensor(is_greedy, dtype=torch.bool, device=device)
    temperatures = [1.0 if greedy else p.temperature for greedy, p in zip(is_greedy, params, strict=True)]
    if any(t != 1.0 for t in temperatures):
        meta.temperature = torch.tensor(temperatures, dtype=torch.float32, device=device)
    k_rows = [i for i, p in enumerate(params) if not is_greedy[i] and p.top_k > 0]
    if k_rows:
        meta.top_k_rows = _rows_or_none(k_rows, len(params), device)
        meta.top_k = torch.tensor([params[i].top_k for i in k_rows], dtype=torch.int64, device=device)
        meta.max_top_k = max(params[i].top_k for i in k_rows)
    p_rows = [i for i, p in enumerate(params) if not is_greedy[i] and p.top_p < 1.0]
    if p_rows:
        meta.top_p_rows = _rows_or_none(p_rows, len(params), device)
        meta.top_p = torch.tensor([params[i].top_p for i in p_rows], dtype=torch.float32, device=device)


def _fill_penalty_fields(
    meta: SamplingMetadata,
    params: list[SamplingParams],
    output_token_ids: list[list[int]],
    device: torch.device | str,
) -> None:
    """Penalty strengths and the generated ids the counts are built from."""
    flat_ids = list(itertools.chain.from_iterable(output_token_ids))
    if not flat_ids:
        return  # nothing generated yet: every count is 0, so penalties change nothing
    meta.output_ids = torch.tensor(flat_ids, dtype=torch.int64, device=device)
    lens = [len(ids) for ids in output_token_ids]
    meta.output_lens = torch.tensor(lens, dtype=torch.int64, device=device)
    meta.presence_penalty = torch.tensor(
        [p.presence_penalty for p in params], dtype=torch.float32, device=device
    )
    meta.frequency_penalty = torch.tensor(
        [p.frequency_penalty for p in params], dtype=torch.float32, device=device
    )


def _rows_or_none(rows: list[int], batch_size: int, device: torch.device | str) -> torch.Tensor | None:
    # None means "every row", which skips a gather and a scatter.
    return None if len(rows) == batch_size else torch.tensor(rows, dtype=torch.int64, device=device)


def sample(
    logits: torch.Tensor,
    meta: SamplingMetadata,
    raw_logits: torch.Tensor | None = None,
    argmax: ArgmaxKernel | None = None,
) -> SamplerOutput:
    """Pick one token per row of `logits` (B, V), any float dtype, following each row's settings.

    Log probs come from `raw_logits` when given (the model's distribution before guided masks). `argmax`:
    the C kernel for greedy picks over CPU float32 or bf16 rows (engine/native_argmax.py), torch's argmax
    for other logits or without it."""
    processed = logits
    if meta.output_ids is not None:
        processed = logits.float()
        counts = token_counts(meta.output_ids, meta.output_lens, logits.shape[-1])  # (B, V)
        processed = apply_penalties(processed, counts, meta.presence_penalty, meta.frequency_penalty)
    # All greedy is the common fast path: one argmax, no softmax, no sort.
    token_ids = _greedy(processed, argmax) if meta.is_all_greedy else _sample_random(processed.float(), meta)
    source = logits if raw_logits is None else raw_logits
    log_probs = compute_log_probs(source, token_ids).tolist() if meta.needs_log_probs else None
    top = top_log_probs(source, meta.max_top_logprobs) if meta.max_top_logprobs else None
    return SamplerOutput(token_ids=token_ids.tolist(), log_probs=log_probs, top_log_probs=top)


def _greedy(logits: torch.Tensor, argmax: ArgmaxKernel | None) -> torch.Tensor:
    """Each row's argmax: the same index from the kernel and from torch."""
    if argmax is not None and native_argmax.supports(logits):
        return argmax(logits)
    return logits.argmax(dim=-1)


def _sample_random(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Temperature, top-k, top-p, then a draw; greedy rows keep the argmax of `logits`."""
    # logits: (B, V) float32, already penalised -> (B,) int64
    greedy_ids = logits.argmax(dim=-1) if meta.is_greedy is not None else None
    if meta.temperature is not None:
        logits = apply_temperature(logits, meta.temperature)
    if meta.top_k is not None:
        logits = _on_rows(logits, meta.top_k_rows, lambda x: apply_top_k(x, meta.top_k, meta.max_top_k))
    if meta.top_p is not None:
        logits = _on_rows(logits, meta.top_p_rows, lambda x: apply_top_p(x, meta.top_p))
    token_ids = sample_from_probs(logits.softmax(dim=-1), meta.generators)
    if greedy_ids is not None:
        token_ids = torch.where(meta.is_greedy, greedy_ids, token_ids)
    return token_ids


def _on_rows(
    logits: torch.Tensor, rows: torch.Tensor | None, fn: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn` to the chosen rows only (all rows when `rows` is None); out of place."""
    if rows is None:
        return fn(logits)
    return logits.index_copy(0, rows, fn(logits.index_select(0, rows)))
