"""The Llama-like layers of the default CPU path as a fixed sequence of C calls, resolved once.

With bf16 weights on the CPU and every kernel in C (the RMSNorms, the products with SiLU and the
residual adds inside them, rotary with the KV-cache write, attention), a Llama layer is eight C calls
and a copy. Through the kernels' Python wrappers each call checks its tensors again, allocates its
output and reads ~10 pointers and strides: ~150-220 us a layer beyond the arithmetic at one row on a
2-core Zen 3, most of a lone request's step beyond the weights' read (docs/performance.md, "The
floor"). Here the weights' pointers and sizes are read once, when the model loads; the step's (its
rows, cache slots, block tables and rotary tables) once a step for all layers, with the checks the
wrappers make; and the layers share one set of scratch buffers. The same C functions get the same
arguments, so the logits are the same bits (tests/engine/test_fast_forward.py compares them with
transformers' at every step). `EngineConfig.native_layers` turns it off.

The sequence itself runs in C (csrc/llama_layers.c, handed the kernels as function pointers): one call
a step, so the engine thread releases the GIL once for all the layers instead of at each of the 240
calls of a SmolLM2 step, where a served replica's event loop would take it in between. Where that
library does not build, `of` says None and the layers run on the kernels' wrappers.
"""

from __future__ import annotations

import ctypes
import functools

import torch

from engine import native_attention, native_build, native_norm
from engine.attention import AttentionMetadata
from engine.fusion import PackedLinear
from engine.native_norm import NormKernel
from engine.native_rotary import RotaryKernel
from engine.product_kernel import ProductKernel


def _ptr(tensor: torch.Tensor | None) -> int | None:
    return tensor.data_ptr() if tensor is not None else None


def _packed(linear: PackedLinear) -> tuple[int, int | None]:
    return linear.weight_address, _ptr(linear.bias)


def _check(status: int, what: str) -> None:
    """A product's or rotary's status, read as their wrappers read it: -2, its scratch memory ran out;
    any other non-zero status, arguments the kernel refused."""
    if status == -2:
        raise MemoryError(f"{what}: no memory for its scratch space")
    if status != 0:
        raise RuntimeError(f"{what} refused its arguments (status {status})")


def _check_memory(status: int, what: str) -> None:
    """The norm's or attention's status: any non-zero one means its scratch memory ran out."""
    if status != 0:
        raise MemoryError(f"{what}: no memory for its scratch space")


_p, _i64, _f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
# The call a status comes from, by its index in a layer (csrc/llama_layers.c): its name in the error,
# and whether any non-zero status means memory (the norms, attention) or only -2 does (_check).
_CALLS = (
    ("rms_norm", True),
    ("qkv", False),
    ("rotary_kv", False),
    ("attention", True),
    ("o", False),
    ("rms_norm", True),
    ("gate_up", False),
    ("down", False),
)


class _Kernels(ctypes.Structure):
    _fields_ = [(name, _p) for name in ("norm", "product", "silu_mul", "add", "rotary", "attention")]


class _CLayer(ctypes.Structure):
    """One layer's constant arguments as csrc/llama_layers.c reads them: norms and packed weights
    (pointers; a bias may be None), the attention scale and window; k_cache and v_cache are set each step."""

    _fields_ = [
        *[(name, _p) for name in ("norm1", "norm2", "qkv", "o", "gate_up", "down")],
        *[(name, _p) for name in ("qkv_bias", "o_bias", "gate_up_bias", "down_bias", "k_cache", "v_cache")],
        ("eps1", _f32),
        ("eps2", _f32),
        ("scale", _f32),
        ("window", _i64),
    ]


class _Step(ctypes.Structure):
    _fields_ = [
        *[(name, _p) for name in ("hidden", "normed", "qkv", "query", "attended", "product", "both")],
        *[(name, _p) for name in ("gated", "cos", "sin", "tables", "lens", "slots")],
        *[(name, _i64) for name in ("rows", "table_width", "block_size", "width", "qkv_size", "q_size")],
        *[(name, _i64) for name in ("attn_size", "mlp_size", "num_q_heads", "num_kv_heads", "head_dim")],
        ("norm_kind", ctypes.c_int32),
        ("dtype_code", ctypes.c_int32),
    ]


_Driver = ctypes._CFuncPtr  # llama_layers(kernels, layers, num_layers, step, failed) -> status


@functools.cache
def _driver() -> _Driver | None:
    """csrc/llama_layers.c's entry point, or None where it cannot be built."""
    library = native_build.build_kernel("llama_layers")
    if library is None:
        return None
    function = library.llama_layers
    function.argtypes = [ctypes.POINTER(_Kernels), ctypes.POINTER(_CLayer), _i64, ctypes.POINTER(_Step), _p]
    function.restype = ctypes.c_int
    return function


def _address(function: ctypes._CFuncPtr) -> int:
    return ctypes.cast(function, _p).value


class NativeLayers:
    """Runs `layers` (fast_forward's `_LlamaLayer`s, each with rotary, SiLU and the residual adds in C)
    on a step's hidden states, in place; built by `of`, which says None where a layer does not qualify."""

    def __init__(
        self,
        layers: list,
        norm: NormKernel,
        linear: ProductKernel,
        rotary: RotaryKernel,
        driver: _Driver,
    ) -> None:
        first = layers[0].attn
        self.q_size, self.k_size, self.head_dim = first.q_size, first.k_size, first.head_dim
        self.qkv_size = first.qkv.out_features
        self.hidden_size = first.o_proj.out_features
        self.attn_size = first.o_proj.in_features
        self.mlp_size = layers[0].mlp.down.in_features
        self.num_q_heads = self.q_size // self.head_dim
        self.num_kv_heads = self.k_size // self.head_dim
        built, self._cache_indices = [], tuple(layer.attn.index for layer in layers)
        for layer in layers:
            attn, mlp = layer.attn, layer.mlp
            qkv, qkv_bias = _packed(attn.qkv)
            o, o_bias = _packed(attn.o_proj)
            gate_up, gate_up_bias = _packed(mlp.gate_up)
            down, down_bias = _packed(mlp.down)
            scale = attn.head_dim**-0.5 if attn.scaling is None else attn.scaling
            built.append(
                _CLayer(
                    *(layer.norm1.data_ptr(), layer.norm2.data_ptr(), qkv, o, gate_up, down),
                    *(qkv_bias, o_bias, gate_up_bias, down_bias, None, None),  # the caches: each step's
                    *(layer.eps1, layer.eps2, scale, attn.window or 0),
                )
            )
        self._sources = layers  # the modules and tensors whose pointers are held: alive with this object
        self._driver = driver
        kernels = (norm.raw, linear.raw_product, linear.raw_silu_mul, linear.raw_add, rotary.raw)
        self._kernels = _Kernels(*map(_address, kernels), None)  # attention: the step's kernel, each call
        self._failed = ctypes.c_int64(-1)
        self.layers = (_CLayer * len(built))(*built)  # the array the C sequence reads

    @classmethod
    def of(cls, layers: list) -> NativeLayers | None:
        """The layers as C calls, or None unless every layer runs every part in C on the same kernels
        (the first layer's norm, rotary and product kernels: bf16 or int8) with one shape."""
        if not layers:
            return None
        first = layers[0]
        norm, rotary = first.kernel, first.rotary
        linear = getattr(first.attn.qkv, "layer_kernel", None)
        driver = _driver()
        if norm is None or rotary is None or linear is None or driver is None:
            return None
        for layer in layers:
            attn, mlp = layer.attn, layer.mlp
            products = (attn.qkv, attn.o_proj, mlp.gate_up, mlp.down)
            if any(getattr(p, "layer_kernel", None) is not linear for p in products):
                return None
            same_kernels = layer.kernel is norm and layer.rotary is rotary
            if not (same_kernels and layer.add_in_kernel and mlp.silu_in_kernel):
                return None
            shape = (attn.q_size, attn.k_size, attn.head_dim)
            if shape != (first.attn.q_size, first.attn.k_size, first.attn.head_dim):
                return None
            for weight in (layer.norm1, layer.norm2):
                if weight.dtype != torch.bfloat16 or not weight.is_contiguous():
                    return None
        return cls(layers, norm, linear, rotary, driver)

    def __call__(
        self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """hidden (T, hidden_size) bf16, this step's own tensor: every layer applied to it in place;
        cos and sin (T, 1, head_dim) bf16; meta with the attention kernel's block tables."""
        num_tokens, width = hidden.shape
        tables, lens, slots = meta.row_block_tables, meta.row_lens, meta.slot_mapping
        cache = meta.kv_cache
        step_tensors = (hidden, cos, sin, tables, lens, slots)
        if hidden.dtype != torch.bfloat16 or width != self.hidden_size:
            raise ValueError(f"the native layers take ({num_tokens}, {self.hidden_size}) bf16 hidden states")
        if not all(t.is_contiguous() for t in step_tensors):
            raise ValueError("hidden, cos, sin, the block tables, lengths and slots must be contiguous")
        if cos.dtype != torch.bfloat16 or sin.dtype != torch.bfloat16:
            raise ValueError("cos and sin must be bf16")
        if cos.numel() != num_tokens * self.head_dim:
            raise ValueError("cos and sin must be bf16 with one head_dim row per token")
        if sin.numel() != cos.numel() or slots.numel() != num_tokens or lens.numel() != num_tokens:
            raise ValueError("sin, slots and lengths must have one row per token")
        if any(t.dtype != torch.int64 for t in (tables, lens, slots)):
            raise ValueError("block tables, lengths and slots must be int64")
        if cache.dtype != torch.bfloat16:
            raise ValueError("the native layers take a bf16 KV cache")
        bf16 = torch.bfloat16
        normed = torch.empty(num_tokens, width, dtype=bf16)
        qkv = torch.empty(num_tokens, self.qkv_size, dtype=bf16)
        query = torch.empty(num_tokens, self.num_q_heads, self.head_dim, dtype=bf16)  # contiguous q
        attended = torch.empty(num_tokens, self.attn_size, dtype=bf16)
        product = torch.empty(num_tokens, width, dtype=bf16)  # each residual add's product, then dropped
        both = torch.empty(num_tokens, 2 * self.mlp_size, dtype=bf16)  # gate and up, as written
        gated = torch.empty(num_tokens, self.mlp_size, dtype=bf16)
        heads = (self.num_q_heads, self.num_kv_heads, self.head_dim)
        step = _Step(
            *(hidden.data_ptr(), normed.data_ptr(), qkv.data_ptr(), query.data_ptr(), attended.data_ptr()),
            *(product.data_ptr(), both.data_ptr(), gated.data_ptr(), cos.data_ptr(), sin.data_ptr()),
            *(tables.data_ptr(), lens.data_ptr(), slots.data_ptr(), num_tokens, tables.shape[1]),
            cache.block_size,
            *(width, self.qkv_size, self.q_size, self.attn_size, self.mlp_size, *heads),
            *(native_norm.LLAMA, native_attention.DTYPE_CODES[bf16]),
        )
        self._run_in_c(step, meta.kernel.raw, cache)
        return hidden

    def _run_in_c(self, step: _Step, attend: ctypes._CFuncPtr, cache) -> None:
        """Every layer through csrc/llama_layers.c; a kernel's status raised as its wrapper raises it."""
        keys, values = cache.keys, cache.values
        for layer, index in zip(self.layers, self._cache_indices, strict=True):
            layer.k_cache, layer.v_cache = keys[index].data_ptr(), values[index].data_ptr()
        self._kernels.attention = _address(attend)
        layers, failed = self.layers, self._failed
        status = self._driver(self._kernels, layers, len(layers), step, ctypes.byref(failed))
        if status != 0:
            what, any_status_is_memory = _CALLS[failed.value % len(_CALLS)]
            (_check_memory if any_status_is_memory else _check)(status, what)
