#!/usr/bin/env bash
# This app against vLLM-CPU (or another OpenAI server) through HTTP, one server at a time: one command.
#
#   bash benchmarks/peer_bench.sh [serve_bench.py arguments, e.g. --concurrency 1 16 32 64 --rounds 2]
#
# Each server runs alone: started, measured with serve_bench.py (--save), stopped, then the other. A
# server left up and idle beside the other costs it CPU: on a 2-core machine this app's idle Ray
# processes took 10-14 % of vLLM-CPU's throughput, while vLLM idle cost this app nothing measurable
# (docs/performance.md). PHASES (default 2) runs of each, alternated this, peer, peer, this, ... so the
# host's drift lands on both; then peer_ratio.py pairs them and prints the ratios with their range.
#
#   PEER_START   command that starts the peer in the background and prints its process-group id
#                (default: ../shared/tools/peer-vllm.sh, vLLM-CPU on 127.0.0.1:8100, in its fast dtype)
#   PEER_URL     the peer's address (default http://127.0.0.1:8100)
#   THIS_CONFIG  the serve config `llmserve serve` starts (default serve_config.yaml; pass serve_bench's
#                --model-config too, for the settings line of the table)
#   OUT          folder for the logs and saved runs (default ~/.cache/llmserve-peer-bench/<time>)
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$REPO/.venv/bin/python}"; [ -x "$PY" ] || PY=python3
LLMSERVE="$(dirname "$PY")/llmserve"; [ -x "$LLMSERVE" ] || LLMSERVE=llmserve
PEER_START="${PEER_START:-bash $REPO/../shared/tools/peer-vllm.sh}"
PEER_URL="${PEER_URL:-http://127.0.0.1:8100}"
THIS_CONFIG="${THIS_CONFIG:-serve_config.yaml}"
PHASES="${PHASES:-2}"
OUT="${OUT:-$HOME/.cache/llmserve-peer-bench/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
THIS_PID=""; PEER_PGID=""

wait_gone() {  # a process (group with -g) to end, SIGKILL after 60 s
  local flag=$1 id=$2
  for _ in $(seq 1 60); do
    if [ "$flag" = -g ]; then pgrep -g "$id" >/dev/null || return 0; else kill -0 "$id" 2>/dev/null || return 0; fi
    sleep 1
  done
  if [ "$flag" = -g ]; then kill -KILL -- "-$id" 2>/dev/null || true; else kill -KILL "$id" 2>/dev/null || true; fi
}
stop_this() { [ -n "$THIS_PID" ] && { kill -TERM "$THIS_PID" 2>/dev/null || true; wait_gone -p "$THIS_PID"; }; THIS_PID=""; }
stop_peer() { [ -n "$PEER_PGID" ] && { kill -TERM -- "-$PEER_PGID" 2>/dev/null || true; wait_gone -g "$PEER_PGID"; }; PEER_PGID=""; }
trap 'stop_this; stop_peer' EXIT

run_this() {
  local phase=$1; shift
  setsid "$LLMSERVE" serve "$THIS_CONFIG" > "$OUT/this-$phase.log" 2>&1 &
  THIS_PID=$!
  "$PY" benchmarks/serve_bench.py "$@" --save "$OUT/this-$phase.json" > "$OUT/this-$phase.txt" 2>&1 \
    || { tail -5 "$OUT/this-$phase.txt" >&2; exit 1; }
  stop_this
}
run_peer() {
  local phase=$1; shift
  PEER_PGID=$($PEER_START | tail -1)
  [[ "$PEER_PGID" =~ ^[0-9]+$ ]] || { echo "PEER_START printed no process group: $PEER_PGID" >&2; exit 1; }
  "$PY" benchmarks/serve_bench.py "$@" --url "$PEER_URL" --as-peer --save "$OUT/peer-$phase.json" \
    > "$OUT/peer-$phase.txt" 2>&1 || { tail -5 "$OUT/peer-$phase.txt" >&2; exit 1; }
  stop_peer
}

echo "one server at a time, $PHASES runs each; logs and runs in $OUT"
for phase in $(seq 1 "$PHASES"); do
  if [ $((phase % 2)) = 1 ]; then order="this peer"; else order="peer this"; fi
  for side in $order; do
    echo "$(date -u +%T) run $phase: $side"
    if [ "$side" = this ]; then run_this "$phase" "$@"; else run_peer "$phase" "$@"; fi
  done
done
THIS_RUNS=(); PEER_RUNS=()
for phase in $(seq 1 "$PHASES"); do THIS_RUNS+=("$OUT/this-$phase.json"); PEER_RUNS+=("$OUT/peer-$phase.json"); done
"$PY" benchmarks/peer_ratio.py "${THIS_RUNS[@]}" --peer "${PEER_RUNS[@]}" | tee "$OUT/ratios.md"
