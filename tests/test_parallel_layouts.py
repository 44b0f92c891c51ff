"""Every parallel layout of the Megatron backend trains the same model as one process (CPU, fp32, gloo).

All runs start from one transformers checkpoint (tests/conftest.py `tiny_checkpoint`, random weights, norms
included) and train 4 steps on the same data with `geo3k train` in subprocesses: one process, data parallelism
(DP=2), tensor parallelism (TP=2) and TP=2 with sequence parallelism, each saving a checkpoint every step. What
must hold, against the one-process run:

- the step losses and the final eval loss, within 1e-5 relative;
- the exported weights, tensor by tensor, within the fp32 floor, as the relative L2 norm of the difference of
  each tensor and of each tensor's update (trained - initial; Adam turns rounding in small gradients into
  visible update differences). Measured on this model, 4 steps of Adam at lr 1e-3, worst tensor: DP=2, which
  only reorders the gradient sums, 3.9e-6 (tensor) and 3.2e-5 (update); TP=2 and TP=2+SP 1.3e-5 and 1.1e-4,
  both in the vision tower's patch embedding, whose gradient sums over every patch. The same runs in float64
  give DP=2 1e-13 (exact) and TP 7e-7 / 6e-6: what remains is Megatron's vocab-parallel cross entropy, which
  computes in fp32 whatever the model's dtype and, under TP, sums over two vocabulary halves. Bounds: 2e-5 /
  2e-4 (DP) and 5e-5 / 5e-4 (TP). Before the gradients of the weights replicated over TP ranks were reduced
  (q/k norms; every norm under SP) and the TP weights marked as split (the gradient norm for clipping), the
  q/k norm updates were off by 85-139% of themselves and the other tensors by 1-4%;
- weights replicated over tensor-parallel ranks (the vision tower, the norms) are bit-identical on both ranks
  after every step;
- a TP=2 checkpoint resumes on one process (re-split) with the losses of the one-process run.

Eval (loss and greedy generation) runs at the end of each run; the DP=2 run evaluates a one-problem split, so
one rank has nothing to evaluate (it must not hang).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, from_checkpoint_args, geo3k, resume_from
from tests.conftest import train_losses as losses
from train.models.convert import max_relative_differences

STEPS = 4
LAYOUTS = {
    "dp2": ["--nproc", "2"],
    "tp2": ["--nproc", "2", "--set", "train.tensor_parallel=2"],
    "tp2sp": ["--nproc", "2", "--set", "train.tensor_parallel=2", "--set", "train.sequence_parallel=true"],
}


def train_args(demo_shards: Path, init: Path, out: Path, *extra: str) -> list[str]:
    return from_checkpoint_args(demo_shards, init, out, STEPS, *extra)


@pytest.fixture(scope="module")
def runs(demo_shards, tiny_checkpoint, one_sample_eval, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("layouts")
    out = {"one": root / "one"}
    geo3k(*train_args(demo_shards, tiny_checkpoint, out["one"]), cwd=root, threads=2)
    for name, extra in LAYOUTS.items():
        out[name] = root / name
        if name == "dp2":
            extra = [*extra, "--set", f"train.eval_shards={one_sample_eval}"]
        # one thread per process: 2 processes on 2 cores
        proc = geo3k(*train_args(demo_shards, tiny_checkpoint, out[name], *extra), cwd=root, threads=1)
        assert f"eval @ step {STEPS}" in proc.stdout, proc.stdout[-2000:]
    return out


def _evals(run: Path) -> list[dict]:
    return [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_step_and_eval_losses_equal_one_process(runs, layout):
    ref, got = losses(runs["one"]), losses(runs[layout])
    assert sorted(got) == list(range(1, STEPS + 1))
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (layout, s, got[s], ref[s])
    (e_ref,), (e_got,) = _evals(runs["one"]), _evals(runs[layout])
    assert abs(e_got["loss"] - e_ref["loss"]) <= 1e-5 * e_ref["loss"]
    assert e_got["answered"] == e_ref["answered"] == 2


def test_data_parallel_losses_and_eval_with_an_empty_rank(runs):
    ref, got = losses(runs["one"]), losses(runs["dp2"])
    for s in ref:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])
    (e,) = _evals(runs["dp2"])
    assert e["answered"] == 1 and e["samples"] == 1 and torch.isfinite(torch.tensor(e["loss"]))


def _hf_weights(run: Path, out: Path, cli: bool) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if cli:
        geo3k("export", str(run), "--out", str(out), "--dtype", "float32", cwd=out.parent, threads=2)
    else:
        from train.trainer import export_checkpoint

        export_checkpoint(run, out, dtype="float32")
    return load_file(str(out / "model.safetensors"))


def test_exports_equal_one_process_tensor_by_tensor(runs, tiny_checkpoint, tmp_path):
    from safetensors.torch import load_file

    init = load_file(str(tiny_checkpoint / "model.safetensors"))
    ref = _hf_weights(runs["one"], tmp_path / "one", cli=False)
    assert set(ref) == set(init)
    bounds = {"dp2": (2e-5, 2e-4), "tp2": (5e-5, 5e-4), "tp2sp": (5e-5, 5e-4)}
    for layout, (tensor_bound, update_bound) in bounds.items():
        got = _hf_weights(runs[layout], tmp_path / layout, cli=layout == "tp2sp")
        (worst_tensor, tk), (worst_update, uk) = max_relative_differences(got, ref, init)
        print(f"{layout}: max relative difference of a tensor {worst_tensor:.2e} ({tk}), of an update {worst_update:.2e} ({uk})")
        assert worst_tensor <= tensor_bound and worst_update <= update_bound, layout


@pytest.mark.parametrize("layout", ["tp2", "tp2sp"])
def test_replicated_weights_are_bit_identical_across_tp_ranks_every_step(runs, layout):
    from train.models.convert import _split_kind

    for step in range(1, STEPS + 1):
        ckpt = runs[layout] / "checkpoints" / f"step-{step:07d}"
        r0, r1 = (torch.load(ckpt / f"model_tp0{r}.pt", weights_only=True) for r in (0, 1))
        replicated = [k for k in r0 if _split_kind(k) == "replicated" and not k.endswith("_extra_state")]
        assert any("q_layernorm" in k for k in replicated) and any(k.startswith("vision.") for k in replicated)
        for k in replicated:
            assert torch.equal(r0[k], r1[k]), (layout, step, k)


def test_tp2_checkpoint_resumes_on_one_process(runs, demo_shards, tiny_checkpoint, tmp_path):
    run = tmp_path / "resumed"
    resume_from(runs["tp2"], 2, run)
    proc = geo3k(*train_args(demo_shards, tiny_checkpoint, run, "--resume"), cwd=tmp_path, threads=2)
    assert "saved with tensor_parallel=2, expert_parallel=1" in proc.stdout and "resumed from" in proc.stdout
    ref, got = losses(runs["one"]), losses(run)
    assert sorted(got) == [3, 4]
    for s in (3, 4):
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


# ---------------------------------------------------------------- layouts that cannot work are refused up front


@pytest.mark.parametrize(
    "overrides, world, expected",
    [
        ({"tensor_parallel": 2}, 1, "needs a multiple of 2 processes"),
        ({"tensor_parallel": 3}, 3, "num_attention_heads (4) is not divisible by train.tensor_parallel=3"),
        ({"tensor_parallel": 4}, 4, "num_key_value_heads (2) is not divisible"),
        ({"expert_parallel": 2}, 2, "needs a MoE model"),
        ({"backend": "fsdp", "tensor_parallel": 2}, 2, "train.backend=fsdp shards over data-parallel ranks only"),
        ({"tensor_parallel": 2, "expert_parallel": 2}, 2, "needs a multiple of 4 processes"),
    ],
)
def test_impossible_layouts_are_refused_with_the_fix(overrides, world, expected):
    from shared.config import TrainConfig
    from train.models import load_hf_config
    from train.trainer import TrainError, check_layout

    with pytest.raises(TrainError) as e:
        check_layout(TrainConfig(**overrides).validate(), load_hf_config("tiny-qwen3-vl"), world)
    assert expected in str(e.value)


def test_the_cli_refuses_before_starting_processes(demo_shards, tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO)}
    args = train_args(demo_shards, Path("tiny-qwen3-vl"), tmp_path / "run", "--set", "train.random_init=true",
                      "--set", "train.tensor_parallel=2")
    proc = subprocess.run([sys.executable, "-m", "geo3k", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--nproc 2" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
