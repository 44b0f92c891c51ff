#!/usr/bin/env bash
# The short form of gpu_multi_session.sh for a small device budget: 1 GPU vs DP=2 (--nproc 2) on the same data
# and the same (seeded Megatron) random Qwen3-VL-2B weights, 6 steps each: losses and tokens/s side by side.
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
W=/tmp/geo3k-dp; rm -rf $W; mkdir -p $W
for run in "one 1" "dp2 2"; do
  set -- $run
  $PY -m shared.cli train --nproc $2 --set model.name_or_path=qwen3-vl-2b --set train.random_init=true \
    --set train.shards=.cache/bench/geo3k-like-512 --set train.eval_shards=$W/none --set train.global_batch_size=64 \
    --set train.train_iters=${STEPS:-6} --set train.save_interval=0 --set train.save_last=false --set train.eval_interval=0 \
    --set train.output_dir=$W/$1 > $OUT/$1.log 2>&1
  echo "$1 rc=$?"; grep -E "^step|rror" $OUT/$1.log | tail -3
done
$PY bench/compare_runs.py $W one dp2:2 | tee $OUT/compare.md
