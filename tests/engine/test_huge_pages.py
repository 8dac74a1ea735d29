"""engine/huge_pages.py: tensors side by side in one arena advised for huge pages, and the engine's packed
weights and KV cache placed there with the same tokens as on ordinary pages."""

from __future__ import annotations

import mmap
import sys
from pathlib import Path

import pytest
import torch

from engine import huge_pages, native_int8
from engine.fusion import PackedLinear
from engine.types import EngineConfig
from tests.engine.conftest import make_core
from tests.engine.test_fast_forward import run_load, tiny_bf16

THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def advice_honoured() -> bool:
    """Linux with THP `always` or `madvise`, not switched off for this process (prctl)."""
    if sys.platform != "linux" or not THP_MODE.exists() or "[never]" in THP_MODE.read_text():
        return False
    status = Path("/proc/self/status").read_text()
    return "THP_enabled:" not in status or "THP_enabled:\t1" in status


ADVICE_HONOURED = advice_honoured()


def is_advised(tensor: torch.Tensor) -> bool:
    """Whether the mapping that holds `tensor` may take huge pages (/proc/self/smaps `THPeligible`)."""
    address, mapping = tensor.data_ptr(), None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            mapping = start <= address < end
        elif mapping and head == "THPeligible:":
            return line.split()[1] == "1"
    return False


def test_zeros_are_zero_side_by_side_and_aligned():
    shapes = [(3, 5, 7), (1,), (1024, 1024, 2)]  # the last one spans huge pages
    tensors = huge_pages.zeros(shapes, torch.bfloat16)
    assert [tuple(t.shape) for t in tensors] == shapes
    assert all(t.dtype == torch.bfloat16 and t.is_contiguous() and not t.any() for t in tensors)
    assert all(t.data_ptr() % huge_pages.ALIGN_BYTES == 0 for t in tensors)
    tensors[0].fill_(1.0)  # neighbours do not overlap
    assert not tensors[1].any() and not tensors[2].any()
    if ADVICE_HONOURED:
        assert tensors[0].data_ptr() % huge_pages.HUGE_PAGE_BYTES == 0
        assert all(is_advised(t) for t in tensors)


def test_copies_equal_their_sources_and_do_not_share_them():
    sources = [torch.randn(17, 9).bfloat16(), torch.arange(10, dtype=torch.int64), torch.randn(1024, 1024)]
    moved = huge_pages.copies(sources)
    for source, copy in zip(sources, moved, strict=True):
        assert copy.dtype == source.dtype and torch.equal(copy, source)
    moved[0].zero_()
    assert sources[0].any()
    if ADVICE_HONOURED:
        assert all(is_advised(t) for t in moved)


def test_without_the_advice_ordinary_tensors(monkeypatch):
    monkeypatch.delattr(mmap, "MADV_HUGEPAGE")
    sources = [torch.randn(3, 4)]
    assert huge_pages.copies(sources)[0] is sources[0]
    (zeroed,) = huge_pages.zeros([(2, 3)], torch.float32)
    assert zeroed.shape == (2, 3) and not zeroed.any()


@pytest.mark.skipif(not ADVICE_HONOURED, reason="this system gives no transparent huge pages")
def test_the_engine_places_its_packed_weights_and_kv_cache_there(tiny):
    core = make_core(tiny_bf16(tiny[1], mistral=False))
    packed = [m for m in core.runner.model.modules() if isinstance(m, PackedLinear) and m.is_native]
    if not packed:
        pytest.skip("the bf16 kernel does not run on this CPU")
    assert all(is_advised(m.weight) for m in packed)
    assert all(is_advised(t) for t in core.kv_cache.keys + core.kv_cache.values)


def test_the_same_tokens_on_ordinary_pages(tiny):
    texts = [
        run_load(make_core(tiny_bf16(tiny[1], mistral=False), huge_pages=on), tiny[1]) for on in (True, False)
    ]
    assert texts[0] == texts[1] and all(texts[0].values())
    assert EngineConfig().huge_pages


def test_int8_weights_too_and_the_same_tokens(tiny):
    """The int8 kernel's packed blocks move as well, their handle (what the C entry points read) with them."""
    if native_int8.load() is None:
        pytest.skip("no C compiler")
    cores = [
        make_core(tiny_bf16(tiny[1], mistral=False), int8_weights=True, huge_pages=on) for on in (True, False)
    ]
    for core in cores:
        int8 = [m for m in core.runner.model.modules() if isinstance(m, PackedLinear) and m.is_int8]
        assert int8 and all(m.weight.handle.packed == m.weight.packed.data_ptr() for m in int8)
        assert all(m.weight.handle.scales == m.weight.scales.data_ptr() for m in int8)
        if ADVICE_HONOURED and core is cores[0]:
            assert all(is_advised(m.weight.packed) for m in int8)
    texts = [run_load(core, tiny[1]) for core in cores]
    assert texts[0] == texts[1] and all(texts[0].values())


@pytest.mark.skipif(not ADVICE_HONOURED, reason="this system gives no transparent huge pages")
def test_a_small_arena_still_spans_a_whole_huge_page():
    """Wherever the kernel places the mapping (2 MiB-aligned or not), the arena starts a whole huge page:
    a tiny model's weights or cache (under 2 MiB) are advised too."""
    arenas = [huge_pages.zeros([(1000 + 37 * i,)], torch.bfloat16)[0] for i in range(30)]
    assert all(is_advised(t) for t in arenas)
