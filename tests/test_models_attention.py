"""Varlen attention backends and M-RoPE, checked against dense references on CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from train.models.attention import available_backends, select_backend, varlen_attention
from train.models.rope import mrope_angles, rope_inv_freq


def _block_mask(lens: list[int], causal: bool) -> torch.Tensor:
    """[T, T] boolean mask: attend inside one segment only (and only backwards when causal)."""
    seg = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(len(seg), len(seg), dtype=torch.bool).tril()
    return mask


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("num_kv_heads", [4, 2, 1])
def test_sdpa_backend_equals_block_diagonal_attention(causal, num_kv_heads):
    torch.manual_seed(0)
    lens = [5, 0, 11, 1, 7]  # a zero-length segment, as Qwen2.5-VL's window attention produces
    T, H, D = sum(lens), 4, 8
    q, k, v = torch.randn(T, H, D), torch.randn(T, num_kv_heads, D), torch.randn(T, num_kv_heads, D)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    out = varlen_attention(q, k, v, cu, max(lens), causal=causal, backend="sdpa")

    rep = H // num_kv_heads
    kk, vv = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    ref = F.scaled_dot_product_attention(
        q.transpose(0, 1), kk.transpose(0, 1), vv.transpose(0, 1), attn_mask=_block_mask(lens, causal)
    ).transpose(0, 1)
    assert (out - ref).abs().max().item() < 1e-5


def test_backend_choice_on_cpu(monkeypatch):
    assert available_backends(torch.device("cpu"), torch.bfloat16) == ["sdpa"]
    assert select_backend(torch.device("cpu"), torch.float32) == "sdpa"
    monkeypatch.setenv("GEO3K_ATTN_BACKEND", "flash_attn")
    with pytest.raises(ValueError, match="GEO3K_ATTN_BACKEND"):
        select_backend(torch.device("cpu"), torch.float32)


def test_core_attention_module_reads_cu_seqlens():
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnMaskType

    from train.models.attention import VarlenCoreAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                            attention_dropout=0.0, hidden_dropout=0.0)
    attn = VarlenCoreAttention(cfg, layer_number=1, attn_mask_type=AttnMaskType.causal)
    lens = [3, 6]
    cu = torch.tensor([0, 3, 9], dtype=torch.int32)
    q, k, v = torch.randn(9, 1, 4, 8), torch.randn(9, 1, 2, 8), torch.randn(9, 1, 2, 8)
    packed = PackedSeqParams(qkv_format="sbhd", cu_seqlens_q=cu, cu_seqlens_kv=cu, max_seqlen_q=6, max_seqlen_kv=6)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=packed)
    assert out.shape == (9, 1, 32)
    ref = varlen_attention(q[:, 0], k[:, 0], v[:, 0], cu, max(lens), causal=True).reshape(9, 1, 32)
    assert torch.equal(out, ref)
    with pytest.raises(ValueError, match="packed_seq_params"):
        attn(q, k, v, None, attn_mask_type=AttnMaskType.causal, attention_bias=None, packed_seq_params=None)


def _hf_rotary(family: str, head_dim: int, section: list[int]):
    if family == "qwen3_vl":
        from transformers import Qwen3VLTextConfig
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding as Rotary

        cfg = Qwen3VLTextConfig(hidden_size=head_dim * 2, num_attention_heads=2, head_dim=head_dim,
                                rope_parameters=dict(rope_type="default", rope_theta=5e6, mrope_section=section,
                                                     mrope_interleaved=True))
    else:
        from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLTextConfig
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding as Rotary

        cfg = Qwen2_5_VLTextConfig(hidden_size=head_dim * 2, num_attention_heads=2,
                                   rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=section))
    return Rotary(cfg), cfg.rope_parameters["rope_theta"]


@pytest.mark.parametrize("family,section", [("qwen3_vl", [24, 20, 20]), ("qwen2_5_vl", [16, 24, 24])])
def test_mrope_angles_equal_transformers(family, section):
    """The real models' head_dim 128 and sections; positions with distinct t, h, w."""
    rotary, theta = _hf_rotary(family, 128, section)
    g = torch.Generator().manual_seed(0)
    pos = torch.randint(0, 3000, (3, 1, 50), generator=g)
    x = torch.zeros(1, 50, 128)
    cos, sin = rotary(x, pos)
    angles = mrope_angles(pos, rope_inv_freq(128, theta), section, interleaved=family == "qwen3_vl")
    assert torch.equal(angles.cos(), cos) and torch.equal(angles.sin(), sin)


@pytest.mark.parametrize("gqa", ["expand", "native"])
@pytest.mark.parametrize("num_kv_heads", [4, 2])
def test_aten_flash_glue_with_a_stand_in_kernel(monkeypatch, num_kv_heads, gqa):
    """The opt-in aten_flash backend's autograd glue (argument order, saved tensors, the GQA expand and the sum
    of its gradients back onto the kv heads), with aten's CUDA-only flash ops replaced by the exact SDPA loop."""
    from train.models import attention

    monkeypatch.setenv("GEO3K_ATEN_FLASH_GQA", gqa)

    def fake_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout, causal, debug, scale=None):
        # "expand" hands the kernel one kv head per query head; "native" leaves the grouping to the kernel
        assert (q.shape[1] == k.shape[1]) == (gqa == "expand" or num_kv_heads == q.shape[1])
        out = attention._sdpa_loop(q, k, v, cu_q, causal, scale)
        return out, torch.zeros(1), torch.zeros(2), torch.zeros(0), torch.zeros(0)

    def fake_backward(grad, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout, causal, rng, unused, scale=None):
        with torch.enable_grad():  # autograd runs backward() with grad mode off
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            return torch.autograd.grad(attention._sdpa_loop(q, k, v, cu_q, causal, scale), (q, k, v), grad)

    real_aten = torch.ops.aten

    class FakeAten:
        _flash_attention_forward = staticmethod(fake_forward)
        _flash_attention_backward = staticmethod(fake_backward)

        def __getattr__(self, name):  # every other op stays real (torch's own code reaches for some)
            return getattr(real_aten, name)

    monkeypatch.setattr(torch.ops, "aten", FakeAten())
    torch.manual_seed(1)
    lens = [6, 9, 4]
    T, H, D = sum(lens), 4, 8
    cu = torch.tensor([0, 6, 15, 19], dtype=torch.int32)
    inputs = [torch.randn(T, h, D, requires_grad=True) for h in (H, num_kv_heads, num_kv_heads)]
    grad = torch.randn(T, H, D)
    out = varlen_attention(*inputs, cu, max(lens), causal=True, backend="aten_flash")
    got = torch.autograd.grad(out, inputs, grad)
    ref_out = varlen_attention(*inputs, cu, max(lens), causal=True, backend="sdpa")
    ref = torch.autograd.grad(ref_out, inputs, grad)
    torch.testing.assert_close(out, ref_out)
    for a, b in zip(got, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
