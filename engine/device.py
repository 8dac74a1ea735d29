"""Device and dtype choice: CUDA with bf16 when Ray gives the replica a GPU, else the CPU."""

from __future__ import annotations

import contextlib
import ctypes
import os

import torch

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' picks CUDA when a GPU is visible, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def cpu_has_fast_bf16() -> bool:
    """True when oneDNN has native bf16 kernels here (AVX-512 BF16 / AMX)."""
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """'auto' is bf16 on CUDA and on CPUs with native bf16, else float32."""
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)} or 'auto'")
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work, so that its errors surface here. A CUDA kernel runs after the
    call that queued it returns, and its error appears at the next synchronization (in the sampler,
    which would blame sampling); the engine synchronizes inside its forward's error handling instead."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_num_threads() -> int:
    """Every core this process may run on (Ray's OMP_NUM_THREADS=1 for fractional CPUs is ignored)."""
    return len(os.sched_getaffinity(0))


def release_free_memory() -> None:
    """Hand memory freed during loading back to the OS (glibc keeps it otherwise: ~220 MiB here)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
