"""Paged attention for transformers' model code, registered as an attention implementation.

transformers computes q/k/v (rotary, q/k norms included) in its own modules and hands them to the
registered function; this one writes k/v into the paged cache and attends over each sequence's
cached tokens. Sequences are packed into one row: tensors arrive as (1, heads, T, head_dim).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from engine.kv_cache import KVCache
from engine.native_attention import AttentionKernel

ATTN_IMPLEMENTATION = "llmserve_paged"


@dataclass(slots=True)
class PrefillSpan:
    """A run of new tokens of one sequence: tokens [start, start+n) attend to cache slots `gather`."""

    start: int
    num_tokens: int
    gather: torch.Tensor  # (ctx,) cache slot of each position 0..ctx-1
    positions: torch.Tensor  # (n,) absolute position of each new token


@dataclass(slots=True)
class AttentionMetadata:
    kv_cache: KVCache
    slot_mapping: torch.Tensor  # (T,) cache slot each new token's k/v is written to
    num_decode: int  # the first num_decode tokens each belong to a different sequence
    decode_gather: torch.Tensor | None  # (D * max_ctx,) cache slots, padded rows point at slot 0
    decode_lens: torch.Tensor | None  # (D,) context length of each decode sequence
    max_decode_ctx: int
    prefills: list[PrefillSpan]
    # With the CPU kernel, every row of the step (decode and prefill tokens alike) reads the cache in
    # place through its sequence's block table (no gather): row r attends to its sequence's positions
    # [0, row_lens[r]), its own included; decode_gather, decode_lens, prefills and packed are unused.
    kernel: AttentionKernel | None = None
    row_block_tables: torch.Tensor | None = None  # (T, width) int64 block ids, padded with 0
    row_lens: torch.Tensor | None = None  # (T,) int64
    # Several prefill spans of similar size attend as one padded batch (one gather and one attention
    # call per layer instead of one per span): built once per step by `pack_prefills`.
    packed: PackedPrefill | None = None
    _masks: dict = field(default_factory=dict)  # (kind, window) -> mask, shared by all layers

    def decode_mask(self, window: int | None) -> torch.Tensor:
        """(D, 1, 1, max_ctx) True where a key may be attended."""
        key = ("decode", window)
        if key not in self._masks:
            pos = torch.arange(self.max_decode_ctx, device=self.decode_lens.device)
            mask = pos[None, :] < self.decode_lens[:, None]
            if window is not None:
                mask &= pos[None, :] > (self.decode_lens[:, None] - 1 - window)
            self._masks[key] = mask[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """(1, 1, n, ctx) causal (and windowed) mask of prefill span `index`."""
        key = (index, window)
        if key not in self._masks:
            span = self.prefills[index]
            k_pos = torch.arange(span.gather.numel(), device=span.positions.device)
            mask = k_pos[None, :] <= span.positions[:, None]
            if window is not None:
                mask &= k_pos[None, :] > span.positions[:, None] - window
            self._masks[key] = mask[None, None]
        return self._masks[key]

    def packed_mask(self, window: int | None) -> torch.Tensor:
        """(P, 1, n, ctx) mask of the packed prefill spans."""
        key = ("packed", window)
        if key not in self._masks:
            self._masks[key] = self.packed.mask(window)
        return self._masks[key]


@dataclass(slots=True)
class PackedPrefill:
    """P prefill spans padded to n new tokens and ctx cached tokens each."""

    query_index: torch.Tensor  # (P * n,) row of each padded query in the step's tokens (pads: a valid row)
    gather: torch.Tensor  # (P * ctx,) cache slot of each padded key (pads: slot of position 0)
    positions: torch.Tensor  # (P, n) absolute position of each query (pads: 0, so never all-masked)
    context_lens: torch.Tensor  # (P,) keys each span may see at most
    valid: torch.Tensor  # (P, n) True for real queries
    rows: torch.Tensor  # (valid.sum(),) the step's token row of each real query, in `valid` order

    def mask(self, window: int | None) -> torch.Tensor:
        """(P, 1, n, ctx) causal, length and window mask."""
        ctx = self.gather.numel() // self.context_lens.numel()
        k_pos = torch.arange(ctx, device=self.positions.device)
        mask = (k_pos[None, None, :] <= self.positions[:, :, None]) & (
            k_pos[None, None, :] < self.context_lens[:, None, None]
        )
        if window is not None:
            mask &= k_pos[None, None, :] > self.positions[:, :, None] - window
        return mask[:, None]


# Pad spans into one batch only while the padded attention work (query x key pairs) is at most this
# many times the real work, or small anyway: below that, per-call overhead costs more than padding.
MAX_PACKING_WASTE = 2.0
SMALL_PACKED_PAIRS = 2**18


def pack_prefills(spans: list[PrefillSpan]) -> PackedPrefill | None:
    """One padded batch of `spans` (two or more, of similar sizes), or None to attend them one by one."""
    if len(spans) < 2:
        return None
    n = max(span.num_tokens for span in spans)
    ctx = max(span.gather.numel() for span in spans)
    real = sum(span.num_tokens * span.gather.numel() for span in spans)
    if len(spans) * n * ctx > max(MAX_PACKING_WASTE * real, SMALL_PACKED_PAIRS):
        return None
    device = spans[0].gather.device
    query_index = torch.empty(len(spans), n, dtype=torch.long, device=device)
    gather = torch.empty(len(spans), ctx, dtype=torch.long, device=device)
    positions = torch.zeros(len(spans), n, dtype=torch.long, device=device)
    valid = torch.zeros(len(spans), n, dtype=torch.bool, device=device)
    for i, span in enumerate(spans):
        num, width = span.num_tokens, span.gather.numel()
        query_index[i] = span.start
        query_index[i, :num] = torch.arange(span.start, span.start + num, device=device)
        gather[i] = span.gather[0]
        gather[i, :width] = span.gather
        positions[i, :num] = span.positions
        valid[i, :num] = True
    lens = torch.tensor([span.gather.numel() for span in spans], device=device)
    return PackedPrefill(query_index.flatten(), gather.flatten(), positions, lens, valid, query_index[valid])


def _attend(q, k, v, mask, scale, softcap):
    """q (B, Hk, G, hd) or (B, H, n, hd) against k/v (B, Hk, ctx, hd); grouped heads share k/v."""
    if softcap is None:
        gqa = q.shape[1] != k.shape[1]
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1) @ v.float()).to(q.dtype)


def attend_paged(
    layer: int,
    query: torch.Tensor,  # (T, H, hd)
    key: torch.Tensor | None,  # (T, Hk, hd)
    value: torch.Tensor | None,  # (T, Hk, hd)
    meta: AttentionMetadata,
    scaling: float | None,
    sliding_window: int | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """Write this step's k/v into the cache (key and value None: written already), then attend;
    returns (T, H, hd)."""
    k_cache, v_cache = meta.kv_cache.keys[layer], meta.kv_cache.values[layer]
    if key is not None:
        k_cache.index_copy_(0, meta.slot_mapping, key)
        v_cache.index_copy_(0, meta.slot_mapping, value)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = k_cache.shape[1]
    out = query.new_empty(num_tokens, num_heads, head_dim)
    num_decode = meta.num_decode
    if meta.kernel is not None:
        meta.kernel(
            query,
            k_cache,
            v_cache,
            meta.row_block_tables,
            meta.row_lens,
            meta.kv_cache.block_size,
            head_dim**-0.5 if scaling is None else scaling,
            sliding_window,
            softcap,
            out,
        )
        return out
    if num_decode:
        ctx = meta.max_decode_ctx
        # One query token per sequence: fold the query heads of a group into the query-length axis.
        q = query[:num_decode].reshape(num_decode, num_kv_heads, -1, head_dim)  # (D, Hk, G, hd)
        k = k_cache.index_select(0, meta.decode_gather).view(num_decode, ctx, num_kv_heads, head_dim)
        v = v_cache.index_select(0, meta.decode_gather).view(num_decode, ctx, num_kv_heads, head_dim)
        o = _attend(
            q, k.transpose(1, 2), v.transpose(1, 2), meta.decode_mask(sliding_window), scaling, softcap
        )
        out[:num_decode] = o.reshape(num_decode, num_heads, head_dim)
    packed = meta.packed
    if packed is not None:
        num_spans = packed.context_lens.numel()
        q = query.index_select(0, packed.query_index).view(num_spans, -1, num_heads, head_dim)
        k = k_cache.index_select(0, packed.gather).view(num_spans, -1, num_kv_heads, head_dim)
        v = v_cache.index_select(0, packed.gather).view(num_spans, -1, num_kv_heads, head_dim)
        mask = meta.packed_mask(sliding_window)
        o = _attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask, scaling, softcap)
        out[packed.rows] = o.transpose(1, 2)[packed.valid]
        return out
    for index, span in enumerate(meta.prefills):
        q = query[span.start : span.start + span.num_tokens].transpose(0, 1).unsqueeze(0)  # (1, H, n, hd)
        k = k_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)  # (1, Hk, ctx, hd)
        v = v_cache.index_select(0, span.gather).transpose(0, 1).unsqueeze(0)
        o = _attend(q, k, v, meta.prefill_mask(index, sliding_window), scaling, softcap)
        out[span.start : span.start + span.num_tokens] = o[0].transpose(0, 1)
    return out


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, hd)
    key: torch.Tensor,  # (1, Hk, T, hd)
    value: torch.Tensor,  # (1, Hk, T, hd)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    softcap: float | None = None,
    attn_meta: AttentionMetadata | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """The function transformers calls in place of sdpa/eager attention."""
    if attn_meta is None:
        raise RuntimeError(f"{ATTN_IMPLEMENTATION} attention needs attn_meta; run the model via ModelRunner")
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (T, heads, hd)
    out = attend_paged(module.layer_idx, q, k, v, attn_meta, scaling, sliding_window, softcap)
    return out.unsqueeze(0), None  # (1, T, H, hd)


def register() -> str:
    """Make the implementation known to transformers (idempotent); returns its name."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
    return ATTN_IMPLEMENTATION
