"""`geo3k train` on the tiny MoE preset (tiny-qwen3-vl-moe: 8 experts, top-2, a dense layer between two MoE
layers) on CPU, both backends, from one transformers checkpoint (conftest `tiny_moe_checkpoint`):

- Megatron, one process: the reference run (grouped experts, all-to-all dispatcher, a checkpoint each step);
- Megatron, expert parallelism over 2 processes (EP=2, 4 experts each): the same losses and, exported, the same
  weights. Measured: losses within 1e-7 relative, every tensor within 8e-6 (relative L2 norm of the
  difference; the EP=2 run is also DP=2 for the dense weights, which reorders their gradient sums);
- its step-2 checkpoint resumed on one process (experts merged): the reference's step 3;
- one GEMM pair per expert (`train.moe_grouped_gemm=false`) with full recomputation: the reference's losses;
- the load-balancing loss switched on: the same first loss, another second one;
- the FSDP backend (transformers' experts) over 2 processes: the reference's losses, and its own resume;
- `geo3k export` of the reference loads in transformers with the Megatron model's logits.
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from tests.conftest import from_checkpoint_args, geo3k, resume_from
from tests.conftest import train_losses as losses
from train.models.convert import max_relative_differences

STEPS = 3


@pytest.fixture(scope="module")
def runs(demo_shards, tiny_moe_checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    variants = {
        "one": ([], 2),
        "ep2": (["--nproc", "2", "--set", "train.expert_parallel=2"], 1),
        "fsdp": (["--nproc", "2", "--backend", "fsdp"], 1),
    }
    out = {}
    for name, (extra, threads) in variants.items():
        out[name] = root / name
        proc = geo3k(*from_checkpoint_args(demo_shards, tiny_moe_checkpoint, out[name], STEPS, *extra), cwd=root, threads=threads)
        assert f"eval @ step {STEPS}" in proc.stdout, proc.stdout[-2000:]
    return out


def _assert_same_losses(got: dict[int, float], ref: dict[int, float], steps) -> None:
    assert sorted(got) == list(steps)
    for s in steps:
        assert abs(got[s] - ref[s]) <= 1e-5 * abs(ref[s]), (s, got[s], ref[s])


def test_expert_parallel_trains_the_same_model(runs, tiny_moe_checkpoint, tmp_path):
    from safetensors.torch import load_file

    from train.trainer import export_checkpoint

    _assert_same_losses(losses(runs["ep2"]), losses(runs["one"]), range(1, STEPS + 1))
    ckpt = runs["ep2"] / "checkpoints" / f"step-{STEPS:07d}"
    assert (ckpt / "experts_tp00_ep01.pt").exists() and (ckpt / "optim_experts_tp00_ep01.pt").exists()
    local = torch.load(ckpt / "experts_tp00_ep01.pt", weights_only=True)
    assert local["language_model.decoder.layers.0.mlp.experts.gate_up_proj"].shape[0] == 4  # 8 experts / EP 2
    weights = {}
    for name in ("one", "ep2"):
        export_checkpoint(runs[name], tmp_path / name, dtype="float32")
        weights[name] = load_file(str(tmp_path / name / "model.safetensors"))
    init = load_file(str(tiny_moe_checkpoint / "model.safetensors"))
    (tensor, tk), (update, uk) = max_relative_differences(weights["ep2"], weights["one"], init)
    print(f"EP=2 vs 1 process: max relative difference of a tensor {tensor:.2e} ({tk}), of an update {update:.2e} ({uk})")
    # The dense weights are data-parallel over the two EP ranks, so the bounds are the dense DP=2 and TP=2
    # ones of test_parallel_layouts: fp32 gradients summed in another order differ by ~1e-5 of a weight.
    assert tensor <= 2e-5 and update <= 5e-4


def test_routing_metrics_are_logged_and_agree_across_layouts(runs):
    def metrics(run):
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x]

    one, ep2 = metrics(runs["one"]), metrics(runs["ep2"])
    for a, b in zip(one, ep2):
        assert a["moe_imbalance"] >= 1.0 and a["moe_imbalance_max"] >= a["moe_imbalance"] and a["moe_aux_loss"] > 0
        for k in ("moe_imbalance", "moe_imbalance_max", "moe_aux_loss"):
            assert abs(a[k] - b[k]) <= 1e-5 * a[k], k


def test_expert_parallel_checkpoint_resumes_on_one_process(runs, demo_shards, tiny_moe_checkpoint, tmp_path):
    run = tmp_path / "resumed"
    resume_from(runs["ep2"], 2, run)
    proc = geo3k(*from_checkpoint_args(demo_shards, tiny_moe_checkpoint, run, STEPS, "--resume"), cwd=tmp_path)
    assert "expert_parallel=2" in proc.stdout and "resumed from" in proc.stdout
    _assert_same_losses(losses(run), losses(runs["one"]), [3])


def test_per_expert_gemms_with_full_recompute_and_the_aux_loss(runs, demo_shards, tiny_moe_checkpoint, tmp_path):
    ref = losses(runs["one"])
    plain = tmp_path / "loop"
    geo3k(*from_checkpoint_args(demo_shards, tiny_moe_checkpoint, plain, 2, "--set", "train.moe_grouped_gemm=false",
                                "--set", "train.recompute=full", "--set", "train.eval_interval=0"), cwd=tmp_path)
    _assert_same_losses(losses(plain), ref, [1, 2])
    aux = tmp_path / "aux"
    geo3k(*from_checkpoint_args(demo_shards, tiny_moe_checkpoint, aux, 2, "--set", "train.moe_aux_loss=true",
                                "--set", "train.eval_interval=0"), cwd=tmp_path)
    got = losses(aux)
    assert abs(got[1] - ref[1]) <= 1e-6 * ref[1]  # the aux loss changes gradients, not the reported loss
    assert abs(got[2] - ref[2]) > 1e-7 * ref[2]


def test_fsdp_backend_trains_the_same_moe_and_resumes(runs, demo_shards, tiny_moe_checkpoint, tmp_path):
    _assert_same_losses(losses(runs["fsdp"]), losses(runs["one"]), range(1, STEPS + 1))
    run = tmp_path / "fsdp-resumed"
    resume_from(runs["fsdp"], 2, run)
    geo3k(*from_checkpoint_args(demo_shards, tiny_moe_checkpoint, run, STEPS, "--resume", "--nproc", "2", "--backend", "fsdp"),
          cwd=tmp_path, threads=1)
    assert abs(losses(run)[3] - losses(runs["fsdp"])[3]) <= 1e-6


def test_export_loads_in_transformers_with_the_megatron_logits(runs, demo_shards, tmp_path):
    from transformers import AutoModelForImageTextToText

    from shared.manifest import ShardSet
    from tests.megatron_cpu import CPU_OVERRIDES, init_megatron_cpu
    from train.data import PackingSpec, pack_samples
    from train.engine_megatron import merged_model_state
    from train.models import load_hf_config
    from train.models.convert import load_megatron_state
    from train.models.qwen_vl import build_model

    out = tmp_path / "hf"
    geo3k("export", str(runs["one"]), "--out", str(out), "--dtype", "float32", cwd=tmp_path)
    hf = AutoModelForImageTextToText.from_pretrained(str(out), dtype=torch.float32).eval()
    assert hf.config.text_config.num_experts == 8
    ss = ShardSet(demo_shards / "test")
    mb = pack_samples([next(ss.iter_samples())], PackingSpec.from_processor_identity(ss.processor))
    kwargs = {}
    if "mm_token_type_ids" in inspect.signature(hf.model.forward).parameters:
        kwargs["mm_token_type_ids"] = (mb.input_ids == hf.config.image_token_id).int()[None]
    with torch.no_grad():
        ref = hf(input_ids=mb.input_ids[None], pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw,
                 attention_mask=torch.ones_like(mb.input_ids)[None], **kwargs).logits[0]
    init_megatron_cpu()
    hf_config = load_hf_config(str(out))
    model = build_model(hf_config, **CPU_OVERRIDES)
    load_megatron_state(model, merged_model_state(runs["one"] / "checkpoints" / f"step-{STEPS:07d}", hf_config))
    with torch.no_grad():
        ours = model.eval()(mb.input_ids, mb.position_ids, mb.cu_seqlens, mb.max_seqlen, mb.pixel_values, mb.image_grid_thw)
    assert (ours - ref).abs().max().item() <= 1e-4
