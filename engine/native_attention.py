"""Decode attention on the CPU in a small C kernel (csrc/decode_attention.c), built here on first use.

Why: at decode each sequence brings one query token, and torch's path (gather the cached k/v into
(D, ctx) tensors, then scaled_dot_product_attention) spends ~300 us a layer on a dozen tiny ops at
batch 16 on this 2-core machine. The kernel reads the paged cache in place through the block tables:
~80 us a layer alone (~190 us inside a step, caches cold), float32 accumulation, and each sequence
is computed alone in a fixed order, so a greedy completion is the same alone and amid a batch.

The kernel is compiled with the system C compiler (`$CC`, else `cc`) for this CPU (-march=native)
into `$LLMSERVE_KERNEL_DIR` (default ~/.cache/llmserve/kernels), keyed by the source, the flags, the
compiler's version and the CPU's feature flags, and loaded with ctypes (no torch headers: it builds in
well under a second).
Without a compiler, or for other devices and dtypes, `load()` returns None and attention stays on torch.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

logger = logging.getLogger("engine")

KERNEL_DIR_ENV = "LLMSERVE_KERNEL_DIR"
_SOURCE = Path(__file__).with_name("csrc") / "decode_attention.c"
# The parts of -ffast-math the kernel needs (vectorized sums and max, inlined expf), and no more: the
# -ffast-math / -Ofast / -funsafe-math-optimizations driver flags link crtfastmath.o, whose constructor
# turns on flush-to-zero for the whole thread that loads the library (the engine thread: subnormal
# floats would then read as 0 everywhere in torch and Python). -ffinite-math-only stays off: the kernel
# relies on -inf.
_FLAGS = [
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-freciprocal-math",
    "-ffp-contract=fast",
    "-shared",
    "-fPIC",
]
# OpenMP links libgomp by its soname, which resolves to the copy torch already loaded, so the kernel
# runs on the engine thread's existing OpenMP team. Without OpenMP support it builds single-threaded.
_OPENMP_FLAGS = ["-fopenmp"]
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1}

_i64, _ptr, _f32, _int = ctypes.c_int64, ctypes.c_void_p, ctypes.c_float, ctypes.c_int
_ARGTYPES = [_int, _ptr, _ptr, _ptr, _ptr, _i64, _ptr, _i64, _i64, _i64, _i64, _i64, _f32, _i64, _f32, _ptr]


def supports(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype in _DTYPE_CODES


def kernel_dir() -> Path:
    env = os.environ.get(KERNEL_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llmserve" / "kernels"


def _cpu_fingerprint() -> str:
    """The CPU's feature flags: a library built with -march=native must not run on another CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler_version(compiler: str) -> str:
    """`cc --version`'s first line: another compiler (or release) builds another library."""
    try:
        result = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return compiler
    return (result.stdout.splitlines() or [compiler])[0]


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: atomic
        built = Path(tmp) / target.name
        for extra in (_OPENMP_FLAGS, []):
            command = [compiler, *_FLAGS, *extra, "-o", str(built), str(_SOURCE), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                break
        result.check_returncode()
        os.replace(built, target)


@functools.cache
def load() -> DecodeAttentionKernel | None:
    """The compiled kernel, or None (logged once) when it cannot be built here."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: decode attention uses torch (slower on CPU)")
        return None
    source = _SOURCE.read_bytes()
    flags = " ".join(_FLAGS + _OPENMP_FLAGS).encode()
    parts = [source, flags, _compiler_version(compiler).encode(), _cpu_fingerprint().encode()]
    key = hashlib.sha256(b"\0".join(parts))
    target = kernel_dir() / f"decode_attention-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _build(compiler, target)
        return DecodeAttentionKernel(ctypes.CDLL(str(target)))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("building the CPU decode-attention kernel failed, using torch: %s", detail)
        return None


class DecodeAttentionKernel:
    """Callable wrapper over the C function; checks what the C code cannot."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._fn = library.decode_attention
        self._fn.argtypes = _ARGTYPES
        self._fn.restype = _int

    def __call__(
        self,
        query: torch.Tensor,  # (D, H, hd)
        k_cache: torch.Tensor,  # (slots, Hk, hd)
        v_cache: torch.Tensor,  # (slots, Hk, hd)
        block_tables: torch.Tensor,  # (D, width) int64
        ctx_lens: torch.Tensor,  # (D,) int64, each >= 1
        block_size: int,
        scale: float,
        sliding_window: int | None,
        softcap: float | None,
        out: torch.Tensor,  # (D, H, hd), written
    ) -> None:
        query = query.contiguous()
        num_seqs, num_heads, head_dim = query.shape
        num_kv_heads = k_cache.shape[1]
        tensors = (query, k_cache, v_cache, out)
        if not all(t.is_contiguous() and t.dtype == query.dtype for t in tensors):
            raise ValueError("decode attention wants contiguous tensors of one dtype")
        if block_tables.dtype != torch.int64 or ctx_lens.dtype != torch.int64:
            raise ValueError("block tables and context lengths must be int64")
        if not block_tables.is_contiguous() or num_heads % num_kv_heads:
            raise ValueError("bad block table layout or head count")
        status = self._fn(
            _DTYPE_CODES[query.dtype],
            query.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.shape[1],
            ctx_lens.data_ptr(),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            scale,
            sliding_window or 0,
            softcap or 0.0,
            out.data_ptr(),
        )
        if status != 0:
            raise MemoryError("decode attention could not allocate its scratch memory")
