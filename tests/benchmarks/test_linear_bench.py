"""benchmarks/linear_bench.py's two regimes: one weight per shape called once per layer (cache-hot), and
`--distinct-weights`, every layer's call on a weight of its own (read from memory, as in the model); and
`--huge-pages`, the weights copied side by side onto huge pages."""

import mmap
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))  # as run as a script

from benchmarks import linear_bench


class CountingKernel:
    """Packs by identity and records which packed weight each call used."""

    def __init__(self) -> None:
        self.packed: list[torch.Tensor] = []
        self.used: list[int] = []

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        self.packed.append(weight)
        return weight

    def __call__(self, x: torch.Tensor, w: torch.Tensor, n: int, bias: None) -> None:
        assert x.shape[1] == w.shape[1] and w.shape[0] == n
        self.used.append(next(i for i, p in enumerate(self.packed) if p is w))


def test_distinct_weights_keep_the_step_and_give_every_call_its_own_weight() -> None:
    shapes = linear_bench.SMOLLM2
    distinct = linear_bench.distinct_shapes(shapes)
    assert sorted({(n, k) for n, k, _ in distinct}) == sorted({(n, k) for n, k, _ in shapes})
    assert all(times == 1 for _, _, times in distinct)
    work = lambda s: sum(n * k * times for n, k, times in s)  # noqa: E731
    assert work(distinct) == work(shapes)  # the same FLOPs and calls a step

    small = [(8, 4, 3), (4, 8, 1)]
    hot, cold = CountingKernel(), CountingKernel()
    linear_bench.step_fn(hot, 2, small)()
    linear_bench.step_fn(cold, 2, linear_bench.distinct_shapes(small))()
    assert hot.used == [0, 0, 0, 1] and len(hot.packed) == 2  # one weight per shape, called per layer
    assert cold.used == [0, 1, 2, 3] and len(cold.packed) == 4  # every call its own


class RecordingKernel:
    """Packs by identity and records the weight each call was handed."""

    def __init__(self) -> None:
        self.packed: list[torch.Tensor] = []
        self.seen: list[torch.Tensor] = []

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        self.packed.append(weight)
        return weight

    def __call__(self, x: torch.Tensor, w: torch.Tensor, n: int, bias: None) -> None:
        self.seen.append(w)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE"), reason="no huge-page advice on this system")
def test_huge_pages_run_the_calls_on_copies_side_by_side() -> None:
    kernel = RecordingKernel()
    linear_bench.step_fn(kernel, 2, [(8, 4, 1), (4, 8, 1)], on_huge_pages=True)()
    assert all(torch.equal(p, s) and p is not s for p, s in zip(kernel.packed, kernel.seen, strict=True))
    assert kernel.seen[1].data_ptr() - kernel.seen[0].data_ptr() == 8 * 4 * 2  # one arena, in order
