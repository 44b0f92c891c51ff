"""The compiled norm/RoPE of train/models/fused.py compute what the eager reference computes.

On GPUs the training path runs these functions through torch.compile (Inductor emits Triton kernels). Here
they are compiled for the CPU (Inductor emits C++), which checks the part that can break on a new PyTorch
or a changed function: the trace with fullgraph=True and dynamic shapes, and the generated backward. Two
lengths run through the same compiled function, as packed micro-batches do.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from train.models import fused

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="torch.compile on CPU needs a C compiler")


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(t.is_floating_point()) for t in inputs]
    out = fn(*inputs)
    g = torch.linspace(-1, 1, out.numel()).reshape(out.shape).to(out.dtype)
    (out.float() * g.float()).sum().backward()
    return out.detach(), [t.grad for t in inputs if t.requires_grad]


@pytest.mark.parametrize("tokens", [37, 64])
def test_compiled_rms_norm_matches_reference(tokens):
    torch.manual_seed(tokens)
    x = torch.randn(tokens, 1, 96) * 3
    w = torch.rand(96) + 0.5
    eps = 1e-6
    compiled = fused._compiled(fused.rms_norm_reference)
    # float32: the same arithmetic, so only reduction order differs
    ref, ref_g = _grads(lambda a, b: fused.rms_norm_reference(a, b, eps), x, w)
    out, out_g = _grads(lambda a, b: compiled(a, b, eps), x, w)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for a, b in zip(out_g, ref_g):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    # bf16: one rounding instead of two may move a value by one ulp (2**-8 relative), never more
    xb, wb = x.bfloat16(), w.bfloat16()
    diff = (compiled(xb, wb, eps).float() - fused.rms_norm_reference(xb, wb, eps).float()).abs()
    assert float((diff / fused.rms_norm_reference(xb, wb, eps).float().abs().clamp_min(1e-3)).max()) <= 2**-7


@pytest.mark.parametrize("tokens", [29, 50])
def test_compiled_rope_matches_reference(tokens):
    torch.manual_seed(tokens)
    q = torch.randn(tokens, 4, 16)
    angles = torch.rand(tokens, 1, 8) * 6
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    compiled = fused._compiled(fused.rope_reference)
    ref, (ref_g,) = _grads(lambda t: fused.rope_reference(t, cos, sin), q)
    out, (out_g,) = _grads(lambda t: compiled(t, cos, sin), q)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out_g, ref_g, rtol=1e-6, atol=1e-6)
    # the rotation keeps each pair's norm: a check that does not lean on the reference
    half = q.shape[-1] // 2
    pair_norm = lambda t: t[..., :half] ** 2 + t[..., half:] ** 2  # noqa: E731
    torch.testing.assert_close(pair_norm(out), pair_norm(q), rtol=1e-5, atol=1e-5)


def test_eager_on_cpu_and_when_disabled():
    x = torch.randn(5, 8, dtype=torch.bfloat16)
    assert not fused._use_compiled(x)  # CPU tensors never take the compiled path
    try:
        fused.set_enabled(False)
        assert not fused._enabled
    finally:
        fused.set_enabled(True)
    assert torch.equal(fused.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6),
                       fused.rms_norm_reference(x, torch.ones(8, dtype=torch.bfloat16), 1e-6))


def test_megatron_fused_swiglu_model_matches_transformers(tmp_path):
    """bias_activation_fusion=True (what the GPU engine sets) builds Megatron's compiled SwiGLU; the model
    still computes transformers' logits."""
    from tests import models_fixtures as fx
    from tests.megatron_cpu import CPU_OVERRIDES, init_megatron_cpu
    from train.models import convert
    from train.models.qwen_vl import build_model

    init_megatron_cpu()
    torch.manual_seed(0)
    cfg, hf = fx.random_hf_model("qwen3_vl", seed=1, save_to=tmp_path)
    model = build_model(cfg, **dict(CPU_OVERRIDES, bias_activation_fusion=True)).eval()
    convert.load_hf_checkpoint(model, str(tmp_path))
    sample = fx.make_sample(10, [(1, 4, 6)])
    pos = fx.rope_positions(hf, sample)
    ref = fx.hf_logits(hf, sample, pos)
    with torch.no_grad():
        out = model(**fx.pack([sample], [pos]))
    assert float((out - ref).abs().max()) <= 1e-4


def test_new_packed_lengths_reuse_the_compiled_kernels(monkeypatch):
    """Each packed micro-batch has a new length; the compiled path must not build a graph per length (past
    torch's recompile limit a fullgraph function fails: that stopped the first H200 run of the dynamic=True
    version within three steps). After the first micro-batch, no new graph."""
    import warnings

    from torch._dynamo.utils import counters

    from tests import models_fixtures as fx
    from tests.megatron_cpu import CPU_OVERRIDES, init_megatron_cpu
    from train.models.qwen_vl import build_model

    monkeypatch.setattr(fused, "_use_compiled", lambda t: t.dtype == torch.bfloat16)  # the GPU path, on CPU
    init_megatron_cpu()
    torch.manual_seed(0)
    cfg = fx.tiny_config("qwen3_vl")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = fx.hf_model_class("qwen3_vl")(cfg).eval()  # before build_model: only for the M-RoPE positions
    model = build_model(cfg, **dict(CPU_OVERRIDES, perform_initialization=True, bf16=True, params_dtype=torch.bfloat16))
    samples = [fx.make_sample(i, [(1, 4, 6)] if i % 2 else [(1, 8, 8)], num_text=(5 + i, 3 + i)) for i in range(4)]
    graphs = []
    for n in range(1, 5):
        batch = fx.pack(samples[:n], [fx.rope_positions(hf, s) for s in samples[:n]])
        batch["pixel_values"] = batch["pixel_values"].to(torch.bfloat16)
        labels = torch.roll(batch["input_ids"], -1)
        labels[-1] = -100
        loss = model(**batch, labels=labels)
        assert torch.isfinite(loss).all()
        loss.sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] > 0 and graphs[-1] == graphs[0], f"graphs compiled after each micro-batch: {graphs}"
