"""`geo3k train --backend fsdp` on CPU: 2 processes (gloo) -> checkpoint -> resume -> export, and the same
first steps as the Megatron backend.

Both backends start from one HF checkpoint folder (a random tiny-qwen3-vl written with save_pretrained), so
they hold the same weights; the FSDP run shards them over 2 processes, the Megatron run uses 1. Runs go through
the real CLI in subprocesses, as tests/test_train_e2e.py does. The learning rate is constant (no warmup, min_lr =
lr), so the first steps of the 20-step FSDP run are those of a 5-step Megatron run: one launch fewer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, assert_trained_run, geo3k
from tests.conftest import train_losses as losses

STEPS = 20


def train_args(demo_shards: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "-c", str(REPO / "examples" / "tiny-cpu.yaml"),
        "--set", f"model.name_or_path={init}",
        "--set", "train.random_init=false",
        "--set", f"train.shards={demo_shards / 'train'}",
        "--set", f"train.eval_shards={demo_shards / 'test'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.global_batch_size=4",
        "--set", f"train.train_iters={STEPS}",
        "--set", "train.eval_samples=2",
        "--set", "train.warmup_fraction=0",
        "--set", "train.min_lr=1e-3",  # = train.lr of tiny-cpu.yaml
        *extra,
    ]


def fsdp_2proc(demo_shards: Path, init: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    # one thread per process: the 2 processes fill 2 cores, and a resumed run repeats the same kernels exactly
    return geo3k(*train_args(demo_shards, init, out, "--backend", "fsdp", "--nproc", "2", *extra), cwd=out.parent, threads=1)


@pytest.fixture(scope="module")
def init_checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint


@pytest.fixture(scope="module")
def full_run(demo_shards, init_checkpoint, one_sample_eval, tmp_path_factory) -> Path:
    # eval on one problem with two ranks: rank 1 has nothing to evaluate and must still take part
    out = tmp_path_factory.mktemp("fsdp") / "run"
    proc = fsdp_2proc(demo_shards, init_checkpoint, out, "--set", f"train.eval_shards={one_sample_eval}")
    assert "world 2 (tp 1, dp 2)" in proc.stdout
    assert f"step {STEPS}/{STEPS}" in proc.stdout and f"eval @ step {STEPS}" in proc.stdout
    return out


def test_fsdp_loss_goes_down_and_checkpoints_are_written(full_run):
    assert_trained_run(full_run, STEPS)
    state = json.loads((full_run / "checkpoints" / "step-0000010" / "trainer_state.json").read_text())
    assert state["backend"] == "fsdp" and state["data_parallel"] == 2
    assert (full_run / "checkpoints" / "step-0000010" / "dcp" / ".metadata").exists()


def test_fsdp_resume_continues_exactly(full_run, demo_shards, init_checkpoint, tmp_path):
    # a run "killed" right after step 10: its output folder holds what the full run had at that point
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step-0000010", run / "checkpoints" / "step-0000010")
    (run / "checkpoints" / "latest").write_text("step-0000010")
    proc = fsdp_2proc(demo_shards, init_checkpoint, run, "--resume")
    assert "resumed from" in proc.stdout
    a, b = losses(full_run), losses(run)
    assert sorted(b) == list(range(11, STEPS + 1))
    for s in range(11, STEPS + 1):
        assert abs(a[s] - b[s]) <= 1e-6, (s, a[s], b[s])


def test_fsdp_resumes_two_processes_checkpoint_on_one(full_run, demo_shards, init_checkpoint, tmp_path):
    # two processes shard per layer, one process the whole model as one group: the checkpoint (keyed by parameter
    # name) carries over, and the one process goes on with the two processes' losses (other summation order only);
    # 13 steps instead of 20 (the lr is constant here, so the schedule is the same)
    run = tmp_path / "on-one"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(full_run / "checkpoints" / "step-0000010", run / "checkpoints" / "step-0000010")
    (run / "checkpoints" / "latest").write_text("step-0000010")
    proc = geo3k(*train_args(demo_shards, init_checkpoint, run, "--backend", "fsdp", "--set", "train.train_iters=13",
                             "--set", "train.eval_interval=0", "--resume", "--allow-schedule-change"), cwd=tmp_path, threads=2)
    assert "resumed from" in proc.stdout and "world 1 (tp 1, dp 1)" in proc.stdout
    a, b = losses(full_run), losses(run)
    assert sorted(b) == [11, 12, 13]
    for s in range(11, 14):
        assert abs(a[s] - b[s]) <= 1e-5 * abs(a[s]), (s, a[s], b[s])


def test_fsdp_and_megatron_take_the_same_first_steps(full_run, demo_shards, init_checkpoint, tmp_path):
    # same weights, same data and order (the plan does not depend on the number of ranks), same lr, fp32 on CPU
    run = tmp_path / "megatron"
    geo3k(
        *train_args(demo_shards, init_checkpoint, run, "--backend", "megatron",
                    "--set", "train.train_iters=5", "--set", "train.eval_interval=0"),
        cwd=tmp_path, threads=2,
    )
    m, f = losses(run), losses(full_run)
    assert sorted(m) == [1, 2, 3, 4, 5]
    for s in range(1, 6):
        assert abs(m[s] - f[s]) <= 1e-5, (s, m[s], f[s])


def test_fsdp_export_loads_in_transformers_with_the_trained_weights(full_run, demo_shards, tmp_path):
    from transformers import AutoModelForImageTextToText

    from shared.manifest import ShardSet
    from train.data import PackingSpec, pack_samples
    from train.engine_fsdp import full_model_state

    out = tmp_path / "hf"
    geo3k("export", str(full_run), "--out", str(out), "--dtype", "float32", cwd=tmp_path, threads=2)
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists() and (out / "chat_template.jinja").exists()

    hf = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    loaded = hf.state_dict()
    trained = full_model_state(full_run / "checkpoints" / "step-0000020")
    assert set(trained) <= set(loaded)
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key

    ss = ShardSet(demo_shards / "test")
    mb = pack_samples([next(ss.iter_samples())], PackingSpec.from_processor_identity(ss.processor))
    kwargs = {"mm_token_type_ids": (mb.input_ids == hf.config.image_token_id).int()[None]}
    with torch.no_grad():
        logits = hf(input_ids=mb.input_ids[None], pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw, **kwargs).logits[0]
    loss = torch.nn.functional.cross_entropy(logits, mb.labels, ignore_index=-100)
    assert torch.isfinite(loss) and loss < 11.0  # trained: below the untrained ~ln(151936) = 11.9


def test_chunked_cross_entropy_equals_the_plain_one():
    from train.engine_fsdp import chunked_ce_sum

    torch.manual_seed(0)
    hidden = torch.randn(37, 16, requires_grad=True)
    weight = torch.randn(50, 16, requires_grad=True)
    labels = torch.randint(0, 50, (37,))
    labels[::3] = -100
    ours = chunked_ce_sum(hidden, weight, labels, chunk=5)
    ref = torch.nn.functional.cross_entropy(hidden @ weight.T, labels, ignore_index=-100, reduction="sum")
    torch.testing.assert_close(ours, ref)
    g_ours = torch.autograd.grad(ours, (hidden, weight))
    g_ref = torch.autograd.grad(ref, (hidden, weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b)
    no_labels = chunked_ce_sum(hidden, weight, torch.full((37,), -100))
    assert no_labels.item() == 0.0 and no_labels.requires_grad
    # the loss positions shipped by the data path (no nonzero() on the device) give the same sum
    shipped = chunked_ce_sum(hidden, weight, labels, chunk=5, keep=(labels != -100).nonzero().squeeze(1))
    assert torch.equal(shipped, ours)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe"])
def test_packed_fsdp_forward_equals_transformers_per_sample(family, tmp_path):
    """Samples packed into one micro-batch through the FSDP engine (varlen attention, per-sample M-RoPE, our LM
    head and loss) give the logits and loss transformers gives each sample alone: nothing crosses a boundary."""
    from types import SimpleNamespace

    from shared.config import TrainConfig
    from tests import models_fixtures as fx
    from tests.megatron_cpu import init_cpu_group
    from train.distributed import World
    from train.engine_fsdp import FSDPEngine
    from train.models.source import resolve_source

    init_cpu_group()
    torch.manual_seed(0)
    cfg, hf = fx.random_hf_model(family, seed=1, save_to=tmp_path)
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, dp=1, dp_rank=0, tp_rank=0)
    engine = FSDPEngine(cfg, TrainConfig(bf16=False), world, init_from=resolve_source(str(tmp_path), pretrained=True))

    samples = [fx.make_sample(10, [(1, 4, 6), (1, 6, 4)]), fx.make_sample(11, [(1, 8, 8)], num_text=(9, 12)), fx.make_sample(12, [], num_text=(15, 0))]
    positions = [fx.rope_positions(hf, s) for s in samples]
    batch = fx.pack(samples, positions, pad_to=sum(len(s.input_ids) for s in samples) + 5)
    labels = torch.full_like(batch["input_ids"], -100)
    for start, end in list(zip(batch["cu_seqlens"][:-1].tolist(), batch["cu_seqlens"][1:].tolist()))[:3]:
        labels[start : end - 1] = batch["input_ids"][start + 1 : end]
    mb = SimpleNamespace(**batch, labels=labels, num_images=len(batch["image_grid_thw"]))

    logits = engine.logits(mb)
    loss_sum = engine.eval_loss(mb)
    ref_sum = 0.0
    for s, pos, start in zip(samples, positions, batch["cu_seqlens"].tolist()):
        ref = fx.hf_logits(hf, s, pos)
        ours = logits[start : start + len(s.input_ids)]
        assert (ours - ref).abs().max().item() <= 1e-4, family
        ref_sum += torch.nn.functional.cross_entropy(ref[:-1], s.input_ids[1:], reduction="sum").item()
    assert abs(loss_sum.item() - ref_sum) <= 1e-4 * abs(ref_sum)
    # With the positions the data path ships (no nonzero() on the device), the same loss and logits.
    mb.loss_positions = (labels != -100).nonzero().squeeze(1)
    mb.image_positions = (batch["input_ids"] == cfg.image_token_id).nonzero().squeeze(1)
    assert torch.equal(engine.eval_loss(mb), loss_sum)
    assert torch.equal(engine.logits(mb), logits)
