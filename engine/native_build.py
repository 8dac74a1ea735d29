"""Builds the engine's small C kernels (engine/csrc) with the system compiler, once per machine.

Each kernel is compiled for this CPU (-march=native) into `$LLMSERVE_KERNEL_DIR` (default
~/.cache/llmserve/kernels), keyed by the source, the flags, the compiler's version and the CPU's
feature flags, and loaded with ctypes (no torch headers: a build takes well under a second). A
ctypes call releases the GIL for its duration. Without a compiler, or when a build fails, `build()`
logs why and returns None, and the caller keeps its torch path; with `LLMSERVE_NATIVE_REQUIRED=1`
(set by .ci/run) it raises instead, so that CI cannot skip the kernels silently.

A kernel's source holds several instruction-set paths chosen at compile time (`<kernel>_isa()` in the
library names the one compiled). The server builds the `native` variant; the tests also build each
other variant this CPU can execute (`runnable_variants()`: on an AVX-512 machine, the AVX2 path
needs its own build with AVX-512 switched off; on one with AMX, the AVX512-BF16 path one with AMX
switched off), so every path that some CPU takes is tested.

`python -m engine.native_build` builds every kernel in every variant this CPU can execute into the
cache, and nothing else: it needs only the standard library and the compiler, so .ci/run runs it on the
core that the install leaves idle.
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
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger("engine")

KERNEL_DIR_ENV = "LLMSERVE_KERNEL_DIR"
REQUIRED_ENV = "LLMSERVE_NATIVE_REQUIRED"  # "1": no compiler or a failed build raises NativeBuildError
SOURCE_DIR = Path(__file__).with_name("csrc")
# OpenMP links libgomp by its soname, which resolves to the copy torch already loaded, so a kernel
# runs on the engine thread's existing OpenMP team. Without OpenMP support it builds single-threaded.
_OPENMP_FLAGS = ["-fopenmp"]
_BASE_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]

# Each kernel's own compiler flags (csrc/<name>.c), part of its cache key.
KERNEL_FLAGS: dict[str, tuple[str, ...]] = {
    "argmax": (),
    # The parts of -ffast-math the attention kernel needs (vectorized sums and max, inlined expf), and no
    # more: the -ffast-math / -Ofast / -funsafe-math-optimizations driver flags link crtfastmath.o, whose
    # constructor turns on flush-to-zero for the whole thread that loads the library (the engine thread:
    # subnormal floats would then read as 0 everywhere in torch and Python). -ffinite-math-only stays
    # off: the kernel relies on -inf.
    "decode_attention": (
        "-fno-math-errno",
        "-fno-trapping-math",
        "-fno-signed-zeros",
        "-fassociative-math",
        "-freciprocal-math",
        "-ffp-contract=fast",
    ),
    "linear_bf16": (),
    # no fused multiply-adds: the scaling of the int32 sums (a product, then the bias) must round the
    # same in every path
    "linear_int8": ("-ffp-contract=off",),
    "rms_norm": ("-ffp-contract=off",),  # no fused multiply-adds: each operation rounds as torch's does
    "rotary_kv": ("-ffp-contract=off",),  # no fused multiply-adds: each product rounds before the sum
    "llama_layers": (),  # calls the other kernels through pointers: no arithmetic of its own
}


class NativeBuildError(RuntimeError):
    """A kernel could not be built while LLMSERVE_NATIVE_REQUIRED=1."""


@dataclass(frozen=True, slots=True)
class IsaVariant:
    """A build of the kernels for one instruction-set level: extra compiler flags, the CPU flags it needs."""

    name: str
    flags: tuple[str, ...] = ()
    cpu_flags: tuple[str, ...] = ()  # as /proc/cpuinfo spells them
    x86_only: bool = False


NATIVE = IsaVariant("native")
VARIANTS = (
    NATIVE,  # everything this CPU has (-march=native): what the server runs
    # AVX512-BF16 without AMX (Cooper Lake, AMD Zen 4 and 5): forced on CPUs that have AMX too
    IsaVariant(
        "avx512bf16",
        ("-mno-amx-tile", "-mno-amx-bf16", "-mno-amx-int8"),
        ("avx512_bf16", "amx_tile", "amx_bf16"),
        x86_only=True,
    ),
    # AVX-512F/BW/VL without AVX512-BF16 (Skylake-SP to Ice Lake): forced on CPUs that have BF16 too
    IsaVariant("avx512f", ("-mno-avx512bf16",), ("avx512f", "avx512bw", "avx512vl"), x86_only=True),
    IsaVariant("avx2", ("-mno-avx512f",), ("avx2", "fma"), x86_only=True),  # AVX2 + FMA, no AVX-512
    IsaVariant("generic", ("-mno-avx512f", "-mno-avx2", "-mno-fma"), (), x86_only=True),  # plain C paths
)


def runnable_variants() -> list[IsaVariant]:
    """The variants this CPU can execute (on other architectures than x86-64, `native` only)."""
    flags = set(_cpu_fingerprint().split())
    is_x86 = platform.machine() in ("x86_64", "AMD64")
    return [v for v in VARIANTS if (is_x86 or not v.x86_only) and flags.issuperset(v.cpu_flags)]


def is_required() -> bool:
    return os.environ.get(REQUIRED_ENV, "") == "1"


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


def build_kernel(name: str, variant: IsaVariant = NATIVE) -> ctypes.CDLL | None:
    """The kernel `name` built with its own flags (KERNEL_FLAGS) and loaded, as `build()`."""
    return build(name, KERNEL_FLAGS[name], variant)


def build(
    name: str, flags: list[str] | tuple[str, ...] = (), variant: IsaVariant = NATIVE
) -> ctypes.CDLL | None:
    """csrc/<name>.c compiled (or found built) and loaded, or None (logged) when it cannot be; with
    LLMSERVE_NATIVE_REQUIRED=1, NativeBuildError instead of None."""
    target = ensure_built(name, flags, variant)
    if target is None:
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        message = f"loading the {name} kernel ({variant.name}) failed, torch is used instead: {exc}"
        return _unavailable(message)


def ensure_built(
    name: str, flags: list[str] | tuple[str, ...] = (), variant: IsaVariant = NATIVE
) -> Path | None:
    """The path of csrc/<name>.c's library for these flags, compiled if the cache lacks it; None (logged)
    when it cannot be built, or NativeBuildError where required."""
    return _ensure_built_source(name, SOURCE_DIR / f"{name}.c", flags, variant)


def build_source(source: Path) -> ctypes.CDLL | None:
    """Another C file (a benchmark's: benchmarks/fma_peak.c) built for this CPU as the kernels are, in
    the same cache, and loaded; None (logged) when it cannot be."""
    target = _ensure_built_source(source.stem, source, (), NATIVE)
    if target is None:
        return None
    try:
        return ctypes.CDLL(str(target))
    except OSError as exc:
        return _unavailable(f"loading {source.name}'s build failed: {exc}")


def _ensure_built_source(
    name: str, source: Path, flags: list[str] | tuple[str, ...], variant: IsaVariant
) -> Path | None:
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if compiler is None:
        return _unavailable(f"no C compiler found: the {name} kernel is off (torch is used instead)")
    flags = [*flags, *variant.flags]
    all_flags = [*_BASE_FLAGS, *flags, *_OPENMP_FLAGS]
    headers = [h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h"))]  # included by the sources
    version = _compiler_version(compiler).encode()
    parts = [source.read_bytes(), *headers, " ".join(all_flags).encode(), version]
    key = hashlib.sha256(b"\0".join([*parts, _cpu_fingerprint().encode()]))
    target = kernel_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    try:
        if not target.exists():
            _compile(compiler, source, list(flags), target)
        return target
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        message = f"building the {name} kernel ({variant.name}) failed, torch is used instead: {detail}"
        return _unavailable(message)


def isa_of(library: ctypes.CDLL, name: str) -> str:
    """Which instruction-set path of csrc/<name>.c this library compiled ("avx512bf16", "avx2", ...)."""
    function = getattr(library, f"{name}_isa")
    function.restype = ctypes.c_char_p
    return function().decode()


def _unavailable(message: str) -> None:
    if is_required():
        raise NativeBuildError(f"{message} ({REQUIRED_ENV}=1)")
    logger.warning("%s", message)
    return None


def build_all() -> list[str]:
    """Every kernel in every variant this CPU can execute built into the cache, none loaded; the
    "<kernel> (<variant>)" of each build that failed (logged; NativeBuildError where required)."""
    return [
        f"{name} ({variant.name})"
        for variant in runnable_variants()
        for name, flags in KERNEL_FLAGS.items()
        if ensure_built(name, flags, variant) is None
    ]


if __name__ == "__main__":
    import sys
    import time

    logging.basicConfig(level=logging.INFO, format="native_build: %(message)s")
    start_s = time.perf_counter()
    failures = build_all()
    num_builds = len(KERNEL_FLAGS) * len(runnable_variants())
    print(
        f"native_build: {num_builds - len(failures)} of {num_builds} kernel builds in {kernel_dir()} "
        f"({time.perf_counter() - start_s:.1f} s)" + (f"; failed: {', '.join(failures)}" if failures else "")
    )
    sys.exit(1 if failures else 0)
