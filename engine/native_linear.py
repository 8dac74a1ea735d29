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
from collections.abc import Callable

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
    library = native_build.build_kernel("linear_bf16", variant)
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
        self._fn, self._silu_mul, self._add = product_functions(library, "linear_bf16")
        self._silu_mul_alone, self._add_alone = epilogue_functions(library)

    @property
    def raw_product(self) -> Callable[..., int]:
        """linear_bf16(x, M, K, ldx, packed, N, bias, y, ldy) -> status, unchecked."""
        return self._fn

    @property
    def raw_silu_mul(self) -> Callable[..., int]:
        """linear_bf16_silu_mul(x, M, K, ldx, packed, hidden, bias, both, ldb, out, ldo) -> status,
        unchecked."""
        return self._silu_mul

    @property
    def raw_add(self) -> Callable[..., int]:
        """linear_bf16_add(x, M, K, ldx, packed, N, bias, y, ldy, residual, ldr) -> status, unchecked."""
        return self._add

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
        out = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
        run_product(self._fn, "linear_bf16", x, packed.data_ptr(), out_features, bias, out)
        return out

    def silu_mul(
        self, x: torch.Tensor, packed: torch.Tensor, hidden: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """silu(gate) * up for `packed` = pack([W_gate; W_up]) (2 x `hidden` outputs, `hidden` a multiple
        of 16): x (M, K) bf16 -> (M, hidden) bf16, the bits of the product, SiLU and multiply on torch,
        in one call (csrc/linear_bf16.c: linear_bf16_silu_mul)."""
        both = torch.empty(x.shape[0], 2 * hidden, dtype=torch.bfloat16)  # gate and up, as the product writes
        out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
        args = (x, packed.data_ptr(), hidden, bias, both, out.data_ptr(), hidden)
        run_product(self._silu_mul, "linear_bf16_silu_mul", *args)
        return out

    def add_into(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """residual += x W^T (+ bias), in place, with the bits of torch's `residual + product` (the product
        rounded to bf16, then the sum), in one call (csrc/linear_bf16.c: linear_bf16_add); returns
        `residual`, (M, out_features) bf16 with contiguous rows."""
        check_residual(residual, x.shape[0], out_features)
        product = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
        tail = (residual.data_ptr(), residual.stride(0))
        run_product(self._add, "linear_bf16_add", x, packed.data_ptr(), out_features, bias, product, *tail)
        return residual

    def silu_mul_matches(self, act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether this library's SiLU and multiply give `act(gate) * up`'s bits (`silu_mul_matches`)."""
        return silu_mul_matches(self._silu_mul_alone, act)

    def add_matches(self) -> bool:
        """Whether this library's residual add gives torch's `a + b` bits (`add_matches`)."""
        return add_matches(self._add_alone)


def run_product(
    fn: Callable[..., int],
    name: str,
    x: torch.Tensor,
    weight: int,
    size: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    *tail: int,
) -> None:
    """One of a product kernel's entry points on x (M, K) with the weight at address `weight`, into `out`
    (M, its row width), then `tail`'s arguments; its status raised: -2 scratch memory, else refused."""
    num_rows, in_features = x.shape
    if x.dtype != torch.bfloat16:
        raise ValueError(f"{name} takes bfloat16 input, not {x.dtype}")
    if x.stride(1) != 1:
        x = x.contiguous()
    bias_ptr = bias.data_ptr() if bias is not None else None
    args = (x.data_ptr(), num_rows, in_features, x.stride(0), weight, size, bias_ptr)
    status = fn(*args, out.data_ptr(), out.shape[1], *tail)
    if status == -2:
        raise MemoryError(f"{name}: no memory for the scratch copy of {num_rows} rows of {in_features}")
    if status != 0:
        raise ValueError(f"{name} refused shapes x {tuple(x.shape)}, N {size}")


def check_residual(residual: torch.Tensor, num_rows: int, out_features: int) -> None:
    """A residual that a product's add epilogue can add into in place: bf16, (rows, N), contiguous rows."""
    if residual.dtype != torch.bfloat16:
        raise ValueError("the residual add takes a bfloat16 residual")
    if residual.shape != (num_rows, out_features) or residual.stride(1) != 1:
        raise ValueError(f"the residual must be ({num_rows}, {out_features}) with contiguous rows")


def silu_mul_matches(
    silu_mul_alone: Callable[..., None], act: Callable[[torch.Tensor], torch.Tensor]
) -> bool:
    """Whether a library's `silu_mul_bf16` (the products' SiLU epilogue alone) gives `act(gate) * up`'s
    bits: every bf16 gate value, times ones and times random bf16 values."""
    gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    gate = gate.reshape(256, 256)
    gen = torch.Generator().manual_seed(0)
    for up in (torch.ones_like(gate), (torch.randn(256, 256, generator=gen) * 3).bfloat16()):
        mine = torch.empty_like(gate)
        silu_mul_alone(gate.data_ptr(), 256, up.data_ptr(), 256, 256, 256, mine.data_ptr(), 256)
        if not torch.equal(mine.view(torch.int16), (act(gate) * up).view(torch.int16)):
            return False
    return True


def add_matches(add_alone: Callable[..., None]) -> bool:
    """Whether a library's `add_bf16` (the products' residual-add epilogue alone) gives torch's `a + b`
    bits on bf16 values: random ones over the whole range, sums that overflow, infinities and NaNs of
    both signs."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randint(-(2**15), 2**15, (256, 256), generator=gen, dtype=torch.int32)
    b = torch.randint(-(2**15), 2**15, (256, 256), generator=gen, dtype=torch.int32)
    a, b = (t.to(torch.int16).view(torch.bfloat16) for t in (a, b))
    b[0] = a[0]  # doubles: overflow to infinity near the top of the range
    normal = (torch.randn(2, 256, 256, generator=gen) * 4).bfloat16()
    for first, second in ((a, b), (normal[0], normal[1])):
        mine = first.clone()
        add_alone(second.data_ptr(), 256, mine.data_ptr(), 256, 256, 256)
        if not torch.equal(mine.view(torch.int16), (first + second).view(torch.int16)):
            return False
    return True


def epilogue_functions(library: ctypes.CDLL) -> tuple[Callable[..., None], Callable[..., None]]:
    """A product library's `silu_mul_bf16` and `add_bf16` (its epilogues alone), typed."""
    silu_mul_alone, add_alone = library.silu_mul_bf16, library.add_bf16
    silu_mul_alone.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64]
    silu_mul_alone.restype = None
    add_alone.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64]
    add_alone.restype = None
    return silu_mul_alone, add_alone


def product_functions(library: ctypes.CDLL, prefix: str) -> tuple[Callable[..., int], ...]:
    """A product library's `<prefix>` (product), `_silu_mul` and `_add` entry points, typed: the
    signatures csrc/llama_layers.c calls them with."""
    product, silu_mul, add = (getattr(library, prefix + tail) for tail in ("", "_silu_mul", "_add"))
    product.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64]
    for fn in (silu_mul, add):
        fn.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64]
    for fn in (product, silu_mul, add):
        fn.restype = ctypes.c_int
    return product, silu_mul, add
