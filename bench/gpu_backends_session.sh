#!/usr/bin/env bash
# One GPU: the FSDP backend's throughput beside the Megatron backend's (bench_throughput.py), and the first
# 5 steps of both backends from the same random Qwen3-VL-2B weights on the same data, bf16 (issue 7).
#   bash bench/gpu_backends_session.sh      # carry .gpuwheels and .cache/bench/geo3k-like-512
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
SHARDS=${SHARDS:-.cache/bench/geo3k-like-512}
MODEL=${MODEL:-qwen3-vl-2b}
W=/tmp/geo3k-backends; rm -rf $W; mkdir -p $W
timeout ${BENCH_TIMEOUT:-150} $PY bench/bench_throughput.py --shards $SHARDS --steps 6 --warmup 2 --presets $MODEL \
  --variants fsdp --out $OUT/throughput-fsdp.json > $OUT/throughput-fsdp.log 2>&1
echo "fsdp bench rc=$?"; grep -E "^\|" $OUT/throughput-fsdp.log | tail -3
$PY - <<PYEOF
import torch
from transformers import AutoModelForImageTextToText
from train.models import load_hf_config
torch.manual_seed(0)
AutoModelForImageTextToText.from_config(load_hf_config("$MODEL"), dtype=torch.bfloat16).save_pretrained("$W/init")
PYEOF
for b in megatron fsdp; do
  $PY -m shared.cli train --backend $b --set model.name_or_path=$W/init --set train.shards=$SHARDS \
    --set train.eval_shards=$W/none --set train.train_iters=5 --set train.global_batch_size=64 \
    --set train.save_interval=0 --set train.save_last=false --set train.eval_interval=0 \
    --set train.output_dir=$W/$b ${TRAIN_EXTRA:-} > $OUT/train-$b.log 2>&1
  echo "$b rc=$?"; grep -E "^step|rror" $OUT/train-$b.log | tail -5
done
$PY bench/compare_runs.py $W megatron fsdp | tee $OUT/backends.md
