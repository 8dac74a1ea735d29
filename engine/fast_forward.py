"""The decoder of Llama-shaped models as one function: transformers' operations without its module tree.

transformers runs a Llama step through ~450 module calls (hooks, keyword plumbing, decorators, output
records, a mask it builds and we never read): ~4-5 ms of Python per SmolLM2 step here, on top of
~30 ms of arithmetic, and most of a lone request's step beyond the weights' read. `FastForward`
runs the same weights through the same torch operations in the same order, so the logits are the
same bits (tested against transformers' forward), as one loop over the layers. It is used for
architectures whose layers it knows exactly (`SUPPORTED`), once `engine/fusion.py` has fused their
projections; every other model (Gemma 3, Qwen3's q/k norms, MoE layers) runs on transformers'
modules, unchanged. `EngineConfig.fast_forward` turns it off.

The norm and rotary helpers are looked up by name at each call, so a profiler can label them
(benchmarks/step_profile.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import attention
from engine.attention import AttentionMetadata
from engine.fusion import FusedProjection

# Model classes whose decoder layers are exactly: RMSNorm -> fused q/k/v -> rotary -> attention -> o
# -> residual -> RMSNorm -> fused gate/up -> act(gate) * up -> down -> residual, with a final RMSNorm.
# Mistral differs from Llama only by passing its config's sliding window to attention.
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm, op for op (float32 statistics, weight applied in the input dtype)."""
    dtype = x.dtype
    x = x.to(torch.float32)
    variance = x.pow(2).mean(-1, keepdim=True)
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """transformers' apply_rotary_pos_emb for one tensor (T, heads, hd) with cos/sin (T, 1, hd)."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


@dataclass(frozen=True, slots=True)
class _Layer:
    """What one decoder layer's step reads, fetched once from its modules (no attribute walks per step)."""

    index: int
    norm1: torch.Tensor
    eps1: float
    qkv: nn.Module
    q_size: int
    k_size: int
    head_dim: int
    scaling: float
    o_proj: nn.Module
    norm2: torch.Tensor
    eps2: float
    gate_up: nn.Module
    gate_up_sizes: list[int]
    act: nn.Module
    down: nn.Module

    @classmethod
    def of(cls, index: int, layer: nn.Module) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = attn.fused_q_k_v, mlp.fused_gate_up
        norm1, norm2 = layer.input_layernorm, layer.post_attention_layernorm
        return cls(
            index=attn.layer_idx if attn.layer_idx is not None else index,
            norm1=norm1.weight,
            eps1=norm1.variance_epsilon,
            qkv=qkv.linear,
            q_size=qkv.sizes[0],
            k_size=qkv.sizes[1],
            head_dim=attn.head_dim,
            scaling=attn.scaling,
            o_proj=attn.o_proj,
            norm2=norm2.weight,
            eps2=norm2.variance_epsilon,
            gate_up=gate_up.linear,
            gate_up_sizes=gate_up.sizes,
            act=mlp.act_fn,
            down=mlp.down_proj,
        )


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
    """Logits of one packed step, computed as transformers' Llama code would, without its modules."""

    def __init__(self, model: nn.Module) -> None:
        reason = _unsupported_reason(model)
        if reason is not None:
            raise ValueError(f"no fast forward for this model: {reason}")
        decoder = model.model
        self.embed = decoder.embed_tokens
        self.rotary = decoder.rotary_emb
        self.layers = [_Layer.of(i, layer) for i, layer in enumerate(decoder.layers)]
        self.final_norm, self.final_eps = decoder.norm.weight, decoder.norm.variance_epsilon
        self.lm_head = model.lm_head
        self.sliding_window = (
            getattr(model.config, "sliding_window", None)
            if type(model).__name__ == "MistralForCausalLM"
            else None
        )

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
        num_tokens = hidden.shape[0]
        cos, sin = self.rotary(hidden, position_ids)  # (1, T, hd) each
        cos, sin = cos[0].unsqueeze(1), sin[0].unsqueeze(1)
        window = self.sliding_window
        for layer in self.layers:
            x = rms_norm(hidden, layer.norm1, layer.eps1)
            qkv = layer.qkv(x)
            q_end, k_end, hd = layer.q_size, layer.q_size + layer.k_size, layer.head_dim
            # q and k side by side in the product's output: one rotary pass over both (elementwise)
            qk = apply_rotary(qkv[:, :k_end].view(num_tokens, -1, hd), cos, sin)
            num_q_heads = q_end // hd
            out = attention.attend_paged(
                layer.index,
                qk[:, :num_q_heads],
                qk[:, num_q_heads:],
                qkv[:, k_end:].view(num_tokens, -1, hd),
                meta,
                layer.scaling,
                window,
            )
            hidden = hidden + layer.o_proj(out.view(num_tokens, -1))
            x = rms_norm(hidden, layer.norm2, layer.eps2)
            gate, up = layer.gate_up(x).split(layer.gate_up_sizes, dim=-1)
            hidden = hidden + layer.down(layer.act(gate) * up)
        kept = rms_norm(hidden[keep], self.final_norm, self.final_eps)  # row-wise: slice first
        return self.lm_head(kept)
