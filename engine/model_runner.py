"""ModelRunner: turns a ScheduledBatch into one packed forward pass of a transformers causal LM."""

from __future__ import annotations

import logging

import torch

from engine import attention
from engine import native_attention as native_attention_kernel
from engine.attention import AttentionMetadata, PrefillSpan, pack_prefills
from engine.fast_forward import FastForward
from engine.fusion import optimize_model
from engine.kv_cache import KVCache
from engine.scheduler import ScheduledBatch, Sequence

logger = logging.getLogger("engine")


class ModelRunner:
    """Owns the model and the cache tensors; returns logits of the sequences that sample this step."""

    def __init__(
        self,
        model: torch.nn.Module,
        kv_cache: KVCache,
        device: torch.device,
        optimize: bool,
        native_attention: bool = True,
        fast_forward: bool = True,
        native_linear: bool = True,
        native_norm: bool = True,
        int8_weights: bool = False,
        native_rotary: bool = True,
        native_silu: bool = True,
        native_residual: bool = True,
        native_layers: bool = True,
        huge_pages: bool = True,
        int8_lm_head: bool = False,
    ) -> None:
        """Takes the model over: its attention becomes the paged one and, if `optimize`, its linears fused.

        `native_attention`: attention (decode and prefill) in the C kernel where it supports the device
        and dtype.
        `fast_forward`: the architectures `engine/fast_forward.py` knows (fused) run through it.
        `native_linear`: CPU bf16 products in the C kernel where the CPU has AVX512-BF16 or AVX2 + FMA.
        `native_norm`: the fast forward's bf16 CPU norms in the C kernel that gives torch's bits.
        `native_rotary`: the fast forward's bf16 CPU rotary and KV-cache write in one C call a layer.
        `native_silu`: the fast forward's SiLU-gated MLPs take SiLU and the multiply inside the gate/up
        product's C kernel (bf16 CPU products on it).
        `native_residual`: the fast forward's Llama-like layers add the o_proj and down products into the
        residual stream inside their C kernel.
        `native_layers`: the fast forward's Llama-like layers with every part in C as one fixed sequence
        of C calls (engine/native_layers.py).
        `int8_weights`: bf16 CPU products on the int8 kernel (engine/native_int8.py), if `optimize`; the lm
        head's too with `int8_lm_head`.
        `huge_pages`: the bf16 kernel's packed weights moved onto huge pages (engine/huge_pages.py)."""
        model.set_attn_implementation(attention.register())
        if optimize:
            optimize_model(model, native_linear, int8_weights, huge_pages, int8_lm_head)
        use_fast_forward = fast_forward and FastForward.supports(model)
        bf16_cpu_cache = kv_cache.dtype == torch.bfloat16 and device.type == "cpu"
        rotary = native_rotary and bf16_cpu_cache
        self.fast_forward = (
            FastForward(model, native_norm, rotary, native_silu, native_residual, native_layers)
            if use_fast_forward
            else None
        )
        path = "the engine's fast forward" if self.fast_forward is not None else "transformers' modules"
        logger.info("%s steps through %s", type(model).__name__, path)
        use_kernel = native_attention and native_attention_kernel.supports(device, kv_cache.dtype)
        self.attention_kernel = native_attention_kernel.load() if use_kernel else None
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.block_size = kv_cache.block_size

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    @staticmethod
    def _block_tables(seqs: list[Sequence]) -> torch.Tensor:
        """(S, max blocks) int64 block ids of each sequence, padded with block 0."""
        width = max(len(seq.block_table) for seq in seqs)
        return torch.tensor([seq.block_table + [0] * (width - len(seq.block_table)) for seq in seqs])

    def _gather(self, block_tables: torch.Tensor, num_positions: int) -> torch.Tensor:
        """(S, max_blocks) block ids -> (S, num_positions) cache slot of each position."""
        pos = torch.arange(num_positions)
        return block_tables[:, pos // self.block_size] * self.block_size + pos % self.block_size

    def prepare(
        self, batch: ScheduledBatch
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, list[int]]:
        """Flat input ids (1, T), positions (1, T), attention metadata, and indices of sampling tokens."""
        input_ids, positions, slots, sample_index = [], [], [], []
        for seq, n in batch.items:
            start = seq.num_computed
            input_ids += seq.token_ids(start, start + n)
            positions += range(start, start + n)
            slots += self._slots(seq.block_table, start, start + n)
            if start + n == seq.num_tokens:
                sample_index.append(len(input_ids) - 1)
        if self.attention_kernel is not None:
            meta = self._kernel_metadata(batch, positions, slots)
        else:
            meta = self._torch_metadata(batch, slots)
        ids = torch.tensor([input_ids], device=self.device)
        pos = torch.tensor([positions], device=self.device)
        return ids, pos, meta, sample_index

    def _kernel_metadata(
        self, batch: ScheduledBatch, positions: list[int], slots: list[int]
    ) -> AttentionMetadata:
        """Every new token, decode or prefill, attends in the C kernel as a one-token query over its own
        sequence's cached positions up to its own: a (T, width) block table and a context length per row."""
        tables = self._block_tables([seq for seq, _ in batch.items])
        counts = torch.tensor([n for _, n in batch.items])
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slots, device=self.device),
            num_decode=batch.num_decode,
            decode_gather=None,
            decode_lens=None,
            max_decode_ctx=0,
            prefills=[],
            kernel=self.attention_kernel,
            row_block_tables=tables.repeat_interleave(counts, dim=0),
            row_lens=torch.tensor(positions) + 1,
        )

    def _torch_metadata(self, batch: ScheduledBatch, slots: list[int]) -> AttentionMetadata:
        """torch's attention: decode rows against gathered k/v, prefill spans one by one or packed."""
        prefills: list[PrefillSpan] = []
        row = 0
        for i, (seq, n) in enumerate(batch.items):
            if i >= batch.num_decode:
                start = seq.num_computed
                table = torch.tensor([seq.block_table])
                prefills.append(
                    PrefillSpan(
                        start=row,
                        num_tokens=n,
                        gather=self._gather(table, start + n)[0].to(self.device),
                        positions=torch.arange(start, start + n, device=self.device),
                    )
                )
            row += n
        decode_gather = decode_lens = None
        max_ctx = 0
        if batch.num_decode:
            decode = [seq for seq, _ in batch.items[: batch.num_decode]]
            lens = [seq.num_computed + 1 for seq in decode]
            max_ctx = max(lens)
            decode_gather = self._gather(self._block_tables(decode), max_ctx).flatten().to(self.device)
            decode_lens = torch.tensor(lens, device=self.device)
        return AttentionMetadata(
            kv_cache=self.kv_cache,
            slot_mapping=torch.tensor(slots, device=self.device),
            num_decode=batch.num_decode,
            decode_gather=decode_gather,
            decode_lens=decode_lens,
            max_decode_ctx=max_ctx,
            prefills=prefills,
            packed=pack_prefills(prefills),
        )

    def execute(self, batch: ScheduledBatch) -> torch.Tensor:
        """Run one step; returns the logits (S, V) for the sequences whose last token was fed, in the model's
        dtype (the sampler widens them where it needs float32: a greedy pick needs nothing, and a bf16 row's
        argmax is its float32 copy's). The sequences' positions are left as they are: the core advances
        them once the step succeeded."""
        ids, pos, meta, sample_index = self.prepare(batch)
        keep = torch.tensor(sample_index, dtype=torch.long, device=self.device)
        if self.fast_forward is not None:
            logits = self.fast_forward(ids, pos, meta, keep)
        else:
            out = self.model(
                input_ids=ids, position_ids=pos, attn_meta=meta, logits_to_keep=keep, use_cache=False
            )
            logits = out.logits[0]
        return logits
