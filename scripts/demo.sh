#!/usr/bin/env bash
# The whole pipeline, offline on a CPU in a few minutes (plus the set-up of .venv the first time):
#   synthetic Geo3K-shaped data -> geo3k preprocess -> geo3k train (a tiny model from random weights, eval at
#   steps 40 and 80) -> geo3k export -> transformers reloads the export and answers a test problem.
#
#   bash scripts/demo.sh
#
# Everything it writes is git-ignored: demo_data/, data_shards/geo3k-demo/, runs/demo/, runs/demo-hf/.
# A rerun starts the training over (--overwrite); preprocessing finds its shards up to date.
set -euo pipefail
cd "$(dirname "$0")/.."

SHARDS=data_shards/geo3k-demo
RUN=runs/demo
EXPORT=runs/demo-hf
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1  # presets and the packaged tokenizer: nothing to download
# One thread per process: the tiny model's matrices are too small to gain from more, and on a busy machine a
# second thread that waits for a core slows every step several-fold. Set OMP_NUM_THREADS to choose.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Megatron-Core's notices that Apex and Transformer Engine are absent (expected on a CPU) would bury the step lines
export PYTHONWARNINGS="ignore:Transformer Engine and Apex:UserWarning,ignore:Apex is not installed:UserWarning,ignore:full scope is deprecated:UserWarning"

stage=set-up
timings=()
trap 'echo "demo: FAILED in stage \"$stage\" (its output is above); fix that and rerun bash scripts/demo.sh" >&2' ERR
start=$SECONDS
t0=$SECONDS
begin() {  # closes the running stage's timer and prints the next stage's banner
  timings+=("$stage $((SECONDS - t0))s")
  stage=$1
  t0=$SECONDS
  printf '\n== %s\n' "$2"
}

bash scripts/setup.sh
geo3k=.venv/bin/geo3k
py=.venv/bin/python

begin data "demo data: 200 train + 40 test synthetic geometry problems -> demo_data/"
$geo3k demo-data --out demo_data --train 200 --test 40

begin preprocess "geo3k preprocess: tokenize once into WebDataset shards -> $SHARDS/{train,test}"
$geo3k preprocess -c demo_data/pipeline.yaml
$geo3k inspect $SHARDS/train

begin train "geo3k train: tiny-qwen3-vl from random weights, 80 steps of 4 problems (examples/demo.yaml) -> $RUN/"
$geo3k train -c examples/demo.yaml --overwrite

begin export "geo3k export: the last checkpoint as a Hugging Face model folder -> $EXPORT/"
$geo3k export $RUN --out $EXPORT

begin reload "transformers: load $EXPORT and answer test problem 0 greedily (examples/generate.py)"
$py examples/generate.py $EXPORT demo_data/test.parquet --row 0

begin summary "summary"
$py - "$RUN/metrics.jsonl" <<'PY'
import json, sys

recs = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in recs if r["kind"] == "train"]
evals = [r for r in recs if r["kind"] == "eval"]
first, last = train[0], train[-1]
drop = 1 - last["loss"] / first["loss"]
print(f"  training loss  {first['loss']:.3f} at step {first['step']} -> {last['loss']:.3f} at step {last['step']} ({drop:.0%} lower)")
for e in evals:
    print(f"  eval @ {e['step']:<6} loss {e['loss']:.3f}, image gain {e['image_gain']:+.4f}, accuracy {e['accuracy']:.0%} of {e['answered']}")
if drop < 0.3:
    sys.exit(f"the training loss fell only {drop:.0%} (expected > 30%): see {sys.argv[1]}")
PY
cat <<SUMMARY
  shards         $SHARDS/{train,test}   (look inside: $geo3k inspect $SHARDS/train --sample 0)
  run            $RUN/   (checkpoints/, config.yaml, run.json)
  loss curve     $RUN/loss.png, $RUN/metrics.jsonl, TensorBoard events in $RUN/tensorboard/
  export         $EXPORT/   (AutoModelForImageTextToText.from_pretrained("$EXPORT"), as examples/generate.py does)
  time           $(printf '%s, ' "${timings[@]}")total $((SECONDS - start))s
A model this small from random weights learns what answers look like, not geometry: expect wrong answers.
SUMMARY
