"""Builds the engine's small C kernels (engine/csrc) with the system compiler, once per machine.

Each kernel is compiled for this CPU (-march=native) into `$LLMSERVE_KERNEL_DIR` (default
~/.cache/llmserve/kernels), keyed by the source, the flags, the compiler's version and the CPU's
feature flags, and loaded with ctypes (no torch headers: a build takes well under a second). A
ctypes call releases the GIL for its duration. Without a compiler, or when a build fails, `build()`
logs why and returns None, and the caller keeps its torch path.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

logger = logging.getLogger("engine")

KERNEL_DIR_ENV = "LLMSERVE_KERNEL_DIR"
SOURCE_DIR = Path(__file__).with_name("csrc")
# OpenMP links libgomp by its soname, which resolves to the copy torch already loaded, so a kernel
# runs on the engine thread's existing OpenMP team. Without OpenMP support it builds single-threaded.
_OPENMP_FLAGS = ["-fopenmp"]
_BASE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]


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


def _compile(compiler: str, source: Path, flags: list[str], target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:  # build aside, then rename: atomic
        built = Path(tmp) / target.name
        for extra in (_OPENMP_FLAGS, []):
            command = [compiler, *_BASE_FLAGS, *flags, *extra, "-o", str(built), str(source), "-lm"]
            result = subprocess.run(command, capture_output=True, text=True, timeout=120)
            if result.returncode == 0:
                break
        result.check_returncode()
        os.replace(built, target)


def build(name: str, flags: list[str] | tuple[str, ...] = ()) -> ctypes.CDLL | None:
    """csrc/<name>.c compiled (or found built) and loaded, or None (logged) when it cannot be."""
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        logger.warning("no C compiler found: the %s kernel is off (torch is used instead)", name)
        return None
    source = SOURCE_DIR / f"{name}.c"
    all_flags = [*_BASE_FLAGS, *flags, *_OPENMP_FLAGS]
    headers = [h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h"))]  # included by the sources
    version = _compiler_version(compiler).encode()
    parts = [source.read_bytes(), *headers, " ".join(all_flags).encode(), version]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_fingerprint().encode()]))
    target = kernel_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, source, list(flags), target)
        return ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        logger.warning("building the %s kernel failed, torch is used instead: %s", name, detail)
        return None
