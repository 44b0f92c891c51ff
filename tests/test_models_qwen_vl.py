"""Megatron-Core Qwen-VL models vs transformers, on CPU in float32 with tiny configs.

Each family's transformers model gets random weights (norms included), is saved with
`save_pretrained`, imported through train.models.convert, and both run on the same inputs with images.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from tests import models_fixtures as fx
from tests.megatron_cpu import CPU_OVERRIDES, init_megatron_cpu

FAMILIES = ["qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe"]
TOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(family, transformers model, Megatron model, checkpoint dir)."""
    from train.models import convert
    from train.models.qwen_vl import build_model

    init_megatron_cpu()
    family = request.param
    torch.manual_seed(0)
    ckpt = tmp_path_factory.mktemp(family)
    cfg, hf = fx.random_hf_model(family, seed=1, save_to=ckpt)
    model = build_model(cfg, **CPU_OVERRIDES).eval()
    convert.load_hf_checkpoint(model, str(ckpt))
    return family, hf, model, ckpt


def _samples():
    return [
        fx.make_sample(10, [(1, 4, 6), (1, 6, 4)]),  # two images
        fx.make_sample(11, [(1, 8, 8)], num_text=(9, 12)),
        fx.make_sample(12, [], num_text=(15, 0)),  # text only
    ]


def test_logits_match_transformers(pair):
    family, hf, model, _ = pair
    sample = _samples()[0]
    pos = fx.rope_positions(hf, sample)
    ref = fx.hf_logits(hf, sample, pos)
    batch = fx.pack([sample], [pos])
    with torch.no_grad():
        out = model(**batch)
    diff = (out - ref).abs().max().item()
    print(f"{family}: max |logit diff| = {diff:.3e} (logit scale {ref.abs().max().item():.2f})")
    assert out.shape == ref.shape
    assert diff <= TOL


def test_packed_equals_each_sample_alone(pair):
    """Three samples + a padding tail in one packed sequence: per-sample logits equal transformers'
    logits of each sample run alone (boundaries, restarted positions, image order)."""
    family, hf, model, _ = pair
    samples = _samples()
    positions = [fx.rope_positions(hf, s) for s in samples]
    batch = fx.pack(samples, positions, pad_to=sum(len(s.input_ids) for s in samples) + 7)
    with torch.no_grad():
        out = model(**batch)
    cu = batch["cu_seqlens"].tolist()
    worst = 0.0
    for i, (s, p) in enumerate(zip(samples, positions)):
        ref = fx.hf_logits(hf, s, p)
        worst = max(worst, (out[cu[i]:cu[i + 1]] - ref).abs().max().item())
    print(f"{family}: packed vs alone, max |logit diff| = {worst:.3e}")
    assert worst <= TOL


def test_loss_matches_cross_entropy_and_images_reach_it(pair):
    family, hf, model, _ = pair
    samples = _samples()[:2]
    positions = [fx.rope_positions(hf, s) for s in samples]
    batch = fx.pack(samples, positions)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[ids == fx.IMAGE_TOKEN] = -100
    labels[batch["cu_seqlens"][1:].long() - 1] = -100  # no target across a sample boundary
    with torch.no_grad():
        loss = model(**batch, labels=labels)
        logits = model(**batch)
    assert loss.dtype == torch.float32 and loss.shape == ids.shape
    assert torch.all(loss[labels == -100] == 0)
    ref = torch.nn.functional.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="none")
    assert (loss - ref).abs().max().item() <= TOL

    changed = dict(batch, pixel_values=batch["pixel_values"] + 0.5 * torch.randn_like(batch["pixel_values"]))
    with torch.no_grad():
        loss2 = model(**changed, labels=labels)
    assert (loss2.sum() - loss.sum()).abs().item() > 1e-3, "pixel values do not reach the loss"

    # and gradients reach the vision tower's first layer
    model.zero_grad(set_to_none=True)
    model(**batch, labels=labels).sum().backward()
    grad = model.vision.model.patch_embed.proj.weight.grad
    assert grad is not None and grad.abs().sum() > 0
    model.zero_grad(set_to_none=True)


def test_export_roundtrip_bit_exact(pair, tmp_path):
    """HF -> Megatron -> HF: every tensor equal bit for bit; transformers loads the export and gives
    the same logits."""
    from train.models import convert

    family, hf, model, ckpt = pair
    original = convert.read_safetensors_dir(ckpt)
    out_dir = convert.export_hf(convert.megatron_state(model), hf.config, tmp_path / "export")
    exported = convert.read_safetensors_dir(out_dir)
    assert sorted(exported) == sorted(original)
    for key, tensor in original.items():
        assert exported[key].dtype == tensor.dtype and torch.equal(exported[key], tensor), key

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = fx.hf_model_class(family).from_pretrained(out_dir, dtype=torch.float32).eval()
    sample = _samples()[1]
    pos = fx.rope_positions(hf, sample)
    # Same weights; the kernels may differ with thread count or the attention path chosen at load.
    diff = (fx.hf_logits(reloaded, sample, pos) - fx.hf_logits(hf, sample, pos)).abs().max().item()
    assert diff <= 1e-5
