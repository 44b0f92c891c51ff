"""The pieces of scripts/demo.sh that are not the geo3k CLI: its training config and the transformers reload.

The whole demo (setup, preprocess, 100 training steps, export, reload) takes minutes and is run by hand;
these check in seconds that examples/demo.yaml is a valid config for the demo shards and that
examples/generate.py answers a demo problem from a model folder like the one `geo3k export` writes.
"""

from __future__ import annotations

import os
import subprocess
import sys

from shared.config import load_config
from tests.conftest import REPO


def test_demo_config_is_valid_and_evaluates_at_the_end():
    cfg = load_config(REPO / "examples" / "demo.yaml", [])
    t = cfg.train
    assert cfg.dataset == "geo3k-demo" and cfg.model.name_or_path == "tiny-qwen3-vl" and t.random_init
    assert not t.bf16 and t.num_workers == 0  # CPU settings
    assert 0 < t.eval_interval <= t.train_iters and t.train_iters % t.eval_interval == 0  # an eval at the last step
    assert t.epochs * 200 // t.global_batch_size >= t.train_iters  # the 200 demo problems last all the steps


def test_generate_answers_a_demo_problem(tiny_checkpoint, demo_data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2"}
    proc = subprocess.run(
        [sys.executable, str(REPO / "examples" / "generate.py"), str(tiny_checkpoint), str(demo_data / "test.parquet"),
         "--row", "1", "--max-new-tokens", "4"],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "Qwen3VLForConditionalGeneration" in out and "Qwen3VLProcessor" in out, out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert "'<image>" in lines["question"] and "row 1" in lines["question"], out
    assert lines["gold"].strip() != "gold", out
    assert "generated" in lines and "new tokens of at most 4" in lines["generated"], out
