"""benchmarks/fma_peak.c, the FMA-throughput ceiling roofline.py prints: built for this CPU as the
kernels are (benchmarks/fma_peak.py), every chain and every thread counted."""

import ctypes
from pathlib import Path

import pytest

from benchmarks import fma_peak

CHAINS = 12
LANES = {"avx512f": 16, "avx2": 8, "scalar": 1}


@pytest.fixture(scope="module")
def library() -> ctypes.CDLL:
    library = fma_peak.load()
    assert library is not None
    return library


def test_it_counts_every_lane_of_every_chain_on_the_widest_vectors_built(library: ctypes.CDLL) -> None:
    isa = library.fma_peak_isa().decode()
    assert isa in LANES
    cpuinfo = Path("/proc/cpuinfo")
    flags = cpuinfo.read_text() if cpuinfo.exists() else ""
    if " avx2 " in flags and " fma " in flags:
        assert isa != "scalar"  # -march=native gave it the vectors this CPU has
    assert library.fma_peak_flops_per_iteration() == CHAINS * LANES[isa] * 2


def test_every_chain_and_every_thread_runs(library: ctypes.CDLL) -> None:
    # no iterations: each thread returns the chains' starting values 1..12 (their sum, 78)
    assert library.fma_peak_run(1, 0) == 78.0
    assert library.fma_peak_run(2, 0) == 2 * 78.0
    one = library.fma_peak_run(1, 1000)
    assert one != 78.0 and one == library.fma_peak_run(1, 1000)  # it iterated, deterministically
    assert library.fma_peak_run(2, 1000) == 2 * one  # both threads ran the same chains
