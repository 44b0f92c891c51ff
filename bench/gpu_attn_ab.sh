#!/usr/bin/env bash
# One GPU, one call (issue 8 lever 1, issue 5 rerun): the varlen kernels checked against SDPA and timed per call
# (bench/validate_megatron_gpu.py, which also reruns the bf16/fp32 comparison with transformers), then the 2B
# Megatron step A/B'd over attention backends on the same machine.
#   bash bench/gpu_attn_ab.sh      # carry .gpuwheels and .cache/bench/geo3k-like-512; logs under $OUT
# AB lists label=ENV[,ENV] entries, run in order until ~AB_BUDGET seconds have gone.
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
start=$SECONDS
timeout ${VALIDATE_TIMEOUT:-200} $PY bench/validate_megatron_gpu.py --variants ${VALIDATE_VARIANTS:-fp32,bf16,bf16:aten_flash} \
  --log "$OUT/megatron-gpu.log" > "$OUT/validate-full.log" 2>&1
echo "validate rc=$? ($((SECONDS - start)) s)"
grep -E "^\||rel err|ERROR|PASS|FAIL" "$OUT/megatron-gpu.log" | head -40
AB=${AB:-"torch_varlen=GEO3K_ATTN_BACKEND=torch_varlen aten_flash=GEO3K_ATTN_BACKEND=aten_flash aten_flash_expand=GEO3K_ATTN_BACKEND=aten_flash,GEO3K_ATEN_FLASH_GQA=expand aten_flash_unfused=GEO3K_ATTN_BACKEND=aten_flash,VARIANTS=megatron-unfused"}
for entry in $AB; do
  [ $((SECONDS - start)) -gt ${AB_BUDGET:-420} ] && { echo "skip $entry: time"; continue; }
  label=${entry%%=*}; envs=${entry#*=}
  echo "== $label ($envs) at $((SECONDS - start)) s"
  env PRESETS=qwen3-vl-2b VARIANTS=megatron ${envs//,/ } OUT="$OUT/ab-$label" BENCH_TIMEOUT=${AB_TIMEOUT:-130} \
    bash bench/gpu_perf_session.sh 2>&1 | grep -E "^\| qwen|rc=" 
done
echo "total $((SECONDS - start)) s"
