#!/usr/bin/env bash
# vLLM behind this app against vLLM's own OpenAI server, and against this project's engine: one command.
#
#   bash benchmarks/engines_bench.sh [serve_bench.py arguments, e.g. --concurrency 1 16 32 --rounds 3]
#
# Needs the vLLM venv (llmserve vllm-env). Serves SmolLM2-135M-Instruct three ways, through
# HTTP on this machine: (1) this app, model smollm2-vllm on vLLM (engine kind vllm); (2) vLLM's own
# OpenAI server alone (same venv, same dtype, same cores and KV cache); (3) this app, model
# smollm2-135m-instruct on this project's engine (configs/smollm2-135m-instruct.yaml). serve_bench.py
# alternates every level over the three (same prompts) and prints this/peer ratios: (1)/(2) is the
# serving path's cost for vLLM, (1)/(3) the engines side by side. vLLM reads the model as a Hugging Face
# folder: the one this project's loader converts the packaged GGUF into (float32, cached).
# ENGINES_BENCH_ONE_VLLM=1 keeps one vLLM alive at a time (a shared machine): (2) runs first alone,
# then (1) and (3) together; the (1)/(2) ratio then comes from two runs.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"; [ -x "$PY" ] || PY=python3
VLLM_PY="${LLMSERVE_VLLM_PYTHON:-$REPO/.venv-vllm/bin/python}"
BENCH_DIR="${BENCH_DIR:-$HOME/.cache/llmserve-engines-bench}"
APP_PORT="${APP_PORT:-8000}"; VLLM_PORT="${VLLM_PORT:-8100}"
mkdir -p "$BENCH_DIR"
[ -x "$VLLM_PY" ] || { echo "no vLLM venv at $VLLM_PY: llmserve vllm-env" >&2; exit 1; }
# SmolLM2 as the Hugging Face folder this project's loader converts its packaged GGUF into (cached)
MODEL_DIR=$("$PY" - <<'PY'
from model_zoo import resolve
from model_zoo.gguf_cache import converted_dir, ensure_converted, find_gguf, find_package_dir
spec = resolve("smollm2-135m-instruct")
gguf = find_gguf(find_package_dir(spec.location), spec.gguf_file)
print(ensure_converted(gguf, converted_dir(spec.name, gguf)))
PY
)
# vLLM's own fast dtype on this CPU, for both vLLM sides: bf16 only with AVX-512 BF16.
if grep -q avx512_bf16 /proc/cpuinfo; then DTYPE=bfloat16; else DTYPE=float32; fi
CORES=$(nproc); BIND="$((CORES - 1))"  # the replica's binding with num_cpus 1 (cpu_environment): the last core
cat > "$BENCH_DIR/serve_config.yaml" <<YAML
http_options: {host: 127.0.0.1, port: $APP_PORT}
applications:
  - name: llm
    route_prefix: /
    import_path: deployments.app:build_app
    args:
      models:
        - name: smollm2-vllm
          model: $MODEL_DIR
          use_chat_template: true
          engine: {kind: vllm, dtype: $DTYPE, max_num_seqs: 32, vllm_args: {enforce_eager: true}}
          deployment: {ray_actor_options: {num_cpus: 1}}
        - configs/smollm2-135m-instruct.yaml
YAML
PIDS=()
cleanup() { for pid in "${PIDS[@]}"; do kill -TERM -- "-$pid" 2>/dev/null || true; done; }
trap cleanup EXIT
wait_http() { for _ in $(seq 1 600); do curl -sf -m 2 "$1" >/dev/null 2>&1 && return 0; sleep 1; done; return 1; }
start_vllm_alone() {
  VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND="$BIND" VLLM_CPU_NUM_OF_RESERVED_CPU=0 HF_HUB_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 setsid "$VLLM_PY" -m vllm.entrypoints.openai.api_server --model "$MODEL_DIR" \
    --served-model-name smollm2-vllm --host 127.0.0.1 --port "$VLLM_PORT" --dtype "$DTYPE" --max-num-seqs 32 \
    --enforce-eager > "$BENCH_DIR/vllm-alone.log" 2>&1 &
  PIDS+=($!); wait_http "http://127.0.0.1:$VLLM_PORT/health"
}
start_app() {
  RAY_SERVE_THROUGHPUT_OPTIMIZED=1 RAY_SERVE_ENABLE_HA_PROXY="${RAY_SERVE_ENABLE_HA_PROXY:-0}" \
    setsid "$(dirname "$PY")/serve" run "$BENCH_DIR/serve_config.yaml" > "$BENCH_DIR/serve.log" 2>&1 &
  PIDS+=($!); wait_http "http://127.0.0.1:$APP_PORT/readyz"
}
BENCH=("$PY" benchmarks/serve_bench.py --api openai --url "http://127.0.0.1:$APP_PORT" --model smollm2-vllm)
echo "CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2), $CORES cores; vLLM dtype $DTYPE; $(date -u +%F)"
if [ "${ENGINES_BENCH_ONE_VLLM:-0}" = 1 ]; then
  start_vllm_alone
  "$PY" benchmarks/serve_bench.py --api openai --url "http://127.0.0.1:$VLLM_PORT" --model smollm2-vllm "$@"
  cleanup; PIDS=(); sleep 5
  start_app
  "${BENCH[@]}" --peer "http://127.0.0.1:$APP_PORT@smollm2-135m-instruct" "$@"
else
  start_vllm_alone
  start_app
  "${BENCH[@]}" --peer "http://127.0.0.1:$VLLM_PORT@smollm2-vllm" \
    --peer "http://127.0.0.1:$APP_PORT@smollm2-135m-instruct" "$@"
fi
