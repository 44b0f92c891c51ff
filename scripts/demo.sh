#!/usr/bin/env bash
# Set up (if needed), make the offline demo data and preprocess it into data_shards/geo3k-demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/geo3k demo-data --out demo_data --train 200 --test 40
.venv/bin/geo3k preprocess -c demo_data/pipeline.yaml
.venv/bin/geo3k inspect data_shards/geo3k-demo/train
