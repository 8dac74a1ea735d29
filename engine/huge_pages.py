"""CPU tensors on transparent huge pages (2 MiB), for the memory a step streams: the packed weights and
the KV cache.

Why: a decode step reads every weight (270 MB for SmolLM2) and the batch's KV pages. On 4 KiB pages
that is ~66,000 pages a step, each a TLB miss, and in a virtual machine each miss walks two page tables
(guest and host). On a 2-core Xeon with AMX guest whole decode steps ran 3-6 % faster from huge pages,
and 6-36 % while the host's memory was contended (docs/performance.md, 'Huge pages'). Linux gives an
anonymous mapping huge pages on first touch once it is advised (`MADV_HUGEPAGE`), where
`/sys/kernel/mm/transparent_hugepage/enabled` is `always` or `madvise` (most distributions); with
`never`, or off Linux, these are ordinary pages, same bits.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Sequence

import torch

logger = logging.getLogger("engine")

HUGE_PAGE_BYTES = 2 * 1024**2
PAGE_BYTES = mmap.PAGESIZE
ALIGN_BYTES = 64  # each tensor's start in an arena: a cache line, as the kernels' tile loads want


def _advised_bytes(num_bytes: int) -> torch.Tensor | None:
    """`num_bytes` of zeroed, untouched memory starting on a huge-page boundary, advised for huge pages;
    None where this system has no such advice."""
    if num_bytes <= 0 or not hasattr(mmap, "MADV_HUGEPAGE"):
        return None
    # whole huge pages from an aligned start, wherever the kernel places the mapping (its tail untouched)
    num_mapped = -(-num_bytes // HUGE_PAGE_BYTES) * HUGE_PAGE_BYTES + HUGE_PAGE_BYTES
    try:
        region = mmap.mmap(-1, num_mapped, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the faults then take 2 MiB pages
    except (OSError, ValueError) as exc:
        logger.info("huge pages not available (%s): ordinary pages", exc)
        return None
    whole = torch.frombuffer(region, dtype=torch.uint8)  # keeps the mapping alive as long as a view lives
    offset = -whole.data_ptr() % HUGE_PAGE_BYTES
    return whole[offset : offset + num_bytes]


def _offsets(tensors: Sequence[torch.Tensor]) -> tuple[list[int], int]:
    offsets, end = [], 0
    for tensor in tensors:
        offsets.append(end)
        end += -(-tensor.nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return offsets, end


def _views(arena: torch.Tensor, offsets: list[int], likes: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous tensors in `arena` at `offsets`, each of the shape and dtype of its `likes` entry."""
    return [
        arena[offset : offset + like.nbytes].view(like.dtype).view(like.shape)
        for offset, like in zip(offsets, likes, strict=True)
    ]


def zeros(shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
    """Zeroed CPU tensors of these shapes, side by side in one huge-page arena (ordinary `torch.zeros`
    where there is none). Every page is faulted in here, as `torch.zeros` does: the memory is held from
    the start, not taken in the middle of a step."""
    empties = [torch.empty(shape, dtype=dtype, device="meta") for shape in shapes]
    offsets, num_bytes = _offsets(empties)
    arena = _advised_bytes(num_bytes)
    if arena is None:
        return [torch.zeros(shape, dtype=dtype) for shape in shapes]
    arena[::PAGE_BYTES].zero_()  # a write on each page faults it in (the kernel zeroes the page)
    return _views(arena, offsets, empties)


def copies(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Contiguous copies of these CPU tensors, side by side in one huge-page arena (the tensors
    themselves where there is none)."""
    offsets, num_bytes = _offsets(tensors)
    arena = _advised_bytes(num_bytes)
    if arena is None:
        return list(tensors)
    return [view.copy_(tensor) for view, tensor in zip(_views(arena, offsets, tensors), tensors, strict=True)]
