#!/usr/bin/env bash
# A checkpoint saved by 2 GPUs (DP=2, Megatron's distributed optimizer) resumed on 1 GPU (issue 9): DP=2 trains
# STEPS steps saving at STEPS/2; the half-way checkpoint is then resumed on one GPU, whose remaining steps
# must repeat DP=2's losses (the data plan is global, so both see the same samples in the same steps).
#   bash bench/gpu_resume_check.sh      # 2 GPUs; carry .gpuwheels and .cache/bench/geo3k-like-512
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
STEPS=${STEPS:-6}; HALF=$((STEPS / 2))
W=${WORK:-/tmp/geo3k-resume}; rm -rf $W; mkdir -p $W
common="--set model.name_or_path=${MODEL:-qwen3-vl-2b} --set train.random_init=true --set train.shards=${SHARDS:-.cache/bench/geo3k-like-512}
  --set train.eval_shards=$W/none --set train.global_batch_size=${GBS:-64} --set train.train_iters=$STEPS --set train.save_last=false
  --set train.eval_interval=0 --set train.keep_checkpoints=0"
$PY -m shared.cli train $common --nproc 2 --set train.output_dir=$W/dp2 --set train.save_interval=$HALF > $OUT/resume-dp2.log 2>&1
echo "dp2 rc=$?"; grep -E "^step|rror" $OUT/resume-dp2.log | tail -2
ck=$(printf "step-%07d" $HALF)
mkdir -p $W/resume1/checkpoints && mv $W/dp2/checkpoints/$ck $W/resume1/checkpoints/ && echo $ck > $W/resume1/checkpoints/latest
$PY -m shared.cli train $common --set train.output_dir=$W/resume1 --set train.save_interval=0 --resume > $OUT/resume-1gpu.log 2>&1
echo "resume1 rc=$?"; grep -E "^step|rror|resumed" $OUT/resume-1gpu.log | tail -4
$PY bench/compare_runs.py $W dp2:2 resume1 | tee "$OUT/resume-compare.md"
