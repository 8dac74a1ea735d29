"""Attention on the CPU in a small C kernel (csrc/decode_attention.c), built here on first use.

Every new token of a step, decode or prefill, is one row: a one-token query that attends to its own
sequence's cached positions [0, len) (its own k/v written first), read in place through the block
table. A prefill of n tokens is n rows with lengths start+1 .. start+n: causal attention without a mask
or a gather, and no work on the masked half.

Why: at decode, torch's path (gather the cached k/v into (D, ctx) tensors, then
scaled_dot_product_attention) spent ~300 us a layer on a dozen tiny ops at batch 16 on this 2-core
machine; at prefill, SDPA with an explicit causal mask computes every query-key pair (1.5-1.7 ms a
layer for a 255-token prompt, a quarter of the step). bf16 caches with 16-token pages take an
AVX-512 path (q.k a page at a time: AVX512-BF16 dot products, or on AVX-512F alone the keys widened to
float32 and FMAs), or on AVX2 an eight-position q.k; the rest a generic loop. float32
accumulation, and each row is computed alone in a fixed order, so a greedy completion is the same
alone and amid a batch, and whatever the prefill chunking.

The kernel is built on first use by `engine/native_build.py` (the system C compiler, for this CPU).
Without a compiler, or for other devices and dtypes, `load()` returns None and attention stays on torch.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from collections.abc import Callable

import torch

from engine import native_build

logger = logging.getLogger("engine")

DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_ARGTYPES = [_int, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _f32, _ptr]


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in DTYPE_CODES


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> AttentionKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built here."""
    library = native_build.build_kernel("decode_attention", variant)
    return AttentionKernel(library) if library is not None else None


class AttentionKernel:
    """Callable wrapper over the C function; checks what the C code cannot."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.isa = native_build.isa_of(library, "decode_attention")
        self._fn = library.decode_attention
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = _int

    @property
    def raw(self) -> Callable[..., int]:
        """The C function itself, unchecked (the arguments of `__call__`, the dtype's code first)."""
        return self._fn

    def __call__(
        self,
        query: torch.Tensor,  # (D, H, hd)
        k_cache: torch.Tensor,  # (slots, Hk, hd)
        v_cache: torch.Tensor,  # (slots, Hk, hd)
        block_tables: torch.Tensor,  # (D, width) int64
        ctx_lens: torch.Tensor,  # (D,) int64, each >= 1
        block_size: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,  # (D, H, hd), written
    ) -> None:
        query = query.contiguous()
        num_seqs, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[1]
        tensors = (query, k_cache, v_cache, out)
        if not all(t.is_contiguous() and t.dtype == query.dtype for t in tensors):
            raise ValueError("decode attention wants contiguous tensors of one dtype")
        if block_tables.dtype != torch.int64 or ctx_lens.dtype != torch.int64:
            raise ValueError("block tables and context lengths must be int64")
        if not block_tables.is_contiguous() or num_heads % num_kv_heads:
            raise ValueError("bad block table layout or head count")
        status = self._fn(
            DTYPE_CODES[query.dtype],
            query.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            ctx_lens.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            sliding_window or 0,
            softcap or 0.0,
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch memory")
