"""Matrix products with int8 weights and int8 activations on the CPU (csrc/linear_int8.c), bf16 in and out.

Weights and inputs are quantized to int8 in groups of `GROUP` consecutive inputs, each group with its
own float32 scale (max |group| / 127): the weights once at load, each input row at every call. Each
group's sum is exact in int32 and the groups are added in float32 in a fixed order, so every
instruction-set path gives the same bits and a row's bits never depend on the batch. With AVX512-VNNI
(vpdpbusd: 64 byte products an instruction) the products run at about twice the float32 FMA peak of
a CPU without a bf16 dot product, on half the weight bytes of bf16. Accuracy is an approximation of
the bf16 product's: measured by benchmarks/quant_quality.py (greedy agreement, perplexity).
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass

import torch

from engine import native_build
from engine.product_kernel import ProductKernel

logger = logging.getLogger("engine")

BLOCK = 16  # output columns per packed block (csrc/linear_int8.c)
GROUP = 32  # inputs per activation scale (csrc/linear_int8.c: GROUP); the weight's k is padded to it
MAX_K = 65536
_ptr = ctypes.c_void_p


def supports(weight: torch.Tensor) -> bool:
    """A CPU floating-point weight whose input size the kernel's exact int32 sums allow."""
    return weight.device.type == "cpu" and weight.is_floating_point() and 0 < weight.shape[1] <= MAX_K


@functools.cache
def load(variant: native_build.IsaVariant = native_build.NATIVE) -> Int8Kernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built here."""
    library = native_build.build_kernel("linear_int8", variant)
    if library is not None and library.linear_int8_group() != GROUP:
        raise RuntimeError(f"csrc/linear_int8.c groups {library.linear_int8_group()} inputs, not {GROUP}")
    return Int8Kernel(library) if library is not None else None


class _Handle(ctypes.Structure):
    """csrc/linear_int8.c's struct int8_weight: where the packed blocks and their scales lie."""

    _fields_ = [("packed", _ptr), ("scales", _ptr)]


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A weight packed for the kernel: (blocks, Kp/4, 16, 4) uint8 = int8 + 128, and its scales."""

    packed: torch.Tensor
    scales: torch.Tensor  # float32 (Kp / GROUP, N padded to 16): group g's scale of column n at [g, n]
    in_features: int
    out_features: int
    handle: _Handle  # both tensors' addresses: what the kernel's entry points take as the weight

    @property
    def address(self) -> int:
        """The weight as the kernel's entry points (and csrc/llama_layers.c) take it: its handle's address."""
        return ctypes.addressof(self.handle)

    def with_blocks(self, blocks: torch.Tensor) -> Int8Weight:
        """The same weight with its packed blocks elsewhere (a copy of `packed`, e.g. on huge pages)."""
        same_layout = blocks.shape == self.packed.shape and blocks.dtype == self.packed.dtype
        if not (same_layout and blocks.is_contiguous()):
            raise ValueError("the blocks must be a contiguous copy of the packed ones")
        handle = _Handle(blocks.data_ptr(), self.scales.data_ptr())
        return Int8Weight(blocks, self.scales, self.in_features, self.out_features, handle)


def quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) -> int8 (N, Kp) and float32 scales (N, Kp / GROUP): symmetric, one scale per output column
    and group of GROUP inputs; K padded to Kp, a multiple of GROUP, with zeros."""
    out_features, in_features = weight.shape
    padded = -(-in_features // GROUP) * GROUP
    w = torch.nn.functional.pad(weight.detach().float(), (0, padded - in_features))
    w = w.view(out_features, -1, GROUP)
    top = w.abs().amax(dim=2)
    scales = top / 127
    safe = torch.where(top > 0, scales, torch.ones_like(scales))
    q = torch.round(w / safe[..., None]).clamp(-127, 127).to(torch.int8)
    return q.view(out_features, padded), scales


def pack(weight: torch.Tensor) -> Int8Weight:
    """(N, K) -> blocks of 16 columns, k in fours, stored as int8 + 128 (VNNI's unsigned operand); N padded
    to 16 and K to GROUP with zero weights."""
    out_features, in_features = weight.shape
    q, scales = quantize(weight)
    rows, cols = -(-out_features // BLOCK) * BLOCK, q.shape[1]
    q = torch.nn.functional.pad(q.to(torch.int16) + 128, (0, 0, 0, rows - out_features), value=128)
    blocks = q.to(torch.uint8).reshape(rows // BLOCK, BLOCK, cols // 4, 4).permute(0, 2, 1, 3).contiguous()
    scales = torch.nn.functional.pad(scales, (0, 0, 0, rows - out_features)).T.contiguous()
    handle = _Handle(blocks.data_ptr(), scales.data_ptr())
    return Int8Weight(blocks, scales, in_features, out_features, handle)


class Int8Kernel(ProductKernel):
    """y = x W^T (+ bias) for a weight packed by `pack` (csrc/linear_int8.c); x and y bf16. The bf16
    kernel's entry points and epilogues (engine/product_kernel.py), the weight given by its handle."""

    pack = staticmethod(pack)

    def __init__(self, library: ctypes.CDLL) -> None:
        super().__init__(library, "linear_int8")

    def __call__(self, x: torch.Tensor, weight: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
        """x (M, K) bf16 with unit column stride -> (M, N) bf16; bias float32 or None."""
        if x.shape[-1] != weight.in_features:
            raise ValueError(f"linear_int8: {x.shape[-1]} input features, weight of {weight.in_features}")
        return self.product_at(x, weight.address, weight.out_features, bias)
