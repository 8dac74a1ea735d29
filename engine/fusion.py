"""Model surgery for speed, generic over transformers' decoder code.

- Projections that read the same input (q/k/v, gate/up) run as one matrix product: the first
  module called computes all outputs and its siblings return their slice when handed the very same
  input tensor (else they compute their own, so an unexpected call order stays correct).
- On CPU every linear layer uses a weight packed once at load: for bf16 on CPUs with AVX512-BF16 or
  AVX2 + FMA the engine's own kernel (engine/native_linear.py: 1.2-1.8x oneDNN at decode batch sizes
  on AVX512-BF16; ~4x torch on AVX2 alone, where oneDNN has no bf16 path and the tied lm_head, o_proj
  and down_proj would otherwise stay unpacked), else
  oneDNN's packed layout instead of repacking the weight inside each call (small-batch products
  about 1.3-2x (bf16) and 1.5-3.5x (float32) faster than torch's default path here).
- With `int8=True`, bf16 CPU products take int8 weights and int8 rows (a scale per group of 32 inputs,
  the rows' at each call) on engine/native_int8.py's kernel instead, except the layers named in
  `INT8_SKIP` (the lm head) unless `int8_lm_head`. Where the bf16 kernel runs on AMX tiles, that is
  slower, and a warning says so.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from engine import huge_pages as huge_pages_arena
from engine import native_int8
from engine import native_linear as native_linear_kernel
from engine.product_kernel import ProductKernel

logger = logging.getLogger("engine")

_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
INT8_SKIP = ("lm_head",)  # child names whose products stay in bf16 with int8 on, unless int8_lm_head


def _can_pack(weight: torch.Tensor) -> bool:
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return weight.dtype == torch.float32


def _native_kernel(weight: torch.Tensor, native: bool) -> native_linear_kernel.LinearKernel | None:
    """The engine's kernel where it takes this weight and runs on this CPU (where oneDNN has no bf16
    path, the only fast product), else None."""
    return native_linear_kernel.load() if native and native_linear_kernel.supports(weight) else None


# oneDNN computes a single row (M = 1) on a matrix-vector path that sums in another order than its
# matrix-matrix kernels, which give every row the same bits whatever M >= 2 is (checked here for every
# SmolLM2 shape, bf16 and fp32). A lone row is therefore run as two, so a request decoded alone gets
# the very numbers it gets amid a batch; the second row costs nothing measurable (weights dominate).
_BATCH_INVARIANT_MIN_ROWS = 2
# oneDNN (through ideep) compiles and caches a kernel per product shape and row count, ~0.3-0.6 MiB
# each, in caches of 1,024 entries; a step's row count (its tokens) varies with the load, so without
# bounds a long-running replica keeps compiling (~1 ms each) and its RSS keeps growing (measured:
# +670 MiB over 296 row counts of SmolLM2's four layer shapes, still growing once past 1,024).
# Rows are therefore padded up to one of a few sizes: exact up to 16 (decode batches), then 8 sizes per
# doubling (at most 1/8 extra rows). The padding rows are zeros and their outputs are dropped; every
# row's result is the same whatever M (see above), so padding changes no bits.
_EXACT_ROWS = 16


def padded_rows(num_rows: int) -> int:
    """The row count a product of `num_rows` rows runs with: few distinct sizes, at most 1/8 more."""
    if num_rows <= _EXACT_ROWS:
        return max(num_rows, _BATCH_INVARIANT_MIN_ROWS)
    step = 1 << ((num_rows - 1).bit_length() - 4)
    return -(-num_rows // step) * step


def _int8_kernel(weight: torch.Tensor, int8: bool) -> native_int8.Int8Kernel | None:
    """The int8 kernel for a bf16 CPU weight when asked for and built here, else None."""
    if not int8 or weight.dtype != torch.bfloat16 or not native_int8.supports(weight):
        return None
    return native_int8.load()


class PackedLinear(nn.Module):
    """y = x W^T + b with W packed once: as int8 for the int8 kernel, for the native bf16 kernel, for
    oneDNN, or left plain."""

    def __init__(
        self, weight: torch.Tensor, bias: torch.Tensor | None, native: bool = True, int8: bool = False
    ) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self._int8 = _int8_kernel(weight, int8)
        kernel = _native_kernel(weight, native) if self._int8 is None else None
        self._kernel = kernel
        self.is_packed = kernel is None and self._int8 is None and _can_pack(weight)
        if self._int8 is not None:
            self.weight = self._int8.pack(weight)  # an Int8Weight: int8 blocks, scales, column sums
            self.bias = bias.detach().float().contiguous() if bias is not None else None
        elif kernel is not None:
            self.weight = kernel.pack(weight)
            self.bias = bias.detach().float().contiguous() if bias is not None else None
        else:
            self.bias = bias
            self.weight = torch.ops.mkldnn._reorder_linear_weight(weight, 16) if self.is_packed else weight

    @property
    def is_native(self) -> bool:
        return self._kernel is not None

    @property
    def native_kernel(self) -> native_linear_kernel.LinearKernel | None:
        """The engine's bf16 kernel this product runs on (`weight` packed for it), or None."""
        return self._kernel

    @property
    def is_int8(self) -> bool:
        return self._int8 is not None

    @property
    def layer_kernel(self) -> ProductKernel | None:
        """The engine's kernel (bf16 or int8) this product runs on, with its SiLU and residual-add
        epilogues and its raw entry points (csrc/llama_layers.c), or None (oneDNN, torch)."""
        return self._int8 if self._int8 is not None else self._kernel

    @property
    def weight_address(self) -> int:
        """The weight as `layer_kernel`'s raw entry points take it (an int8 weight: its handle)."""
        return self.weight.address if self._int8 is not None else self.weight.data_ptr()

    def add_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """On `layer_kernel`: `residual + self(x)` computed into `residual` in place (rows contiguous),
        the bits of the product, then torch's add."""
        flat = x.reshape(-1, self.in_features)
        kernel = self.layer_kernel
        return kernel.add_into_at(flat, self.weight_address, self.out_features, self.bias, residual)

    def silu_mul(self, x: torch.Tensor) -> torch.Tensor:
        """On `layer_kernel`, for a [gate; up] product (halves a multiple of 16 wide): silu(gate) * up in
        one kernel call, the bits of the product, split, SiLU and multiply on torch."""
        flat = x.reshape(-1, self.in_features)
        hidden = self.out_features // 2
        out = self.layer_kernel.silu_mul_at(flat, self.weight_address, hidden, self.bias)
        return out.view(*x.shape[:-1], hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features)  # (M, K)
        if self._int8 is not None:
            return self._int8(flat, self.weight, self.bias).view(*x.shape[:-1], self.out_features)
        if self._kernel is not None:
            y = self._kernel(flat, self.weight, self.out_features, self.bias)
            return y.view(*x.shape[:-1], self.out_features)
        if not self.is_packed:
            return F.linear(x, self.weight, self.bias)
        num_rows = flat.shape[0]
        rows = padded_rows(num_rows)
        if num_rows == 1:  # see _BATCH_INVARIANT_MIN_ROWS
            flat = flat.expand(rows, -1)
        elif rows != num_rows:
            flat = F.pad(flat, (0, 0, 0, rows - num_rows))
        y = torch.ops.mkldnn._linear_pointwise(flat, self.weight, self.bias, "none", [], "")
        return y[:num_rows].view(*x.shape[:-1], self.out_features)


class FusedProjection(nn.Module):
    """One product for several sibling projections; `member(i)` stands in for the i-th."""

    def __init__(self, linears: list[nn.Linear], native: bool = True, int8: bool = False) -> None:
        super().__init__()
        weight = torch.cat([lin.weight.detach() for lin in linears])
        biases = [lin.bias for lin in linears]
        bias = torch.cat([b.detach() for b in biases]) if all(b is not None for b in biases) else None
        self.sizes = [lin.out_features for lin in linears]
        self.linear = PackedLinear(weight, bias, native, int8)
        # [input, outputs]: a plain list, because nn.Module.__setattr__ costs ~5 us a call on the hot path
        self._last: list = [None, ()]

    def output(self, index: int, x: torch.Tensor) -> torch.Tensor:
        last = self._last
        if index == 0 or x is not last[0]:
            last[0], last[1] = x, self.linear(x).split(self.sizes, dim=-1)
        out = last[1][index]
        if index == len(self.sizes) - 1:  # the last sibling has read its slice: drop the references
            last[0], last[1] = None, ()
        return out


class _Member(nn.Module):
    def __init__(self, group: FusedProjection, index: int) -> None:
        super().__init__()
        self.index = index
        self._group = (group,)  # a tuple so the group is not registered as a child three times

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._group[0].output(self.index, x)


def _warn_if_int8_is_slower(bf16_kernel: native_linear_kernel.LinearKernel | None) -> None:
    """On AMX the bf16 kernel outruns the int8 one (AVX512-VNNI, a float32 rescale every 32 inputs)."""
    if bf16_kernel is not None and bf16_kernel.isa == "amx-bf16":
        logger.warning(
            "int8_weights: this CPU runs bf16 products on AMX tiles, where the int8 kernel is slower "
            "(a SmolLM2 decode step took 1.2-1.7x the bf16 one on an Intel Xeon with AMX, "
            "docs/engine.md); the int8 weights still take half the memory"
        )


def optimize_model(
    model: nn.Module,
    native_linear: bool = True,
    int8: bool = False,
    huge_pages: bool = False,
    int8_lm_head: bool = False,
) -> int:
    """Fuse sibling projections and pack linear weights in place; returns the modules replaced.

    `native_linear`: bf16 products on the engine's own kernel where it runs (else oneDNN).
    `int8`: bf16 products with int8 weights and rows (engine/native_int8.py), but `INT8_SKIP`'s (the lm
    head) unless `int8_lm_head`.
    `huge_pages`: the engine kernels' packed weights (bf16, int8) side by side on huge pages
    (engine/huge_pages.py)."""
    replaced, skip = 0, () if int8_lm_head else INT8_SKIP
    for parent in list(model.modules()):
        for names in _GROUPS:
            linears = [getattr(parent, n, None) for n in names]
            if all(isinstance(lin, nn.Linear) for lin in linears):
                group = FusedProjection(linears, native_linear, int8)
                parent.add_module("fused_" + "_".join(n.split("_")[0] for n in names), group)
                for index, name in enumerate(names):
                    setattr(parent, name, _Member(group, index))
                replaced += len(names)
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantize = int8 and name not in skip
            if _can_pack(child.weight) or _native_kernel(child.weight, native_linear) is not None:
                packed = PackedLinear(child.weight.detach(), child.bias, native_linear, quantize)
                setattr(parent, name, packed)
                replaced += 1
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    native = [m for m in packed if m.is_native]
    int8_modules = [m for m in packed if m.is_int8]
    if huge_pages and native:
        for module, weight in zip(native, huge_pages_arena.copies([m.weight for m in native]), strict=True):
            module.weight = weight
    if huge_pages and int8_modules:
        blocks = huge_pages_arena.copies([m.weight.packed for m in int8_modules])
        for module, copy in zip(int8_modules, blocks, strict=True):
            module.weight = module.weight.with_blocks(copy)
    num_native, num_int8 = len(native), len(int8_modules)
    if num_int8:
        _warn_if_int8_is_slower(native_linear_kernel.load())
    logger.info(
        "optimized %d linear modules (fused siblings, packed CPU weights); of %d products %d on the "
        "engine's int8 kernel, %d on its bf16 kernel, the rest on %s",
        replaced,
        len(packed),
        num_int8,
        num_native,
        "oneDNN" if any(m.is_packed for m in packed) else "torch",
    )
    return replaced
