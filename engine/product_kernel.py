"""What the engine's two product kernels share (csrc/linear_bf16.c, csrc/linear_int8.c): three entry
points with one set of signatures, each taking the packed weight by address (the bf16 kernel its packed
tensor, the int8 kernel a handle to its blocks and scales), so that csrc/llama_layers.c runs a layer's
products on either; and the epilogues inside them (SiLU and its multiply after a [gate; up] product,
the residual add after o_proj and down), each checked here against torch's bits.

    product(x, M, K, ldx, weight, N, bias, y, ldy) -> status
    product_silu_mul(x, M, K, ldx, weight, hidden, bias, both, ldb, out, ldo) -> status
    product_add(x, M, K, ldx, weight, N, bias, y, ldy, residual, ldr) -> status

A status of 0 is success, -2 scratch memory that ran out, anything else arguments refused.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable

import torch

from engine import native_build

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p


class ProductKernel:
    """A product library's entry points (named `name`, `name`_silu_mul, `name`_add) and its epilogues
    alone (`silu_mul_bf16`, `add_bf16`), typed; the weight is passed by address."""

    def __init__(self, library: ctypes.CDLL, name: str) -> None:
        self.isa = native_build.isa_of(library, name)
        self.name = name
        product, silu_mul, add = (getattr(library, name + tail) for tail in ("", "_silu_mul", "_add"))
        product.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64]
        for fn in (silu_mul, add):
            fn.argtypes = [_ptr, _i64, _i64, _i64, _ptr, _i64, _ptr, _ptr, _i64, _ptr, _i64]
        for fn in (product, silu_mul, add):
            fn.restype = ctypes.c_int
        self._product, self._silu_mul, self._add = product, silu_mul, add
        self._silu_mul_alone, self._add_alone = library.silu_mul_bf16, library.add_bf16
        self._silu_mul_alone.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64, _ptr, _i64]
        self._add_alone.argtypes = [_ptr, _i64, _ptr, _i64, _i64, _i64]
        self._silu_mul_alone.restype = self._add_alone.restype = None

    @property
    def raw_product(self) -> Callable[..., int]:
        """The product entry point, unchecked (signature above)."""
        return self._product

    @property
    def raw_silu_mul(self) -> Callable[..., int]:
        """The product with SiLU and its multiply, unchecked."""
        return self._silu_mul

    @property
    def raw_add(self) -> Callable[..., int]:
        """The product with the residual add, unchecked."""
        return self._add

    def product_at(
        self, x: torch.Tensor, weight: int, out_features: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """x (M, K) bf16 -> (M, out_features) bf16, the weight at address `weight`; bias float32 or None."""
        out = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
        self._run(self._product, "", x, weight, out_features, bias, out)
        return out

    def silu_mul_at(
        self, x: torch.Tensor, weight: int, hidden: int, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """silu(gate) * up for a weight packed from [W_gate; W_up] (2 x `hidden` outputs, `hidden` a
        multiple of 16): x (M, K) bf16 -> (M, hidden) bf16 in one call, the bits of the product, then
        torch's SiLU and multiply."""
        both = torch.empty(x.shape[0], 2 * hidden, dtype=torch.bfloat16)  # gate and up, as the product writes
        out = torch.empty(x.shape[0], hidden, dtype=torch.bfloat16)
        self._run(self._silu_mul, "_silu_mul", x, weight, hidden, bias, both, out.data_ptr(), hidden)
        return out

    def add_into_at(
        self,
        x: torch.Tensor,
        weight: int,
        out_features: int,
        bias: torch.Tensor | None,
        residual: torch.Tensor,
    ) -> torch.Tensor:
        """residual += x W^T (+ bias), in place, with the bits of torch's `residual + product` (the product
        rounded to bf16, then the sum), in one call; returns `residual`, (M, out_features) bf16 with
        contiguous rows."""
        if residual.dtype != torch.bfloat16:
            raise ValueError("the residual add takes a bfloat16 residual")
        if residual.shape != (x.shape[0], out_features) or residual.stride(1) != 1:
            raise ValueError(f"the residual must be ({x.shape[0]}, {out_features}) with contiguous rows")
        product = torch.empty(x.shape[0], out_features, dtype=torch.bfloat16)
        tail = (residual.data_ptr(), residual.stride(0))
        self._run(self._add, "_add", x, weight, out_features, bias, product, *tail)
        return residual

    def _run(
        self,
        fn: Callable[..., int],
        suffix: str,
        x: torch.Tensor,
        weight: int,
        size: int,
        bias: torch.Tensor | None,
        out: torch.Tensor,
        *tail: int,
    ) -> None:
        """One entry point on x (M, K) into `out` (M, its row width), then `tail`'s arguments; its status
        raised."""
        name, (num_rows, in_features) = self.name + suffix, x.shape
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

    def silu_mul_matches(self, act: Callable[[torch.Tensor], torch.Tensor]) -> bool:
        """Whether this library's SiLU and multiply give `act(gate) * up`'s bits: every bf16 gate value,
        times ones and times random bf16 values."""
        gate = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
        gate = gate.reshape(256, 256)
        gen = torch.Generator().manual_seed(0)
        for up in (torch.ones_like(gate), (torch.randn(256, 256, generator=gen) * 3).bfloat16()):
            mine = torch.empty_like(gate)
            self._silu_mul_alone(gate.data_ptr(), 256, up.data_ptr(), 256, 256, 256, mine.data_ptr(), 256)
            if not torch.equal(mine.view(torch.int16), (act(gate) * up).view(torch.int16)):
                return False
        return True

    def add_matches(self) -> bool:
        """Whether this library's residual add gives torch's `a + b` bits on bf16 values: random ones over
        the whole range, sums that overflow, infinities and NaNs of both signs."""
        gen = torch.Generator().manual_seed(0)
        a = torch.randint(-(2**15), 2**15, (256, 256), generator=gen, dtype=torch.int32)
        b = torch.randint(-(2**15), 2**15, (256, 256), generator=gen, dtype=torch.int32)
        a, b = (t.to(torch.int16).view(torch.bfloat16) for t in (a, b))
        b[0] = a[0]  # doubles: overflow to infinity near the top of the range
        normal = (torch.randn(2, 256, 256, generator=gen) * 4).bfloat16()
        for first, second in ((a, b), (normal[0], normal[1])):
            mine = first.clone()
            self._add_alone(second.data_ptr(), 256, mine.data_ptr(), 256, 256, 256)
            if not torch.equal(mine.view(torch.int16), (first + second).view(torch.int16)):
                return False
        return True
