"""Waiting and running queues, the per-step token budget, admission and KV-block ownership."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.kv_cache import BlockAllocator, num_blocks_for
from engine.types import SamplingParams


@dataclass(slots=True, eq=False)
class Sequence:
    """Token-level state of one request. Owned by the scheduler."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    output_ids: list[int] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose keys and values are in the cache
    arrival_s: float = field(default_factory=time.monotonic)
    admitted_s: float | None = None  # when it first got a batch slot

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def max_num_tokens(self) -> int:
        return len(self.prompt_ids) + self.params.max_new_tokens

    def token_ids(self, start: int, end: int) -> list[int]:
        num_prompt = len(self.prompt_ids)
        if end <= num_prompt:
            return self.prompt_ids[start:end]
        return (self.prompt_ids + self.output_ids)[start:end]


@dataclass(slots=True)
class ScheduledBatch:
    """One forward pass: `items` are (sequence, number of new tokens), single-token items first."""

    items: list[tuple[Sequence, int]]
    num_decode: int  # the leading items that feed exactly one token

    @property
    def num_tokens(self) -> int:
        return sum(n for _, n in self.items)

    def is_empty(self) -> bool:
        return not self.items


class Scheduler:
    """FIFO admission; blocks for prompt + max_new_tokens are reserved at admission, so no preemption."""

    def __init__(self, *, max_num_seqs: int, max_num_batched_tokens: int, block_size: int, num_blocks: int):
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.allocator = BlockAllocator(num_blocks)
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def kv_cache_usage(self) -> float:
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        budget = self.max_num_batched_tokens
        single, multi = [], []
        for seq in self.running:
            pending = seq.num_tokens - seq.num_computed
            if pending == 1:
                single.append((seq, 1))
        budget -= len(single)
        for seq in self.running:
            pending = seq.num_tokens - seq.num_computed
            if pending > 1 and budget > 0:
                multi.append((seq, min(pending, budget)))
                budget -= multi[-1][1]
        while self.waiting and budget > 0 and self._can_admit(self.waiting[0]):
            seq = self._admit(self.waiting.popleft())
            chunk = min(seq.num_tokens, budget)
            (single if chunk == 1 else multi).append((seq, chunk))
            budget -= chunk
        return ScheduledBatch(items=single + multi, num_decode=len(single))

    def _can_admit(self, seq: Sequence) -> bool:
        needed = num_blocks_for(seq.max_num_tokens, self.block_size)
        return len(self.running) < self.max_num_seqs and self.allocator.can_allocate(needed)

    def _admit(self, seq: Sequence) -> Sequence:
        seq.admitted_s = time.monotonic()
        seq.block_table = self.allocator.allocate(num_blocks_for(seq.max_num_tokens, self.block_size))
        self.running.append(seq)
        return seq

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence that ended (or was aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free(seq.block_table)
            seq.block_table = []
        elif seq in self.waiting:
            self.waiting.remove(seq)
