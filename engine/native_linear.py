"""bf16 matrix products on the CPU in a small C kernel (csrc/linear_bf16.c), built here on first use.

Why: the products are most of a decode step, and oneDNN's packed bf16 kernels are slowest at the row
counts decoding has (1-32 rows): on a 2-core EPYC Zen 4, SmolLM2's products take 10.5 ms a step for one
row and 16.5 ms for 16 in oneDNN, 6.0 and 13.8 ms here (and no worse at prefill sizes). Every output
is one float32 sum over k in a fixed order, so a row's bits are the same whatever else is in the
batch, without padding rows. Needs AVX512-BF16, or AVX-512F or AVX2 + FMA, where the bf16 pairs are
widened to float32 in registers (`linear_bf16_supported()` in the built library). On an AVX2-only EPYC, where
torch has no fast bf16 product at all, a batch-16 decode step runs 2.7-4x faster with it and the
engine alone 5x (docs/performance.md). On CPUs with AMX (Intel Sapphire Rapids and later) the same build
runs the products on AMX tiles, with the same packed weight (its layout is AMX's B tile): a row's bits
still do not depend on the batch, and the products of a 64-row step run ~6x faster than on AVX512-BF16
(docs/performance.md, 'AMX: Intel Xeon with AMX').
Elsewhere, and for other dtypes, `engine/fusion.py` keeps oneDNN.
"""

from __future__ import annotations

import ctypes
import functools
import logging

import torch

from engine import native_build
from engine.product_kernel import ProductKernel

logger = logging.getLogger("engine")

BLOCK = 16  # output columns per packed block (csrc/linear_bf16.c)


def supports(weight: torch.Tensor) -> bool:
    """A CPU bf16 weight whose input size is even (the kernel reads k in pairs)."""
    return weight.device.type == "cpu" and weight.dtype == torch.bfloat16 and weight.shape[1] % 2 == 0


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> LinearKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built or cannot run on this CPU."""
    library = native_build.build_kernel("linear_bf16", variant)
    if library is None:
        return None
    if not library.linear_bf16_supported():
        logger.info("this CPU has neither AVX512-BF16 nor AVX2 + FMA: bf16 products stay on torch")
        return None
    return LinearKernel(library)


class LinearKernel(ProductKernel):
    """y = x W^T (+ bias) for a weight packed once by `pack` (csrc/linear_bf16.c)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, "linear_bf16")

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
        return self.product_at(x, packed.data_ptr(), out_features, bias)

    def silu_mul(
        self, x: torch.Tensor, packed: torch.Tensor, hidden: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """silu(gate) * up for `packed` = pack([W_gate; W_up]) (`silu_mul_at`)."""
        return self.silu_mul_at(x, packed.data_ptr(), hidden, bias)

    def add_into(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """residual += x W^T (+ bias) in place (`add_into_at`); returns `residual`."""
        return self.add_into_at(x, packed.data_ptr(), out_features, bias, residual)
