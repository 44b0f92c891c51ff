#!/usr/bin/env bash
# One GPU, one call (issue 8, whole-layer compile; train/models/layer_compile.py): the 2B Megatron step with
# compiled layers against the same engine with eager layers, on one machine and the same data (both profiled),
# then, with the time left, the compiled model's logits and gradients against transformers and against the
# eager Megatron model (bench/validate_megatron_gpu.py).
#   bash bench/gpu_compile_ab.sh     # carry .gpuwheels and .cache/bench/geo3k-like-512; $OUT/logs.tgz comes back
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; W="$OUT/work"; mkdir -p "$W"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
start=$SECONDS
export TORCH_LOGS=${TORCH_LOGS:-recompiles,graph_breaks}  # a recompile or graph break in a compiled layer shows in the log
OUT="$W" PRESETS=${PRESETS:-qwen3-vl-2b} VARIANTS=${VARIANTS:-megatron,megatron-eager} BENCH_TIMEOUT=${BENCH_TIMEOUT:-380} \
  TIME_LIMIT=${TIME_LIMIT:-300} bash bench/gpu_perf_session.sh
left=$(( ${CALL_BUDGET:-570} - (SECONDS - start) ))
if [ "$left" -gt 60 ] && [ -n "${VALIDATE_VARIANTS-bf16,bf16+compiled}" ]; then
  echo "== validate ($left s left)"
  timeout $((left - 15)) $PY bench/validate_megatron_gpu.py --variants ${VALIDATE_VARIANTS:-bf16,bf16+compiled} \
    --log "$W/megatron-gpu.log" > "$W/validate-full.log" 2>&1
  echo "validate rc=$?"
  grep -E "rel err|compiled vs|backward|PASS|FAIL|Error" "$W/megatron-gpu.log" "$W/validate-full.log" | grep -v "^\s*[0-9]" | head -30
fi
echo "total $((SECONDS - start)) s"
tar czf "$OUT/logs.tgz" -C "$W" . && rm -rf "$W"
