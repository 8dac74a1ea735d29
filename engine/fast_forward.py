"""The decoder of known architectures as one function: transformers' operations without its module tree.

transformers runs a SmolLM2 (Llama) step through ~450 module calls (hooks, keyword plumbing,
decorators, output records, a mask it builds and we never read): ~4-5 ms of Python per step here, on
top of ~30 ms of arithmetic, and most of a lone request's step beyond the weights' read.
`FastForward` runs the same weights through the same torch operations in the same order, so the
logits are the same bits (tested against transformers' forward), as one loop over the layers. It
knows the layers of `SUPPORTED` exactly and is used for them once `engine/fusion.py` has fused their
projections; every other model (Qwen3's q/k norms, MoE layers, ...) runs on transformers' modules,
unchanged. `EngineConfig.fast_forward` turns it off. In bf16 on CPU the norms run in a C kernel that
gives the same bits (engine/native_norm.py, checked at load; `EngineConfig.native_norm`), and so do a
Llama MLP's SiLU and multiply, inside the gate/up product's kernel (`EngineConfig.native_silu`).

The norm and rotary helpers are looked up by name at each call, so a profiler can label them
(benchmarks/step_profile.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch import nn

from engine import attention, native_norm, native_rotary
from engine.attention import AttentionMetadata
from engine.fusion import FusedProjection, PackedLinear
from engine.native_layers import NativeLayers
from engine.native_norm import NormKernel
from engine.native_rotary import RotaryKernel

logger = logging.getLogger("engine")

T = TypeVar("T")

# Llama and Mistral layers: RMSNorm -> fused q/k/v -> rotary -> attention -> o -> residual -> RMSNorm
# -> fused gate/up -> act(gate) * up -> down -> residual (Mistral passes its sliding window on).
# Gemma 3 layers add q/k norms, a norm after attention and around the MLP, (1 + weight) norms in
# float32, per-layer sliding windows with their own rotary tables, and a scaled embedding.
LLAMA_LIKE = ("LlamaForCausalLM", "MistralForCausalLM")
GEMMA3 = ("Gemma3ForCausalLM",)
SUPPORTED = LLAMA_LIKE + GEMMA3


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, kernel: NormKernel | None = None
) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (float32 statistics, weight applied in the input dtype),
    or the C kernel that gives its bits (engine/native_norm.py) when the layer holds one."""
    if kernel is not None:
        return kernel.llama(x, weight, eps)
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def gemma_rms_norm(
    x: torch.Tensor, scale: torch.Tensor, eps: float, kernel: NormKernel | None = None
) -> torch.Tensor:
    """transformers' Gemma3RMSNorm, op for op; `scale` is its `1.0 + weight.float()`, computed once.
    Or the C kernel that gives its bits."""
    if kernel is not None:
        return kernel.gemma(x, scale, eps)
    y = x.float()
    y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + eps)
    return (y * scale).type_as(x)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (T, heads, hd) with cos/sin (T, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def rotary_into_cache(
    kernel: RotaryKernel, layer: int, qkv: torch.Tensor, cos, sin, num_q_heads: int, meta: AttentionMetadata
) -> None:
    """apply_rotary on the q and k heads of the fused product, in place, with torch's bits, and k and v
    written to the layer's cache slots (engine/native_rotary.py): one C call."""
    cache = meta.kv_cache
    kernel(qkv, cos, sin, meta.slot_mapping, cache.keys[layer], cache.values[layer], num_q_heads)


@dataclass(frozen=True, slots=True)
class _Attention:
    """What a layer's attention reads, fetched once from its modules (no attribute walks per step)."""

    index: int
    qkv: nn.Module
    q_size: int
    k_size: int
    head_dim: int
    scaling: float
    window: int | None
    o_proj: nn.Module

    @classmethod
    def of(cls, index: int, attn: nn.Module, window: int | None) -> _Attention:
        qkv = attn.fused_q_k_v
        return cls(
            index=attn.layer_idx if attn.layer_idx is not None else index,
            qkv=qkv.linear,
            q_size=qkv.sizes[0],
            k_size=qkv.sizes[1],
            head_dim=attn.head_dim,
            scaling=attn.scaling,
            window=window,
            o_proj=attn.o_proj,
        )

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q (T, H, hd), k and v (T, Hk, hd): views into one fused product."""
        qkv, hd, num_tokens = self.qkv(x), self.head_dim, x.shape[0]
        k_end = self.q_size + self.k_size
        q = qkv[:, : self.q_size].view(num_tokens, -1, hd)
        k = qkv[:, self.q_size : k_end].view(num_tokens, -1, hd)
        return q, k, qkv[:, k_end:].view(num_tokens, -1, hd)

    def attend(self, q, k, v, meta: AttentionMetadata) -> torch.Tensor:
        """Attention and the output product; k and v None: already in the cache (rotary_into_cache)."""
        out = attention.attend_paged(self.index, q, k, v, meta, self.scaling, self.window)
        return self.o_proj(out.view(out.shape[0], -1))

    def attend_into(self, q, meta: AttentionMetadata, residual: torch.Tensor) -> torch.Tensor:
        """`residual + attend(q, None, None, meta)`, the output product adding into `residual` in place."""
        out = attention.attend_paged(self.index, q, None, None, meta, self.scaling, self.window)
        return self.o_proj.add_into(out.view(out.shape[0], -1), residual)


@dataclass(frozen=True, slots=True)
class _Mlp:
    gate_up: nn.Module
    sizes: list[int]
    act: nn.Module
    down: nn.Module
    silu_in_kernel: bool = False  # act(gate) * up inside the product's C kernel (`PackedLinear.silu_mul`)

    @classmethod
    def of(cls, mlp: nn.Module, silu_in_kernel: bool = False) -> _Mlp:
        group = mlp.fused_gate_up
        return cls(group.linear, group.sizes, mlp.act_fn, mlp.down_proj, silu_in_kernel)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self._gated(x))

    def add_into(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """`residual + self(x)`, the down product adding into `residual` in place."""
        return self.down.add_into(self._gated(x), residual)

    def _gated(self, x: torch.Tensor) -> torch.Tensor:
        if self.silu_in_kernel:
            return self.gate_up.silu_mul(x)
        gate, up = self.gate_up(x).split(self.sizes, dim=-1)
        return self.act(gate) * up


@dataclass(frozen=True, slots=True)
class _LlamaLayer:
    attn: _Attention
    mlp: _Mlp
    norm1: torch.Tensor
    eps1: float
    norm2: torch.Tensor
    eps2: float
    rope: str | None = None  # one rotary table for every layer
    kernel: NormKernel | None = None  # the C RMSNorm, where it gives torch's bits
    rotary: RotaryKernel | None = None  # rotary + cache write in C, where it gives torch's bits
    # the residual adds inside the o_proj and down products' C kernel (`PackedLinear.add_into`); taken on
    # the path with rotary in C only (FastForward sets it only there)
    add_in_kernel: bool = False

    @classmethod
    def of(
        cls,
        index: int,
        layer: nn.Module,
        window: int | None,
        kernel: NormKernel | None,
        rotary: RotaryKernel | None = None,
        silu_in_kernel: bool = False,
        add_in_kernel: bool = False,
    ) -> _LlamaLayer:
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        attn = _Attention.of(index, layer.self_attn, window)
        mlp = _Mlp.of(layer.mlp, silu_in_kernel)
        eps1, eps2 = norm1.variance_epsilon, norm2.variance_epsilon
        return cls(
            attn,
            mlp,
            norm1.weight,
            eps1,
            norm2.weight,
            eps2,
            kernel=kernel,
            rotary=rotary,
            add_in_kernel=add_in_kernel,
        )

    def __call__(self, hidden, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        attn, num_tokens = self.attn, hidden.shape[0]
        qkv = attn.qkv(rms_norm(hidden, self.norm1, self.eps1, self.kernel))
        hd, k_end = attn.head_dim, attn.q_size + attn.k_size
        num_q_heads = attn.q_size // hd
        if self.rotary is not None:
            rotary_into_cache(self.rotary, attn.index, qkv, cos, sin, num_q_heads, meta)
            q = qkv[:, : attn.q_size].view(num_tokens, -1, hd)
            if self.add_in_kernel:  # `hidden` is this step's own tensor: the products add into it
                hidden = attn.attend_into(q, meta, hidden)
                return self.mlp.add_into(rms_norm(hidden, self.norm2, self.eps2, self.kernel), hidden)
            hidden = hidden + attn.attend(q, None, None, meta)
        else:
            # q and k sit side by side in the product's output: one rotary pass over both (elementwise)
            qk = apply_rotary(qkv[:, :k_end].view(num_tokens, -1, hd), cos, sin)
            v = qkv[:, k_end:].view(num_tokens, -1, hd)
            hidden = hidden + attn.attend(qk[:, :num_q_heads], qk[:, num_q_heads:], v, meta)
        return hidden + self.mlp(rms_norm(hidden, self.norm2, self.eps2, self.kernel))


@dataclass(frozen=True, slots=True)
class _GemmaLayer:
    attn: _Attention
    mlp: _Mlp
    eps: float
    input_norm: torch.Tensor  # each a (1 + weight) float32 scale
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    post_attention_norm: torch.Tensor
    pre_mlp_norm: torch.Tensor
    post_mlp_norm: torch.Tensor
    rope: str  # the layer type, which picks its rotary table
    kernel: NormKernel | None = None  # the C RMSNorm, where it gives torch's bits

    @classmethod
    def of(cls, index: int, layer: nn.Module, layer_type: str, kernel: NormKernel | None) -> _GemmaLayer:
        attn = layer.self_attn
        scales = [
            (1.0 + norm.weight.float()).detach()
            for norm in (
                layer.input_layernorm,
                attn.q_norm,
                attn.k_norm,
                layer.post_attention_layernorm,
                layer.pre_feedforward_layernorm,
                layer.post_feedforward_layernorm,
            )
        ]
        return cls(
            _Attention.of(index, attn, attn.sliding_window),
            _Mlp.of(layer.mlp),
            layer.input_layernorm.eps,
            *scales,
            rope=layer_type,
            kernel=kernel,
        )

    def __call__(self, hidden, cos, sin, meta: AttentionMetadata) -> torch.Tensor:
        eps, attn, kernel = self.eps, self.attn, self.kernel
        q, k, v = attn.split(gemma_rms_norm(hidden, self.input_norm, eps, kernel))
        q = apply_rotary(gemma_rms_norm(q, self.q_norm, eps, kernel), cos, sin)
        k = apply_rotary(gemma_rms_norm(k, self.k_norm, eps, kernel), cos, sin)
        hidden = hidden + gemma_rms_norm(attn.attend(q, k, v, meta), self.post_attention_norm, eps, kernel)
        out = self.mlp(gemma_rms_norm(hidden, self.pre_mlp_norm, eps, kernel))
        return hidden + gemma_rms_norm(out, self.post_mlp_norm, eps, kernel)


def _bf16_cpu_kernel(
    model: nn.Module, load: Callable[[], T | None], works: Callable[[T], bool], what: str
) -> T | None:
    """The C kernel `load()` gives, for a bf16 CPU model, if `works(kernel)` (it gives torch's bits);
    else None (a kernel that differs is logged: `what` stays on torch's operations)."""
    weight = model.model.norm.weight
    if weight.device.type != "cpu" or weight.dtype != torch.bfloat16:
        return None
    kernel = load()
    if kernel is None:
        return None
    if works(kernel):
        return kernel
    logger.warning("the C %s does not give this torch's bits: it stays on torch's operations", what)
    return None


def _norm_kernel(model: nn.Module, gemma: bool) -> NormKernel | None:
    """The C RMSNorm, if it gives torch's bits at the model's norm widths."""
    widths = {model.config.hidden_size} | ({model.config.head_dim} if gemma else set())
    reference = gemma_rms_norm if gemma else rms_norm

    def works(kernel: NormKernel) -> bool:
        return all(kernel.matches(reference, gemma, width) for width in sorted(widths))

    return _bf16_cpu_kernel(model, native_norm.load, works, "RMSNorm")


def _rotary_kernel(model: nn.Module) -> RotaryKernel | None:
    """The C rotary + cache write for a Llama-like model, if it gives torch's bits at its head shapes."""
    attn = model.model.layers[0].self_attn
    hd, sizes = attn.head_dim, attn.fused_q_k_v.sizes

    def works(kernel: RotaryKernel) -> bool:
        return kernel.matches(apply_rotary, sizes[0] // hd, sizes[1] // hd, hd)

    return _bf16_cpu_kernel(model, native_rotary.load, works, "rotary")


def _silu_in_kernel(model: nn.Module) -> bool:
    """Whether every layer's gate/up product can take SiLU and the multiply into its C kernel: a SiLU MLP
    on one of the engine's kernels (bf16 or int8), halves a multiple of 16 wide, and each such kernel's
    SiLU gives the model's act_fn bits on every bf16 value (else the layers keep torch's operations,
    with a warning)."""
    if getattr(model.config, "hidden_act", None) != "silu":
        return False
    mlps = [layer.mlp for layer in model.model.layers]
    kernels = set()
    for mlp in mlps:
        linear, sizes = mlp.fused_gate_up.linear, mlp.fused_gate_up.sizes
        if linear.layer_kernel is None or len(sizes) != 2 or sizes[0] != sizes[1] or sizes[0] % 16 != 0:
            return False
        kernels.add(linear.layer_kernel)
    if all(kernel.silu_mul_matches(mlps[0].act_fn) for kernel in kernels):
        return True
    logger.warning("the C SiLU does not give this torch's bits: the MLPs keep torch's SiLU and multiply")
    return False


def _add_in_kernel(model: nn.Module) -> bool:
    """Whether every layer's o_proj and down products run on one of the engine's kernels (bf16 or int8)
    and its residual add gives torch's bits (else the layers keep torch's adds, with a warning)."""
    kernels = set()
    for layer in model.model.layers:
        for linear in (layer.self_attn.o_proj, layer.mlp.down_proj):
            if not (isinstance(linear, PackedLinear) and linear.layer_kernel is not None):
                return False
            kernels.add(linear.layer_kernel)
    if all(kernel.add_matches() for kernel in kernels):
        return True
    logger.warning("the C residual add does not give this torch's bits: the layers keep torch's adds")
    return False


def _unsupported_reason(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name not in SUPPORTED:
        return f"{name} is not one of {', '.join(SUPPORTED)}"
    decoder = model.model
    for i, layer in enumerate(decoder.layers):
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(getattr(attn, "fused_q_k_v", None), FusedProjection):
            return f"layer {i}: q/k/v are not fused"
        if not isinstance(getattr(mlp, "fused_gate_up", None), FusedProjection):
            return f"layer {i}: gate/up are not fused"
        if len(attn.fused_q_k_v.sizes) != 3 or len(mlp.fused_gate_up.sizes) != 2:
            return f"layer {i}: unexpected projection groups"
    if len(decoder.layers) != model.config.num_hidden_layers:
        return "the model holds more layers than its config runs"
    return None


class FastForward:
    """Logits of one packed step, computed as transformers' code would, without its modules."""

    def __init__(
        self,
        model: nn.Module,
        native_norm: bool = True,
        native_rotary: bool = False,
        native_silu: bool = True,
        native_residual: bool = True,
        native_layers: bool = True,
    ) -> None:
        """`native_rotary`: Llama-like layers rotate and write the KV cache in C (engine/native_rotary.py),
        for a bf16 CPU model whose KV cache is bf16 on the CPU (the caller knows the cache).
        `native_silu`: Llama-like layers whose gate/up product runs on the native bf16 kernel compute SiLU
        and the multiply inside it (`PackedLinear.silu_mul`).
        `native_residual`: with rotary in C, Llama-like layers whose o_proj and down products run on the
        native bf16 kernel add them into the residual stream inside it (`PackedLinear.add_into`).
        `native_layers`: Llama-like layers that run every part in C (rotary, SiLU and the residual adds
        above, the norms) run as one fixed sequence of C calls (engine/native_layers.py) in steps whose
        attention is the C kernel's."""
        reason = _unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"no fast forward for this model: {reason}")
        config, decoder = model.config, model.model
        self.embed = decoder.embed_tokens  # Gemma's scales its output: called as the module it is
        self.rotary = decoder.rotary_emb
        self.gemma = type(model).__name__ in GEMMA3
        self.native_layers: NativeLayers | None = None
        kernel = self.norm_kernel = _norm_kernel(model, self.gemma) if native_norm else None
        if self.gemma:
            self.layers = [
                _GemmaLayer.of(i, layer, config.layer_types[i], kernel)
                for i, layer in enumerate(decoder.layers)
            ]
            self.final_norm = ((1.0 + decoder.norm.weight.float()).detach(), decoder.norm.eps)
            self.logit_softcap = getattr(config, "final_logit_softcapping", None)
        else:
            mistral = type(model).__name__ == "MistralForCausalLM"
            window = getattr(config, "sliding_window", None) if mistral else None
            rotary = _rotary_kernel(model) if native_rotary else None
            silu = native_silu and _silu_in_kernel(model)
            add = native_residual and rotary is not None and _add_in_kernel(model)
            self.layers = [
                _LlamaLayer.of(i, layer, window, kernel, rotary, silu, add)
                for i, layer in enumerate(decoder.layers)
            ]
            self.native_layers = NativeLayers.of(self.layers) if native_layers else None
            self.final_norm = (decoder.norm.weight, decoder.norm.variance_epsilon)
            self.logit_softcap = None
        self.rope_kinds = sorted({layer.rope for layer in self.layers}, key=str)
        self.lm_head = model.lm_head

    @staticmethod
    def supports(model: nn.Module) -> bool:
        return _unsupported_reason(model) is None

    def __call__(
        self,
        input_ids: torch.Tensor,  # (1, T)
        position_ids: torch.Tensor,  # (1, T)
        meta: AttentionMetadata,
        keep: torch.Tensor,  # (S,) rows whose logits are wanted
    ) -> torch.Tensor:
        """(S, vocab) logits in the model's dtype."""
        hidden = self.embed(input_ids[0])  # (T, D)
        tables = {}
        for kind in self.rope_kinds:  # (1, T, hd) each -> (T, 1, hd)
            args = (hidden, position_ids) if kind is None else (hidden, position_ids, kind)
            cos, sin = self.rotary(*args)
            tables[kind] = (cos[0].unsqueeze(1), sin[0].unsqueeze(1))
        if self.native_layers is not None and meta.kernel is not None:
            hidden = self.native_layers(hidden, *tables[None], meta)
        else:
            for layer in self.layers:
                cos, sin = tables[layer.rope]
                hidden = layer(hidden, cos, sin, meta)
        norm = gemma_rms_norm if self.gemma else rms_norm
        logits = self.lm_head(norm(hidden[keep], *self.final_norm, self.norm_kernel))  # row-wise: slice first
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
