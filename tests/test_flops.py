"""train/flops.py: the one FLOP model (LM head where it runs, active experts only) and the datasheet peaks."""

from types import SimpleNamespace

import pytest
import torch

from train.flops import DATASHEET_BF16_TFLOPS, Peaks, StepFlops, datasheet_peak_tflops
from train.models import load_hf_config


def _mb(lengths, loss_tokens, grid=None):
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return SimpleNamespace(cu_seqlens=cu, image_grid_thw=grid, num_real_tokens=sum(lengths), num_tokens=sum(lengths),
                           num_loss_tokens=loss_tokens)


def test_lm_head_counts_the_loss_tokens_only():
    cfg = load_hf_config("qwen3-vl-2b")
    f = StepFlops.from_hf_config(cfg)
    t = cfg.text_config
    assert f.head_params == t.hidden_size * t.vocab_size
    mbs = [_mb([300, 500], 14, torch.tensor([[1, 20, 14], [1, 16, 16]])), _mb([1000], 7)]
    every = StepFlops.from_hf_config(cfg, head_on_every_token=True)
    # the same step with the head on every token costs 6·hidden·vocab more per token that is not a loss token
    assert every.step(mbs) - f.step(mbs) == pytest.approx(6 * f.head_params * (1800 - 21))
    assert f.step(mbs) == pytest.approx(f.micro_batch(mbs[0].cu_seqlens, mbs[0].image_grid_thw, 800, 14) + f.micro_batch(mbs[1].cu_seqlens, None, 1000, 7))
    # one more loss token is one more head position; nothing else moves
    assert f.step([_mb([1000], 8)]) - f.step([_mb([1000], 7)]) == pytest.approx(6 * f.head_params)


def test_moe_counts_the_router_and_the_active_experts_only():
    cfg = load_hf_config("tiny-qwen3-vl-moe")
    t = cfg.text_config
    h, layers = t.hidden_size, t.num_hidden_layers
    dense_layers = set(t.mlp_only_layers)
    attn = 2 * h * t.num_attention_heads * t.head_dim + 2 * h * t.num_key_value_heads * t.head_dim
    moe = 3 * h * t.moe_intermediate_size * t.num_experts_per_tok + h * t.num_experts
    dense = 3 * h * t.intermediate_size
    expected = layers * attn + sum(dense if i in dense_layers else moe for i in range(layers))
    assert StepFlops.from_hf_config(cfg).lm_params == expected
    # more experts of which the same top-k run: only the router grows
    base = StepFlops.from_hf_config(cfg).lm_params
    t.num_experts *= 4
    assert StepFlops.from_hf_config(cfg).lm_params - base == (layers - len(dense_layers)) * h * 3 * (t.num_experts // 4)
    t.num_experts_per_tok += 1  # one more active expert per token: one more expert FFN per MoE layer
    t.num_experts //= 4
    assert StepFlops.from_hf_config(cfg).lm_params - base == (layers - len(dense_layers)) * 3 * h * t.moe_intermediate_size


def test_the_30b_a3b_preset_counts_about_3b_active_parameters():
    f = StepFlops.from_hf_config(load_hf_config("qwen3-vl-30b-a3b"))
    assert 2.5e9 < f.lm_params < 3.5e9  # "A3B": ~3B active per token (of ~30B), embeddings and head apart


@pytest.mark.parametrize("name, tflops", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100", 989.4), ("NVIDIA H200", 989.4), ("NVIDIA H100 PCIe", 756.0),
    ("NVIDIA H100 NVL", 835.0), ("NVIDIA H200 NVL", 835.0), ("NVIDIA GH200 480GB", 989.4), ("NVIDIA H20", 148.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA A100-PCIE-40GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0),
])
def test_datasheet_peak_by_card_name(name, tflops):
    assert datasheet_peak_tflops(name) == tflops


def test_an_unknown_card_gets_no_mfu_and_says_so():
    assert datasheet_peak_tflops("NVIDIA GeForce RTX 3090") is None
    peaks = Peaks("NVIDIA GeForce RTX 3090", None, 71.0)
    assert peaks.mfu(35.5) == {"mfu": None, "mfu_measured_peak": pytest.approx(0.5)}
    assert "not in train/flops.py DATASHEET_BF16_TFLOPS" in peaks.describe() and "RTX 3090" in peaks.describe()
    known = Peaks("NVIDIA H200", DATASHEET_BF16_TFLOPS["H200"], 775.0)
    assert known.mfu(494.7) == {"mfu": pytest.approx(0.5), "mfu_measured_peak": pytest.approx(494.7 / 775)}
    assert "989.4 TFLOP/s" in known.describe()
    assert Peaks.of(torch.device("cpu")).mfu(1.0) == {"mfu": None, "mfu_measured_peak": None}
