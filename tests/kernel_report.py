"""Which instruction-set path of each native kernel the tests ran, for the end of pytest's output.

tests/engine's kernel fixtures record every variant they build; the root conftest prints the table
(and collects it from pytest-xdist's workers), so a CI log always says which paths were tested.
"""

from __future__ import annotations

KERNEL_PATHS: dict[str, str] = {}  # "linear_bf16[avx2]" -> the path compiled ("avx2"), or why none ran


def record_kernel(name: str, variant: str, isa: str | None) -> None:
    KERNEL_PATHS[f"{name}[{variant}]"] = isa or "no path on this CPU (skipped)"


def summary_lines(paths: dict[str, str]) -> list[str]:
    if not paths:
        return ["native kernels: none of their tests ran"]
    return ["native kernels tested (kernel[build variant]: path compiled):"] + [
        f"  {key}: {paths[key]}" for key in sorted(paths)
    ]
