"""bf16 matrix products on the CPU in a small C kernel (csrc/linear_bf16.c), built here on first use.

Why: the products are most of a decode step, and oneDNN's packed bf16 kernels are slowest at the row
counts decoding has (1-32 rows): on a 2-core EPYC Zen 4, SmolLM2's products take 10.5 ms a step for one
row and 16.5 ms for 16 in oneDNN, 6.0 and 13.8 ms here (and no worse at prefill sizes). Every output
is one float32 sum over k in a fixed order, so a row's bits are the same whatever else is in the
batch, without padding rows. Needs AVX512-BF16, or AVX-512F or AVX2 + FMA, where the bf16 pairs are
widened to float32 in registers (`linear_bf16_supported()` in the built library). On an AVX2-only EPYC, where
torch has no fast bf16 product at all, a batch-16 decode step runs 2.7-4x faster with it and the
engine alone 5x (docs/performance.md).
Elsewhere, and for other dtypes, `engine/fusion.py` keeps oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from engine import native_build

logger = logging.getLogger("engine")

BLOCK = 16  # output columns per packed block (csrc/linear_bf16.c)
_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


def supports(weight: torch.Tensor) -> bool:
    """A CPU bf16 weight whose input size is even (the kernel reads k in pairs)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> LinearKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built or cannot run on this CPU."""
    library = native_build.build("linear_bf16", variant=variant)
    if library is None:
        return None
    if not library.linear_bf16_supported():
        logger.info("this CPU has neither AVX512-BF16 nor AVX2 + FMA: bf16 products stay on torch")
        return None
    return LinearKernel(library)


class LinearKernel:
    """y = x W^T (+ bias) for a weight packed once by `pack`."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.isa = native_build.isa_of(library, "linear_bf16")
        self._fn = library.linear_bf16
        self._fn.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64]
        self._fn.restype = ctypes.c_int

    @staticmethod
    def pack(weight: torch.Tensor) -> torch.Tensor:
        """(N, K) -> (ceil(N/16), K/2, 16, 2): each block's 16 columns side by side, k in pairs."""
        out_features, in_features = weight.shape
        padded = -(-out_features // BLOCK) * BLOCK
        weight = torch.nn.functional.pad(weight.detach(), (0, 0, 0, padded - out_features))
        blocks = weight.reshape(padded // BLOCK, BLOCK, in_features // 2, 2)
        return blocks.permute(0, 2, 1, 3).contiguous()

    def __call__(
        self, x: torch.Tensor, packed: torch.Tensor, out_features: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x (M, K) bf16 with unit column stride -> (M, out_features) bf16; bias float32 or None."""
        num_rows, in_features = x.shape
        if x.dtype != torch.bfloat16:
            raise ValueError(f"linear_bf16 takes bfloat16 input, not {x.dtype}")
        if x.stride(1) != 1:
            x = x.contiguous()
        out = torch.empty(num_rows, out_features, dtype=torch.bfloat16)
        status = self._fn(
            x.data_ptr(),
            num_rows,
            in_features,
            x.stride(0),
            packed.data_ptr(),
            out_features,
            bias.data_ptr() if bias is not None else None,
            out.data_ptr(),
            out_features,
        )
        if status == -2:
            raise MemoryError(f"linear_bf16: no memory to widen {num_rows} rows of {in_features} to float32")
        if status != 0:
            raise ValueError(f"linear_bf16 refused shapes x {tuple(x.shape)}, N {out_features}")
        return out
