"""fma_peak.c built for this CPU (engine.native_build.build_source) with its functions' signatures set:
`fma_peak_isa()`, `fma_peak_flops_per_iteration()`, `fma_peak_run(threads, iterations)`."""

from __future__ import annotations

import ctypes
from pathlib import Path

from engine import native_build


def load() -> ctypes.CDLL | None:
    library = native_build.build_source(Path(__file__).with_name("fma_peak.c"))
    if library is None:
        return None
    library.fma_peak_isa.restype = ctypes.c_char_p
    library.fma_peak_flops_per_iteration.restype = ctypes.c_int64
    library.fma_peak_run.restype = ctypes.c_float
    library.fma_peak_run.argtypes = [ctypes.c_int, ctypes.c_int64]
    return library
