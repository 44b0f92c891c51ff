#!/usr/bin/env bash
# Several GPUs (issue 9), one session on a 2-GPU machine: the same random Qwen3-VL-2B weights (an HF
# checkpoint written first, so every layout starts from identical weights) and the same data, 10 steps each:
#   1 GPU  |  DP=2 (--nproc 2)  |  TP=2 + sequence parallel (--nproc 2)  |  DP=2's half-way checkpoint resumed on 1 GPU
# then compares the losses (scripts print a table) and the DP=2 scaling in tokens/s.
#   bash bench/gpu_multi_session.sh        # logs under $OUT
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
G3="$PY -m shared.cli"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
MODEL=${MODEL:-qwen3-vl-2b}
STEPS=${STEPS:-10}
W=/tmp/geo3k-multi
rm -rf $W && mkdir -p $W/logs
L=$W/logs  # everything detailed goes here and comes back as one archive (the device returns few files)
$G3 demo-data --out $W/demo --train ${TRAIN_ROWS:-1400} --test 40 > /dev/null 2>&1
$G3 preprocess -c $W/demo/pipeline.yaml --set shards.output_dir=$W/shards --set shards.samples_per_shard=64 -q | tail -4
$PY - <<EOF
import torch
from transformers import AutoModelForImageTextToText
from train.models import load_hf_config
cfg = load_hf_config("$MODEL")
torch.manual_seed(0)
m = AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained("$W/init")
print("wrote random", "$MODEL", "weights to $W/init")
EOF
common="-c $W/demo/pipeline.yaml --set model.name_or_path=$W/init --set train.shards=$W/shards/geo3k-demo/train
  --set train.eval_shards=$W/none --set train.train_iters=$STEPS --set train.save_interval=0 --set train.eval_interval=0
  --set train.keep_checkpoints=1 --set train.num_workers=2 ${TRAIN_EXTRA:-}"
run() {  # name, nproc, extra...
  local name=$1 n=$2; shift 2
  echo "=== $name"
  $G3 train $common --nproc $n --set train.output_dir=$W/$name "$@" > $L/$name.log 2>&1
  grep -E "^step|rror|resumed|training" $L/$name.log | tail -4
}
HALF=$((STEPS / 2))
run one 1
# DP=2 also saves at the half-way step: that checkpoint is resumed on one GPU below
run dp2 2 --set train.save_interval=$HALF --set train.keep_checkpoints=3
run tp2sp 2 --set train.tensor_parallel=2 --set train.sequence_parallel=true
ck=$(printf "step-%07d" $HALF)
mkdir -p $W/resume1/checkpoints && mv $W/dp2/checkpoints/$ck $W/resume1/checkpoints/ && echo $ck > $W/resume1/checkpoints/latest
echo "=== resume1 (DP=2 checkpoint of step $HALF on 1 GPU)"
$G3 train $common --set train.output_dir=$W/resume1 --resume > $L/resume1.log 2>&1
grep -E "^step|rror|resumed" $L/resume1.log | tail -4
for r in one dp2 tp2sp resume1; do cp $W/$r/metrics.jsonl "$L/metrics-$r.jsonl" 2>/dev/null; done
$PY bench/compare_runs.py $W one dp2 tp2sp resume1 | tee "$OUT/compare.md"
tar czf "$OUT/multi-logs.tgz" -C $L .
