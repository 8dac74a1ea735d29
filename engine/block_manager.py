"""KV-cache blocks: handed out as sequences grow, reference-counted, and kept as an automatic prefix cache.

A full block is keyed by a hash of its tokens and of its parent block's hash, so one key means one
whole prefix wherever it occurs. Blocks whose tokens are all computed are registered under their key
(`commit`, driven by `seq.num_computed`, which the core advances only after a forward succeeded);
a new sequence starts after its longest registered prefix (`cached_prefix` + `attach`). A block
nobody holds stays in the cache until memory is needed, then the least recently freed goes first.
Writes only ever land at positions >= `num_computed`, i.e. in a sequence's own unregistered blocks,
so a shared block is never written again.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import TYPE_CHECKING

from engine.kv_cache import num_blocks_for

if TYPE_CHECKING:
    from engine.scheduler import Sequence


def hash_block(parent: bytes, token_ids: list[int]) -> bytes:
    """128-bit key of a full block: its tokens and everything before them (via the parent key)."""
    return hashlib.blake2b(parent + array("q", token_ids).tobytes(), digest_size=16).digest()


class BlockManager:
    """Owns every block id: free ones, ones held by sequences, and cached ones nobody holds."""

    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool = True) -> None:
        self.num_blocks, self.block_size, self.enable_caching = num_blocks, block_size, enable_caching
        self.ref_counts = [0] * num_blocks
        self.block_keys: list[bytes | None] = [None] * num_blocks
        self._plain = list(range(num_blocks - 1, -1, -1))  # free, holding nothing reusable; low ids first
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached; least recent first
        self._cached: dict[bytes, int] = {}  # key -> block id
        self.num_queries = 0  # tokens looked up in the cache at admission
        self.num_hits = 0  # of those, tokens found

    @property
    def num_free(self) -> int:
        """Blocks an allocation may take: never used, or cached but held by no sequence."""
        return len(self._plain) + len(self._evictable)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def keys(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """Keys of the first `num_blocks` full blocks of `seq` (memoized on it: tokens only append)."""
        bs, keys = self.block_size, seq.block_keys
        for i in range(len(keys), num_blocks):
            keys.append(hash_block(keys[i - 1] if i else b"", seq.token_ids(i * bs, (i + 1) * bs)))
        return keys[:num_blocks]

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks of the longest prefix of `seq` that leaves at least its last token to compute."""
        if not self.enable_caching:
            return []
        hits = []
        for key in self.keys(seq, (seq.num_tokens - 1) // self.block_size):
            block = self._cached.get(key)
            if block is None:
                break
            hits.append(block)
        return hits

    def can_admit(self, hits: list[int], num_tokens: int, reserve: int) -> bool:
        """Whether `hits` plus new blocks up to `num_tokens` fit with `reserve` blocks to spare."""
        revived = sum(1 for b in hits if self.ref_counts[b] == 0)  # they leave the free pool
        new = num_blocks_for(num_tokens, self.block_size) - len(hits)
        return revived + new + reserve <= self.num_free

    def attach(self, seq: Sequence, hits: list[int]) -> None:
        """Give a sequence without blocks its cached prefix; counts the lookup."""
        assert not seq.block_table, "attach is for a sequence that holds no blocks"
        for block in hits:
            if self.ref_counts[block] == 0:
                del self._evictable[block]
            self.ref_counts[block] += 1
        seq.block_table = list(hits)
        seq.num_committed_blocks = len(hits)
        if self.enable_caching:
            self.num_queries += seq.num_tokens
            self.num_hits += len(hits) * self.block_size

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to hold `num_tokens` tokens; False (and no change) if memory is short."""
        needed = -(-num_tokens // self.block_size) - len(seq.block_table)
        if needed <= 0:
            return True
        if needed > len(self._plain) + len(self._evictable):
            return False
        for _ in range(needed):
            block = self._take()
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the full blocks of `seq` whose tokens are all computed (successful steps only)."""
        if not self.enable_caching:
            return
        num_full = min(seq.num_computed // self.block_size, len(seq.block_table))
        if num_full <= seq.num_committed_blocks:
            return
        keys = self.keys(seq, num_full)
        for i in range(seq.num_committed_blocks, num_full):
            block = seq.block_table[i]
            if keys[i] not in self._cached:  # else another block already holds this prefix: keep that one
                self._cached[keys[i]] = block
                self.block_keys[block] = keys[i]
        seq.num_committed_blocks = num_full

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; computed full ones stay cached. Its tail is evicted first."""
        self.commit(seq)
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_keys[block] is not None:
                    self._evictable[block] = None
                else:
                    self._plain.append(block)
        seq.block_table = []
        seq.num_committed_blocks = 0

    def _take(self) -> int:
        if self._plain:
            return self._plain.pop()
        block, _ = self._evictable.popitem(last=False)  # the least recently freed cached block
        del self._cached[self.block_keys[block]]
        self.block_keys[block] = None
        return block

    def reset_cache(self) -> None:
        """Forget every cached block nobody holds (they become plain free blocks)."""
        while self._evictable:
            self._plain.append(self._take())
