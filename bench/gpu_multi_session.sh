#!/usr/bin/env bash
# Several GPUs (issue 9), one call on a 2-GPU machine. The same random Qwen3-VL-2B weights (an HF checkpoint
# written first: Megatron's own random init differs between TP layouts) and the same Geo3K-like shards, STEPS
# steps each:
#   one (1 GPU) | dp2 (--nproc 2, saves at STEPS/2) | tp2sp (tensor parallel 2 + sequence parallel) |
#   resume1 (dp2's half-way checkpoint resumed on 1 GPU for the remaining steps)
# then compare_runs.py: per-step losses, the largest relative difference from `one`, tokens/s (scaling).
#   bash bench/gpu_multi_session.sh        # carry .gpuwheels and .cache/bench/geo3k-like-512; logs under $OUT
# On CPU (NO_WHEELS=1 PYTHON=.venv/bin/python MODEL=tiny-qwen3-vl SKIP_TP=1) it checks the plumbing: gloo has
# no sequence-parallel RNG tracker, so tp2sp needs GPUs.
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}; mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
G3="$PY -m shared.cli"
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpu.txt"
MODEL=${MODEL:-qwen3-vl-2b}
STEPS=${STEPS:-10}
SHARDS=${SHARDS:-.cache/bench/geo3k-like-512}
W=${WORK:-/tmp/geo3k-multi}
rm -rf $W && mkdir -p $W
t0=$(date +%s)
$PY - <<PYEOF
import torch
from transformers import AutoModelForImageTextToText
from train.models import load_hf_config
torch.manual_seed(0)
AutoModelForImageTextToText.from_config(load_hf_config("$MODEL"), dtype=torch.bfloat16).save_pretrained("$W/init")
print("random $MODEL weights written to $W/init")
PYEOF
common="--set model.name_or_path=$W/init --set train.shards=$SHARDS --set train.eval_shards=$W/none
  --set train.global_batch_size=${GBS:-64} --set train.train_iters=$STEPS --set train.save_interval=0 --set train.save_last=false
  --set train.eval_interval=0 --set train.keep_checkpoints=2 --set train.num_workers=2 ${TRAIN_EXTRA:-}"
run() {  # name, nproc, extra...
  local name=$1 n=$2; shift 2
  $G3 train $common --nproc $n --set train.output_dir=$W/$name "$@" > $OUT/$name.log 2>&1
  echo "=== $name rc=$? ($(( $(date +%s) - t0 )) s)"; grep -E "^step|rror|resum" $OUT/$name.log | tail -3
}
HALF=$((STEPS / 2))
run one 1
run dp2 2 --set train.save_interval=$HALF
[ -z "${SKIP_TP:-}" ] && run tp2sp 2 --set train.tensor_parallel=2 --set train.sequence_parallel=true
ck=$(printf "step-%07d" $HALF)
mkdir -p $W/resume1/checkpoints && cp -r $W/dp2/checkpoints/$ck $W/resume1/checkpoints/ && echo $ck > $W/resume1/checkpoints/latest
run resume1 1 --resume
names="one dp2:2"; [ -z "${SKIP_TP:-}" ] && names="$names tp2sp:2"
$PY bench/compare_runs.py $W $names resume1 | tee "$OUT/compare.md"
