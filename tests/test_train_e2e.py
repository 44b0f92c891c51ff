"""`geo3k train` end to end on CPU: demo shards -> 20 steps -> checkpoint -> resume -> export -> transformers.

The tiny preset (tiny-qwen3-vl: 2 layers, hidden 64, the real vocabulary and image geometry) trains on the
demo shards made with the Qwen3-VL-2B processor. Runs go through the real CLI in subprocesses (gloo, one
process), so each starts and ends its own process group.
"""

from __future__ import annotations

import inspect
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, assert_trained_run, geo3k
from tests.conftest import train_losses as losses

STEPS = 20


def train_args(demo_shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "-c", str(REPO / "examples" / "tiny-cpu.yaml"),
        "--set", f"train.shards={demo_shards / 'train'}",
        "--set", f"train.eval_shards={demo_shards / 'test'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.global_batch_size=4",
        "--set", f"train.train_iters={STEPS}",
        "--set", "train.eval_samples=all",
        *extra,
    ]


@pytest.fixture(scope="module")
def full_run(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("train") / "run"
    proc = geo3k(*train_args(demo_shards, out), cwd=out.parent)
    assert f"step {STEPS}/{STEPS}" in proc.stdout and "eval @ step 20" in proc.stdout
    return out


def test_loss_goes_down_and_checkpoints_are_written(full_run):
    assert_trained_run(full_run, STEPS)
    assert (full_run / "checkpoints" / "latest").read_text() == "step-0000020"
    assert (full_run / "loss.png").stat().st_size > 1000


def test_eval_samples_all_answers_the_whole_test_split(full_run, demo_shards):
    import json

    from shared.manifest import ShardSet

    evals = [json.loads(x) for x in (full_run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["answered"] for e in evals] == [ShardSet(demo_shards / "test").num_samples] * 2


def test_resume_continues_exactly(full_run, demo_shards, tmp_path):
    # a run "killed" right after step 10: its output folder holds what the full run had at that point
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step-0000010", run / "checkpoints" / "step-0000010")
    (run / "checkpoints" / "latest").write_text("step-0000010")
    proc = geo3k(*train_args(demo_shards, run), "--resume", cwd=tmp_path)
    assert "resumed from" in proc.stdout
    a, b = losses(full_run), losses(run)
    assert sorted(b) == list(range(11, STEPS + 1))
    for s in range(11, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


def test_export_loads_in_transformers_with_the_same_logits(full_run, demo_shards, tmp_path):
    from transformers import AutoModelForImageTextToText

    from shared.manifest import ShardSet
    from tests.megatron_cpu import init_megatron_cpu
    from train.data import PackingSpec, pack_samples
    from train.engine_megatron import merged_model_state
    from train.models import load_hf_config
    from train.models.convert import load_megatron_state
    from train.models.qwen_vl import build_model

    out = tmp_path / "hf"
    geo3k("export", str(full_run), "--out", str(out), "--dtype", "float32", cwd=tmp_path)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()

    hf = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    ss = ShardSet(demo_shards / "test")
    sample = next(ss.iter_samples())
    mb = pack_samples([sample], PackingSpec.from_processor_identity(ss.processor))
    kwargs = {}
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:  # transformers >= 5.2x
        kwargs["mm_token_type_ids"] = (mb.input_ids == hf.config.image_token_id).int()[None]
    with torch.no_grad():
        ref = hf(
            input_ids=mb.input_ids[None],
            pixel_values=mb.pixel_values,
            image_grid_thw=mb.image_grid_thw,
            attention_mask=torch.ones_like(mb.input_ids)[None],
            **kwargs,
        ).logits[0]

    init_megatron_cpu()
    ckpt = full_run / "checkpoints" / "step-0000020"
    hf_config = load_hf_config(str(out))
    model = build_model(hf_config, use_cpu_initialization=True, perform_initialization=False)
    load_megatron_state(model, merged_model_state(ckpt, hf_config))
    with torch.no_grad():
        ours = model.eval()(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.pixel_values, mb.image_grid_thw)
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= 1e-4


def test_the_step_line_says_what_the_step_compiled():
    """`geo3k train`'s step line names the graphs torch.compile and cuDNN built in that step (their time is in its
    s/step), and says nothing of either in a step that built none."""
    from train.metrics import MetricsLogger

    v = dict(loss=2.5, lr=1e-5, grad_norm=0.5, tokens_per_s=20000.0, step_s=1.0, mfu=0.4)
    quiet = MetricsLogger.line(5, 20, v, 60.0)
    assert "compiled" not in quiet and "cuDNN" not in quiet and "MFU 40.0%" in quiet
    busy = MetricsLogger.line(1, 20, {**v, "new_graphs": 4, "new_attention_graphs": 6}, 60.0)
    assert "compiled 4 graphs" in busy and "built 6 cuDNN attention graphs" in busy
