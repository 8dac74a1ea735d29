"""Waiting and running queues, the per-step token budget, admission, KV blocks on demand, preemption.

Policy (docs/kv_cache.md):
- A step's token budget goes to decodes first (one token each), then to prefill chunks, oldest first.
- Blocks are taken as sequences grow. When a running sequence cannot get the blocks of its next
  tokens, the newest running sequence is preempted: its blocks are freed (full computed ones stay in
  the prefix cache), `num_computed` goes back to 0 and it returns to the FRONT of the waiting queue,
  to be recomputed (prompt + the tokens it already generated) when memory allows.
- Admission is FIFO and needs only the blocks of the first chunk plus a small watermark; it stops
  for the step once anything was preempted.
- Fairness: the oldest running sequence is never a victim of a younger one, and a sequence that fits
  the context fits the cache alone, so the oldest always progresses and no request waits forever.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from engine.block_manager import BlockManager
from engine.types import SamplingParams

WATERMARK_FRACTION = 0.01  # of the blocks, kept free at admission so running sequences can grow


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
    block_keys: list[bytes] = field(default_factory=list)  # prefix-cache keys of its full blocks, memoized
    num_committed_blocks: int = 0  # leading blocks of block_table already offered to the prefix cache
    num_preemptions: int = 0

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
        if start >= num_prompt:
            return self.output_ids[start - num_prompt : end - num_prompt]
        return self.prompt_ids[start:] + self.output_ids[: end - num_prompt]


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

    def mark_computed(self) -> None:
        """Advance each sequence past the tokens this forward computed: only once it has succeeded
        (a forward that fails, even after its work was queued, is re-run from the same positions)."""
        for seq, n in self.items:
            seq.num_computed += n


class Scheduler:
    """FIFO admission, blocks on demand, newest-first preemption, automatic prefix caching."""

    def __init__(
        self,
        *,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        block_size: int,
        num_blocks: int,
        enable_prefix_caching: bool = True,
    ) -> None:
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.block_size = block_size
        self.allocator = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.watermark_blocks = max(1, int(num_blocks * WATERMARK_FRACTION))
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    @property
    def kv_cache_usage(self) -> float:
        """Blocks held by sequences, 0..1 (cached blocks nobody holds count as free)."""
        return 1.0 - self.allocator.num_free / self.allocator.num_blocks

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self) -> ScheduledBatch:
        for seq in self.running:  # what the last successful step computed enters the prefix cache
            self.allocator.commit(seq)
        num_decode = sum(1 for seq in self.running if seq.num_tokens - seq.num_computed == 1)
        decode_budget = min(num_decode, self.max_num_batched_tokens)
        prefill_budget = self.max_num_batched_tokens - decode_budget
        scheduled: list[tuple[Sequence, int]] = []
        preempted = False
        index = 0
        while index < len(self.running):  # oldest first; victims are taken from the end
            seq = self.running[index]
            index += 1
            pending = seq.num_tokens - seq.num_computed
            if pending == 1 and decode_budget > 0:
                num_new = 1
                decode_budget -= 1
            elif pending > 1 and prefill_budget > 0:
                num_new = min(pending, prefill_budget)
                prefill_budget -= num_new
            else:
                continue
            while not self.allocator.allocate(seq, seq.num_computed + num_new):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append((seq, num_new))
        if not preempted:
            prefill_budget += decode_budget  # decode slots nobody used
            scheduled += self._admit_waiting(prefill_budget)
        single = [item for item in scheduled if item[1] == 1]
        multi = [item for item in scheduled if item[1] > 1]
        return ScheduledBatch(items=single + multi, num_decode=len(single))

    def _admit_waiting(self, budget: int) -> list[tuple[Sequence, int]]:
        """FIFO: the head of the queue starts if its cached prefix + first chunk fit, with a watermark."""
        admitted = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.allocator.cached_prefix(seq)
            num_cached = len(hits) * self.block_size
            num_new = min(seq.num_tokens - num_cached, budget)
            reserve = self.watermark_blocks if self.running else 0
            if not self.allocator.can_admit(hits, num_cached + num_new, reserve):
                break
            self.waiting.popleft()
            self.allocator.attach(seq, hits)
            seq.num_computed = num_cached
            self.allocator.allocate(seq, num_cached + num_new)
            if seq.admitted_s is None:
                seq.admitted_s = time.monotonic()
            self.running.append(seq)
            admitted.append((seq, num_new))
            budget -= num_new
        return admitted

    def _preempt(self, seq: Sequence) -> None:
        """Free a running sequence's blocks and queue it first, to be recomputed."""
        self.running.remove(seq)
        self.allocator.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Drop a sequence that ended (or was aborted) and free its blocks."""
        if seq in self.running:
            self.running.remove(seq)
            self.allocator.free(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
