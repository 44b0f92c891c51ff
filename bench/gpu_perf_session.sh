#!/usr/bin/env bash
# One GPU, one call: bench/bench_throughput.py for issue 8 (Megatron first so a failure shows early, then the
# plain transformers baseline and FSDP on the same samples, then the 4B and 8B presets through Megatron).
#   bash bench/gpu_perf_session.sh       # carry .gpuwheels and .cache/bench/geo3k-like-512; logs under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export TORCH_LOGS=${TORCH_LOGS:-recompiles}  # any recompile of the fused kernels shows in the log, with its reason
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
git log -1 --format='commit %H' 2>/dev/null | tee -a "$OUT/gpu.txt"
timeout ${BENCH_TIMEOUT:-560} $PY bench/bench_throughput.py --shards ${SHARDS:-.cache/bench/geo3k-like-512} --steps 8 --warmup 3 \
  --presets ${PRESETS:-qwen3-vl-2b,qwen3-vl-4b,qwen3-vl-8b} --variants ${VARIANTS:-megatron,baseline,fsdp} --profile \
  --time-limit-s ${TIME_LIMIT:-400} --out "$OUT/throughput.json" ${BENCH_EXTRA:-} > "$OUT/throughput-full.log" 2>&1
echo "bench rc=$?"
grep -v -i "warn" "$OUT/throughput-full.log" | grep -E "^\||^Device|^- |rror" | tail -30
