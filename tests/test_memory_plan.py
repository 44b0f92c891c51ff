"""The memory plan (train/memory_plan.py): exact parameter counts, how layouts divide them, `geo3k train --plan`,
and the up-front refusal of a run that cannot fit. (Its agreement with measured GPU peaks is in BENCHMARKS.md.)"""

from __future__ import annotations

import pytest

from shared.config import TrainConfig
from tests.conftest import REPO, geo3k
from train.memory_plan import count_parameters, plan
from train.models import load_hf_config


def test_counts_are_exact_and_sorted_by_role():
    from transformers import AutoModelForImageTextToText

    cfg = load_hf_config("tiny-qwen3-vl-moe")
    c = count_parameters(cfg)
    model = AutoModelForImageTextToText.from_config(cfg)
    assert c.total == sum(p.numel() for p in model.parameters())
    assert c.experts == sum(p.numel() for n, p in model.named_parameters() if ".experts." in n) > 0
    assert c.vision == sum(p.numel() for n, p in model.named_parameters() if ".visual." in n) > 0
    assert c.vocab == 2 * 151936 * 64  # embedding + untied LM head


def test_layouts_divide_what_they_split():
    cfg = load_hf_config("qwen3-vl-30b-a3b")
    one = plan(cfg, TrainConfig(), 8)
    ep8 = plan(cfg, TrainConfig(expert_parallel=8), 8)
    c = count_parameters(cfg)
    # bf16 weights: EP=8 keeps 1/8 of the experts on each GPU
    assert one.weights - ep8.weights == pytest.approx(2 * c.experts * (1 - 1 / 8))
    tp = plan(load_hf_config("qwen3-vl-8b"), TrainConfig(tensor_parallel=4, sequence_parallel=True), 8)
    dp = plan(load_hf_config("qwen3-vl-8b"), TrainConfig(), 8)
    assert tp.weights < dp.weights / 2 and tp.activations < dp.activations
    full = plan(load_hf_config("qwen3-vl-8b"), TrainConfig(recompute="full"), 8)
    assert full.activations < 0.7 * dp.activations  # the language model's; the vision tower keeps its own


def test_fsdp_on_one_gpu_counts_the_gathered_model():
    # one process keeps a bf16 copy of the whole model through the step (one FSDP group) beside the fp32 master,
    # and a micro-batch's bf16 gradients beside the fp32 sums; several processes gather a layer or two at a time
    cfg = load_hf_config("qwen3-vl-2b")
    c = count_parameters(cfg)
    one, two = plan(cfg, TrainConfig(backend="fsdp"), 1), plan(cfg, TrainConfig(backend="fsdp"), 2)
    assert one.weights == one.grads == 6 * c.total
    assert two.weights == pytest.approx(2 * c.total + 2 * (2 * c.largest_block + c.root)) and two.grads == 2 * c.total
    assert not any("eval gathers" in n for n in one.notes) and any("eval gathers" in n for n in two.notes)


def test_plan_cli_and_refusal(tmp_path):
    base = ["train", "--plan", "--set", "model.name_or_path=qwen3-vl-30b-a3b"]
    one = geo3k(*base, cwd=tmp_path).stdout
    assert "does NOT fit" in one and "Megatron, 1 GPU(s)" in one
    ep8 = geo3k(*base, "--nproc", "8", "--set", "train.expert_parallel=8", cwd=tmp_path).stdout
    assert "TP 1, EP 8, DP 8" in ep8 and "fits" in ep8 and "NOT" not in ep8

    from train.trainer import TrainError, check_memory
    from shared.config import load_config

    cfg = load_config(REPO / "pipeline.yaml", ["model.name_or_path=qwen3-vl-30b-a3b"])
    lines = []
    with pytest.raises(TrainError, match="train.expert_parallel"):
        check_memory(cfg, load_hf_config("qwen3-vl-30b-a3b"), 1, 143_771 * 2**20, lines.append)
    assert any("total" in x for x in lines)
