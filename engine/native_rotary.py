"""Rotary embedding and the KV-cache write of a step in one C call a layer (csrc/rotary_kv.c), torch's bits.

Why: a Llama layer's rotary is five torch operations on tensors of a few thousand values (~110 us a
layer at decode sizes on 2 cores, 3.4 ms of a 75 ms batch-32 SmolLM2 step) and its cache write two
more (`index_copy_` of k and v). The kernel rotates q and k in place in the fused q/k/v product, as
transformers computes in bf16 (each product rounded, then the sum), and copies k and v into their
cache slots. `matches` checks the bits and the cache against torch's operations before a model uses it
(`engine/fast_forward.py`); where they differ, the layer keeps torch's operations.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from engine import native_build

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
_ARGTYPES = [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr]


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> RotaryKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built here."""
    library = native_build.build_kernel("rotary_kv", variant)
    return RotaryKernel(library) if library is not None else None


class RotaryKernel:
    """Callable wrapper over the C function; checks what the C code cannot."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.isa = native_build.isa_of(library, "rotary_kv")
        self._fn = library.rotary_kv
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = ctypes.c_int

    @property
    def raw(self) -> Callable[..., int]:
        """The C function itself, unchecked: rotary_kv(cos, sin, qkv, num_tokens, row_stride, num_q_heads,
        num_kv_heads, head_dim, slots, k_cache, v_cache) -> status."""
        return self._fn

    def __call__(
        self,
        qkv: torch.Tensor,  # (T, width) bf16: q heads, k heads, v heads; rotated in place
        cos: torch.Tensor,  # (T, head_dim) bf16, or any view of T x head_dim contiguous values
        sin: torch.Tensor,
        slots: torch.Tensor,  # (T,) int64 cache slot of each token
        k_cache: torch.Tensor,  # (num_slots, num_kv_heads, head_dim) bf16
        v_cache: torch.Tensor,
        num_q_heads: int,
    ) -> None:
        num_tokens, width = qkv.shape
        _, num_kv_heads, head_dim = k_cache.shape
        tensors = (qkv, cos, sin, k_cache, v_cache)
        if any(t.dtype != torch.bfloat16 for t in tensors) or slots.dtype != torch.int64:
            raise ValueError("rotary_kv takes bf16 tensors and int64 slots")
        if qkv.stride(1) != 1 or width < (num_q_heads + 2 * num_kv_heads) * head_dim:
            raise ValueError("qkv rows must hold the q, k and v heads contiguously")
        if not all(t.is_contiguous() for t in (cos, sin, slots, k_cache, v_cache)):
            raise ValueError("cos, sin, slots and the caches must be contiguous")
        if cos.numel() != num_tokens * head_dim or sin.numel() != cos.numel() or slots.numel() != num_tokens:
            raise ValueError("cos, sin and slots must have one row per token")
        status = self._fn(
            cos.data_ptr(),
            sin.data_ptr(),
            qkv.data_ptr(),
            num_tokens,
            qkv.stride(0),
            num_q_heads,
            num_kv_heads,
            head_dim,
            slots.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
        )
        if status != 0:
            raise ValueError(f"rotary_kv supports even head dims up to 512, not {head_dim}")

    def matches(self, reference: Callable, num_q_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether the kernel gives `reference`'s rotated bits (transformers' apply_rotary on (T, heads,
        head_dim) with cos/sin (T, 1, head_dim)) and writes k and v to their slots."""
        gen = torch.Generator().manual_seed(head_dim)
        heads = num_q_heads + 2 * num_kv_heads
        for num_tokens in (1, 3, 17, 70):
            qkv = (torch.randn(num_tokens, heads * head_dim, generator=gen) * 4).bfloat16()
            angles = torch.rand(num_tokens, head_dim, generator=gen) * 1000
            cos, sin = angles.cos().bfloat16(), angles.sin().bfloat16()
            slots = torch.randperm(4 * num_tokens, generator=gen)[:num_tokens]
            k_cache = torch.zeros(4 * num_tokens, num_kv_heads, head_dim, dtype=torch.bfloat16)
            v_cache = torch.zeros_like(k_cache)
            k_end = (num_q_heads + num_kv_heads) * head_dim
            rotated = reference(qkv[:, :k_end].view(num_tokens, -1, head_dim), cos[:, None], sin[:, None])
            values = qkv[:, k_end:].view(num_tokens, num_kv_heads, head_dim).clone()
            mine = qkv.clone()
            self(mine, cos, sin, slots, k_cache, v_cache, num_q_heads)
            if not torch.equal(mine[:, :k_end].view_as(rotated), rotated):
                return False
            keys = rotated[:, num_q_heads:]
            if not (torch.equal(k_cache[slots], keys) and torch.equal(v_cache[slots], values)):
                return False
        return True
