#!/usr/bin/env bash
# One GPU session for `geo3k train` (issue 6): demo data -> preprocess on all cores -> Qwen3-VL-2B preset
# (random weights, bf16) for 3 epochs of global batch 128 (>= 50 steps) with eval and a final checkpoint
# -> export -> transformers loads the export.
#
# On the lent GPU machine (no network; wheels carried in .gpuwheels):
#   bash bench/gpu_train_session.sh            # logs under $OUT (or /tmp/geo3k-gpu)
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
source bench/gpu_env.sh
G3="$PY -m shared.cli"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu.txt"

TRAIN=${TRAIN_ROWS:-2200}
W=/tmp/geo3k-work
rm -rf $W && mkdir -p $W
t0=$(date +%s)
$G3 demo-data --out $W/demo --train "$TRAIN" --test 200 > "$OUT/demo.log" 2>&1 || { tail -20 "$OUT/demo.log"; exit 1; }
t1=$(date +%s)
$G3 preprocess -c $W/demo/pipeline.yaml --set shards.output_dir=$W/shards -q 2>&1 | tee "$OUT/preprocess.log" | tail -12
t2=$(date +%s)
echo "demo data ${TRAIN}+200 rows: $((t1 - t0))s; preprocess on $(nproc) cores: $((t2 - t1))s"
$G3 inspect $W/shards/geo3k-demo/train | tee "$OUT/inspect.log" | tail -4

set -o pipefail
$G3 train -c $W/demo/pipeline.yaml \
  --set model.name_or_path=${MODEL:-qwen3-vl-2b} --set train.random_init=true \
  --set train.shards=$W/shards/geo3k-demo/train --set train.eval_shards=$W/shards/geo3k-demo/test \
  --set train.output_dir=$W/run --set train.eval_interval=${EVAL_INTERVAL:-25} --set train.save_interval=0 \
  --set train.eval_samples=${EVAL_SAMPLES:-32} --set train.eval_max_new_tokens=16 --set train.keep_checkpoints=1 \
  --set train.num_workers=2 ${TRAIN_EXTRA:-} 2>&1 | grep -v -i "warn" | tee "$OUT/train.log" | tail -70
rc=$?
cp $W/run/metrics.jsonl $W/run/loss.png "$OUT/" 2>/dev/null
echo "train rc=$rc"
[ $rc -eq 0 ] || exit $rc
if [ -z "${SKIP_EXPORT:-}" ]; then
  $G3 export $W/run --out $W/hf 2>&1 | tail -1
  $PY - <<EOF 2>&1 | grep -v -i warn | tail -3
import torch
from transformers import AutoModelForImageTextToText
m = AutoModelForImageTextToText.from_pretrained("$W/hf", dtype=torch.bfloat16)
print("transformers loaded the export:", type(m).__name__, sum(p.numel() for p in m.parameters()) / 1e9, "B params")
EOF
fi
du -sh $W/run/checkpoints/* | tee -a "$OUT/gpu.txt"
