"""RMSNorm on the CPU in a small C kernel (csrc/rms_norm.c) that gives torch's very bits.

Why: transformers' RMSNorm is eight torch operations (float32 statistics, then the weight), ~25-35 us
a call at decode sizes on this 2-core machine and 61 calls a SmolLM2 step; the kernel does one pass,
~11-14 us a call from Python. It reproduces torch's float32 sum order, so the engine's fast forward
keeps transformers' logits to the bit; `matches` checks that on random rows before a model uses it
(`engine/fast_forward.py`), and a torch whose sum runs in another order keeps torch's norms.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable

import torch

from engine import native_build

_i64, _ptr = ctypes.c_int64, ctypes.c_void_p
LLAMA, GEMMA = 0, 1  # the C function's `kind`: transformers' two RMSNorms


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> NormKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built here."""
    library = native_build.build_kernel("rms_norm", variant)
    return NormKernel(library) if library is not None else None


class NormKernel:
    """Callable wrapper over the C function: `llama` and `gemma` are transformers' two RMSNorms."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.isa = native_build.isa_of(library, "rms_norm")
        self._fn = library.rms_norm
        self._fn.argtypes = [ctypes.c_int, _ptr, _i64, _i64, _i64, _ptr, ctypes.c_float, _ptr]
        self._fn.restype = ctypes.c_int

    @property
    def raw(self) -> Callable[..., int]:
        """The C function itself, unchecked: rms_norm(kind, x, rows, n, ldx, weight, eps, out) -> status."""
        return self._fn

    def _run(self, kind: int, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        want = torch.float32 if kind == GEMMA else torch.bfloat16
        if x.dtype != torch.bfloat16 or weight.dtype != want or not weight.is_contiguous():
            raise ValueError(f"rms_norm takes bf16 rows and a contiguous {want} weight")
        n = x.shape[-1]
        rows = x.reshape(-1, n)
        if rows.stride(1) != 1:
            rows = rows.contiguous()
        out = torch.empty(rows.shape, dtype=torch.bfloat16)
        status = self._fn(
            kind, rows.data_ptr(), rows.shape[0], n, rows.stride(0), weight.data_ptr(), eps, out.data_ptr()
        )
        if status != 0:
            raise MemoryError("rms_norm could not allocate its scratch memory")
        return out.view(x.shape)

    def llama(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """weight * (x * rsqrt(mean(x^2) + eps)).to(bf16); x and weight bf16."""
        return self._run(LLAMA, x, weight, eps)

    def gemma(self, x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """(x * rsqrt(mean(x^2) + eps) * scale).to(bf16); x bf16, scale float32 (1 + weight)."""
        return self._run(GEMMA, x, scale, eps)

    def matches(self, reference: Callable, gemma: bool, width: int) -> bool:
        """Whether the kernel gives `reference`'s bits on random bf16 rows of this width."""
        gen = torch.Generator().manual_seed(width)
        for num_rows in (1, 2, 5, 16, 33):
            spread = 1 + 8 * torch.rand(num_rows, 1, generator=gen)
            x = (torch.randn(num_rows, width, generator=gen) * spread).bfloat16()
            weight = torch.randn(width, generator=gen) * 0.3 + 1
            weight = weight.float() if gemma else weight.bfloat16()
            for eps in (1e-5, 1e-6):
                mine = self.gemma(x, weight, eps) if gemma else self.llama(x, weight, eps)
                if not torch.equal(mine, reference(x, weight, eps)):
                    return False
        return True
