#!/usr/bin/env bash
# The GPU runner: what to run is its arguments; logs and result tables go under $OUT (default /tmp/geo3k-gpu).
#
#   bash bench/gpu_run.sh prepare            # here, on any machine: the carried data (.cache/gpu: 2,200 + 200
#                                            # demo rows as shards, the 30B-A3B preset cut to 4 decoder layers)
#   bash bench/gpu_run.sh resume moe         # on the GPU machine (carry .gpuwheels and .cache/gpu)
#
# Parts (any order, any subset):
#   resume   tiny dense and tiny MoE models, bf16 on the GPU: a checkpoint of Megatron's distributed optimizer
#            (name-keyed Adam state) resumes with the uninterrupted run's losses
#   moe      qwen3-vl-30b-a3b cut to 4 decoder layers (same widths), random init, `geo3k train` on the demo shards:
#            grouped-GEMM experts (12 steps), one GEMM pair per expert (5 steps, same weights and data), grouped
#            with 3,072-token micro-batches (5 steps: the bf16 noise floor), the FSDP backend (8 steps; SKIP_FSDP=1
#            leaves it out); tokens/s, MFU, peak memory beside the memory plan
#   dense    qwen3-vl-2b and qwen3-vl-4b, `geo3k train` 12 steps each: speed, MFU and peak memory beside the plan
#   twogpu   (2 GPUs) every layout against one GPU from one random Qwen3-VL-2B checkpoint, exports compared,
#            TP=2 -> 1 GPU resume, the MoE cut with EP=2
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
DATA=.cache/gpu
SHARDS=$DATA/shards/geo3k-demo

if [ "${1:-}" = prepare ]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD
  rm -rf $DATA && mkdir -p $DATA
  $PY -m shared.cli demo-data --out $DATA/demo --train 2200 --test 200 >/dev/null
  $PY -m shared.cli preprocess -c $DATA/demo/pipeline.yaml --set shards.output_dir=$DATA/shards \
      --set preprocess.fetch.cache_dir=null -q | tail -3
  rm -rf $DATA/demo/images
  $PY - <<'EOF'
import json, shutil
from pathlib import Path
src, dst = Path("shared/presets/qwen3-vl-30b-a3b"), Path(".cache/gpu/qwen3-vl-30b-a3b-4l")
shutil.copytree(src, dst)
cfg = json.loads((src / "config.json").read_text())
cfg["text_config"]["num_hidden_layers"] = 4
(dst / "config.json").write_text(json.dumps(cfg, indent=2))
EOF
  du -sh $DATA
  exit 0
fi

source bench/gpu_env.sh
G3="$PY -m shared.cli"
W=/tmp/geo3k-work
mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
$PY -c "import torch, transformers, megatron.core as m; print('torch', torch.__version__, 'transformers', transformers.__version__, 'megatron-core', m.__version__)" | tee -a "$OUT/gpu.txt"

# train NAME SECONDS ARGS...: one `geo3k train` run on the demo shards into $W/NAME, its log in $OUT/NAME.log
train() {
  local name=$1 limit=$2; shift 2
  timeout "$limit" $G3 train --set train.shards=$SHARDS/train --set train.eval_shards=$SHARDS/test \
    --set train.output_dir=$W/$name --set train.eval_interval=0 --set train.eval_samples=0 --set train.save_last=false "$@" \
    > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "== $name rc=$rc"; grep -E "^step|memory per GPU|  total|rror|resumed|re-split" "$OUT/$name.log" | tail -8
  cp $W/$name/metrics.jsonl "$OUT/$name.metrics.jsonl" 2>/dev/null
  return $rc
}

for part in "$@"; do
  case $part in
  resume)
    # 4 steps saving at 2, then the step-2 checkpoint resumed: steps 3-4 must repeat
    for model in tiny-qwen3-vl tiny-qwen3-vl-moe; do
      common=(--set model.name_or_path=$model --set train.random_init=true --set train.global_batch_size=16
              --set train.train_iters=4 --set train.keep_checkpoints=0 --set train.compile_layers=false --set train.lr=1e-3)
      rm -rf $W/full-$model $W/resumed-$model
      train "full-$model" 300 "${common[@]}" --set train.save_interval=2
      mkdir -p $W/resumed-$model/checkpoints
      cp -r $W/full-$model/checkpoints/step-0000002 $W/resumed-$model/checkpoints/ && echo step-0000002 > $W/resumed-$model/checkpoints/latest
      train "resumed-$model" 300 "${common[@]}" --set train.save_interval=0 --resume
      $PY bench/compare_runs.py $W full-$model resumed-$model | tee "$OUT/resume-$model.md"
    done
    ;;
  moe)
    moe=(--set model.name_or_path=$DATA/qwen3-vl-30b-a3b-4l --set train.random_init=true)
    rm -rf $W/moe-*
    train moe-grouped 240 "${moe[@]}" --set train.train_iters=12
    train moe-sequential 200 "${moe[@]}" --set train.train_iters=5 --set train.moe_grouped_gemm=false
    # bf16 noise on this model: the same steps packed into smaller micro-batches (the same sums, other order)
    train moe-grouped-3072 150 "${moe[@]}" --set train.train_iters=5 --set train.max_tokens_per_gpu=3072
    [ -n "${SKIP_FSDP:-}" ] || train moe-fsdp 200 "${moe[@]}" --set train.train_iters=8 --backend fsdp
    $PY bench/compare_runs.py $W moe-grouped moe-sequential moe-grouped-3072 $([ -n "${SKIP_FSDP:-}" ] || echo moe-fsdp) | tee "$OUT/moe-compare.md"
    ;;
  dense)
    rm -rf $W/dense-*
    for model in qwen3-vl-2b qwen3-vl-4b; do
      train "dense-$model" 200 --set model.name_or_path=$model --set train.random_init=true --set train.train_iters=12
    done
    $PY bench/compare_runs.py $W dense-qwen3-vl-2b dense-qwen3-vl-4b | tee "$OUT/dense-compare.md"
    ;;
  twogpu)
    # Two GPUs. From one HF checkpoint of random Qwen3-VL-2B weights, 10 steps with eval: one GPU compiled and
    # eager (the bf16 floor), DP=2, TP=2, TP=2 + SP, exports compared tensor by tensor; the TP=2 checkpoint of
    # step 5 resumed on one GPU; the MoE cut with EP=2 against one GPU.
    rm -rf $W/two-* $W/init-2b
    $PY -c "
import torch
from transformers import AutoModelForImageTextToText
from shared.presets import load_processor
from train.models import load_hf_config
torch.manual_seed(0)
AutoModelForImageTextToText.from_config(load_hf_config('qwen3-vl-2b'), dtype=torch.bfloat16).save_pretrained('$W/init-2b')
load_processor('qwen3-vl-2b').processor.save_pretrained('$W/init-2b')"
    two=(--set model.name_or_path=$W/init-2b --set train.random_init=false --set train.train_iters=10
         --set train.eval_interval=10 --set train.eval_samples=32 --set train.save_interval=5 --set train.keep_checkpoints=0)
    train two-one 240 "${two[@]}"
    train two-eager 240 "${two[@]}" --set train.compile_layers=false
    train two-dp2 240 "${two[@]}" --nproc 2
    train two-tp2 240 "${two[@]}" --nproc 2 --set train.tensor_parallel=2
    train two-tp2sp 240 "${two[@]}" --nproc 2 --set train.tensor_parallel=2 --set train.sequence_parallel=true
    mkdir -p $W/two-resumed/checkpoints && cp -r $W/two-tp2/checkpoints/step-0000005 $W/two-resumed/checkpoints/ \
      && echo step-0000005 > $W/two-resumed/checkpoints/latest
    train two-resumed 240 "${two[@]}" --resume
    for r in one eager dp2 tp2 tp2sp; do $G3 export $W/two-$r --out $W/two-$r/export > /dev/null 2>&1; done
    $PY bench/compare_runs.py $W two-one two-eager two-dp2:2 two-tp2:2 two-tp2sp:2 two-resumed | tee "$OUT/twogpu-compare.md"
    $PY bench/compare_runs.py --exports $W/init-2b $W/two-one/export $W/two-{eager,dp2,tp2,tp2sp}/export | tee -a "$OUT/twogpu-compare.md"
    moe=(--set model.name_or_path=$DATA/qwen3-vl-30b-a3b-4l --set train.random_init=true --set train.train_iters=10)
    train two-moe-one 240 "${moe[@]}"
    train two-moe-ep2 240 "${moe[@]}" --nproc 2 --set train.expert_parallel=2
    $PY bench/compare_runs.py $W two-moe-one two-moe-ep2:2 | tee -a "$OUT/twogpu-compare.md"
    ;;
  *) echo "unknown part $part (resume, moe, dense, twogpu)"; exit 2 ;;
  esac
done
# the logs as one archive, one file to copy off the machine
(cd "$OUT" && tar czf logs.tgz --remove-files *.log *.jsonl 2>/dev/null)
