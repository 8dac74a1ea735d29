"""The paged KV cache: fixed-size blocks of token slots, sized once from a memory budget."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from engine import huge_pages as huge_pages_arena


@dataclass(frozen=True, slots=True)
class KVCacheShape:
    num_layers: int
    num_kv_heads: int
    head_dim: int

    @classmethod
    def from_model_config(cls, config) -> KVCacheShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        num_heads = text.num_attention_heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
        num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
        return cls(text.num_hidden_layers, num_kv_heads, head_dim)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype.itemsize


class KVCache:
    """Per-layer key and value tensors, each (num_blocks * block_size, num_kv_heads, head_dim)."""

    def __init__(
        self,
        shape: KVCacheShape,
        num_blocks: int,
        block_size: int,
        dtype: torch.dtype,
        device: torch.device,
        huge_pages: bool = False,
    ) -> None:
        """`huge_pages`: on a CPU, every layer's tensors in one arena of huge pages (engine/huge_pages.py)."""
        self.shape, self.num_blocks, self.block_size, self.dtype = shape, num_blocks, block_size, dtype
        num_slots = num_blocks * block_size
        dims = (num_slots, shape.num_kv_heads, shape.head_dim)
        num_layers = shape.num_layers
        if huge_pages and torch.device(device).type == "cpu":
            tensors = huge_pages_arena.zeros([dims] * (2 * num_layers), dtype)
        else:
            tensors = [torch.zeros(dims, dtype=dtype, device=device) for _ in range(2 * num_layers)]
        self.keys, self.values = tensors[:num_layers], tensors[num_layers:]

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)


def num_blocks_for(num_tokens: int, block_size: int) -> int:
    return math.ceil(num_tokens / block_size)


def plan_num_blocks(
    shape: KVCacheShape,
    dtype: torch.dtype,
    *,
    kv_cache_bytes: int,
    block_size: int,
    max_num_seqs: int,
    max_model_len: int,
) -> int:
    """Blocks that fit the budget, capped at what max_num_seqs full-length sequences could use."""
    bytes_per_block = shape.bytes_per_token(dtype) * block_size
    budget_blocks = kv_cache_bytes // bytes_per_block
    useful_blocks = max_num_seqs * num_blocks_for(max_model_len, block_size)
    needed = num_blocks_for(max_model_len, block_size)
    if budget_blocks < needed:
        raise ValueError(
            f"kv_cache_bytes={kv_cache_bytes} holds {budget_blocks * block_size} tokens, less than one "
            f"max_model_len={max_model_len} sequence ({needed * bytes_per_block} bytes needed); "
            "raise kv_cache_bytes or lower max_model_len"
        )
    return min(budget_blocks, useful_blocks)
