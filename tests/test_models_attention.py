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


def test_backend_choice_on_cpu():
    from shared.config import ATTENTION_BACKENDS, ConfigError
    from train.models.attention import BACKENDS, set_backend

    assert available_backends(torch.device("cpu"), torch.bfloat16) == ["sdpa"]
    assert select_backend(torch.device("cpu"), torch.float32) == "sdpa"
    assert ATTENTION_BACKENDS == ("auto", *BACKENDS)  # what train.attention_backend accepts
    try:
        set_backend("sdpa", torch.device("cpu"), torch.float32)
        assert select_backend(torch.device("cpu"), torch.float32) == "sdpa"
        with pytest.raises(ConfigError, match="train.attention_backend: flash_attn cannot run float32 tensors on cpu"):
            set_backend("flash_attn", torch.device("cpu"), torch.float32)
        assert select_backend(torch.device("cpu"), torch.float32) == "sdpa"  # the refused choice left no trace
        with pytest.raises(ConfigError, match="unknown"):
            set_backend("cudnn")  # removed: aten's cuDNN varlen op gave wrong output on torch 2.11
        set_backend("flash_attn")  # no device given: refused at the call instead
        with pytest.raises(ConfigError, match="train.attention_backend: flash_attn cannot run"):
            select_backend(torch.device("cpu"), torch.float32)
    finally:
        set_backend("auto")
    assert select_backend(torch.device("cpu"), torch.float32) == "sdpa"


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


def _expand_kv(t, heads):
    """kv heads [T, Hkv, D] -> [T, heads, D]: query head h reads kv head h // (heads / Hkv), as the kernels map them."""
    return t.repeat_interleave(heads // t.shape[1], dim=1)


def _packed_scores(q, k, cu, causal, scale):
    """Attention scores [Hq, T, T] over the whole packed sequence, -inf across segment boundaries (and the future)."""
    s = torch.einsum("thd,shd->hts", q, _expand_kv(k, q.shape[1])) * scale
    return s.masked_fill(~_block_mask((cu[1:] - cu[:-1]).tolist(), causal), float("-inf"))


def _reference_backward(g, q, k, v, out, lse, cu, causal, scale):
    """Attention's gradients from the forward's log-sum-exp lse [Hq, T], as the flash kernels compute them."""
    p = (_packed_scores(q, k, cu, causal, scale).float() - lse[..., None]).exp().to(q.dtype)
    ve = _expand_kv(v, q.shape[1])
    ds = p * (torch.einsum("thd,shd->hts", g, ve) - (g * out).sum(-1).transpose(0, 1)[..., None])
    dk = torch.einsum("hts,thd->shd", ds, q) * scale
    dv = torch.einsum("hts,thd->shd", p, g)
    rep = q.shape[1] // k.shape[1]
    group = lambda t: t.view(t.shape[0], k.shape[1], rep, t.shape[2]).sum(2)  # noqa: E731
    return torch.einsum("hts,shd->thd", ds, _expand_kv(k, q.shape[1])) * scale, group(dk), group(dv)


def _attend(q, k, v, cu, max_len, causal, backend):
    return varlen_attention(q, k, v, cu, max_len, causal=causal, softmax_scale=0.3, backend=backend)


def _assert_equals_sdpa(backend, run, cases):
    """`run(q, k, v, cu, longest, causal, backend)` (`_attend`, or it compiled) under `backend` against the exact
    per-segment backend, output and gradients, over `cases` of (segment lengths, causal, kv heads) with 4 query
    heads of 8 and q, k, v as views of one tensor, as Megatron's."""
    for lens, causal, kv_heads in cases:
        torch.manual_seed(len(lens))
        T, H, D = sum(lens), 4, 8
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
        qkv = torch.randn(T, H + 2 * kv_heads, D, requires_grad=True)
        results = []
        for name, fn in (("sdpa", _attend), (backend, run)):
            q, k, v = qkv.split([H, kv_heads, kv_heads], dim=1)
            out = fn(q, k, v, cu, max(lens), causal, name)
            (grad,) = torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), qkv)
            results.append((out, grad))
        (ref, ref_grad), (got, got_grad) = results
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got_grad, ref_grad, rtol=1e-4, atol=1e-5)


def _fa4_standin(monkeypatch):
    """FlashAttention-4's varlen pair, with its calling convention (q [T, Hq, D], k/v [T, Hkv, D], the log-sum-exp
    [Hq, T] fp32), computed over the whole packed sequence with a block mask on CPU."""
    from train.models import attention

    def forward(q, k, v, cu, max_seqlen, causal, scale):
        assert q.is_contiguous() and k.is_contiguous() and v.is_contiguous()
        assert max_seqlen == int((cu[1:] - cu[:-1]).max()), "the kernels get the longest segment"
        s = _packed_scores(q, k, cu, causal, scale).float()
        lse = s.logsumexp(-1)
        p = (s - lse[..., None]).exp().to(q.dtype)
        return torch.einsum("hts,shd->thd", p, _expand_kv(v, q.shape[1])), lse

    def backward(g, q, k, v, out, lse, cu, max_seqlen, causal, scale):
        assert lse.shape == (q.shape[1], q.shape[0]) and lse.dtype == torch.float32
        return _reference_backward(g, q, k, v, out, lse, cu, causal, scale)

    monkeypatch.setitem(attention._FA4_KERNELS, "forward", forward)
    monkeypatch.setitem(attention._FA4_KERNELS, "backward", backward)


@pytest.mark.parametrize("compiled", [False, True])
def test_fa4_backend_wiring_equals_sdpa(monkeypatch, compiled):
    """The FlashAttention-4 backend's custom ops (autograd, the log-sum-exp between forward and backward, grouped kv
    heads passed through, non-contiguous inputs, a compiled caller with dynamic lengths) around a stand-in kernel,
    against the exact per-segment backend. The kernels run on Hopper and Blackwell GPUs only:
    bench/gpu_attention.py checks them against FlashAttention-2 there."""
    _fa4_standin(monkeypatch)
    torch._dynamo.reset()
    run = torch.compile(_attend, dynamic=True, fullgraph=True) if compiled else _attend
    _assert_equals_sdpa("fa4", run, [([5, 11, 1, 7], True, 2), ([9, 3], False, 4), ([4, 6, 8], True, 1)])
    torch._dynamo.reset()


def test_fa4_is_not_offered_where_it_cannot_run():
    """Not installed (as here) or not a Hopper/Blackwell GPU: auto never picks fa4, and naming it is refused."""
    from shared.config import ConfigError
    from train.models.attention import set_backend

    assert "fa4" not in available_backends(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="train.attention_backend: fa4 cannot run bfloat16 tensors on cpu"):
        set_backend("fa4", torch.device("cpu"), torch.bfloat16)


def test_aten_flash_backend_calls_the_op_as_flash_attention_expects(monkeypatch):
    """The aten_flash backend hands aten's FlashAttention-2 op the packed layout (the same cu_seqlens for queries and
    keys, the longest segment, no dropout, the scale, grouped kv heads as they are) and returns its output; autograd
    goes through the op's own formula. Here a differentiable stand-in of the op's signature computes it with a block
    mask, against the exact per-segment backend: the op runs on CUDA only, where the benchmark's losses check it."""
    from train.models import attention

    def op(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, return_debug_mask, *, scale):
        assert cu_q is cu_k and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        assert dropout_p == 0.0 and not return_debug_mask and scale == 0.3
        s = _packed_scores(q, k, cu_q, is_causal, scale)
        out = torch.einsum("hts,shd->thd", s.softmax(-1), _expand_kv(v, q.shape[1]))
        return out, s.logsumexp(-1), torch.zeros(()), torch.zeros(()), torch.empty(0)

    monkeypatch.setitem(attention._ATEN_FLASH, "forward", op)
    _assert_equals_sdpa("aten_flash", _attend, [([5, 11, 1, 7], True, 2), ([9, 3], False, 4), ([4, 6, 8], True, 1)])
    assert "aten_flash" not in available_backends(torch.device("cpu"), torch.bfloat16)


def _cudnn_standin(monkeypatch):
    """cuDNN's varlen pair with the backend's calling convention: the log-sum-exp in the padded [B, Hq, S, 1] fp32
    layout of the bucketed segment count and length, read back through the segment lengths and offsets the graphs
    get (cudnn_attention.segment_metadata); computed with a block mask on CPU."""
    from train.models import cudnn_attention as ca

    def segments(cu, max_seqlen, stats_shape=None):
        B, S = ca.padded_segments(cu.numel() - 1), ca.padded_length(max_seqlen)
        assert stats_shape is None or tuple(stats_shape) == (B, stats_shape[1], S, 1)
        lengths, offsets = ca.segment_metadata(cu, B, (1,))
        starts = offsets[1].flatten()
        assert (lengths.flatten()[cu.numel() - 1:] == 0).all() and (starts[cu.numel() - 1:] == cu[-1]).all()
        return B, S, [(int(a), int(n)) for a, n in zip(starts[:-1], lengths.flatten())]

    def forward(q, k, v, cu, max_seqlen, causal, scale):
        assert max_seqlen == int((cu[1:] - cu[:-1]).max()), "the kernels get the longest segment"
        B, S, spans = segments(cu, max_seqlen)
        s = _packed_scores(q, k, cu, causal, scale).float()
        lse = s.logsumexp(-1)
        stats = torch.full((B, q.shape[1], S, 1), float("nan"))  # rows past a segment's length: never read
        for b, (start, n) in enumerate(spans):
            stats[b, :, :n, 0] = lse[:, start:start + n]
        p = (s - lse[..., None]).exp().to(q.dtype)
        return torch.einsum("hts,shd->thd", p, _expand_kv(v, q.shape[1])), stats

    def backward(g, q, k, v, out, stats, cu, max_seqlen, causal, scale):
        assert stats.dtype == torch.float32
        _, _, spans = segments(cu, max_seqlen, stats.shape)
        lse = torch.cat([stats[b, :, :n, 0] for b, (_, n) in enumerate(spans)], dim=1)
        return _reference_backward(g, q, k, v, out, lse, cu, causal, scale)

    monkeypatch.setitem(ca._KERNELS, "forward", forward)
    monkeypatch.setitem(ca._KERNELS, "backward", backward)


@pytest.mark.parametrize("compiled", [False, True])
def test_cudnn_frontend_backend_wiring_equals_sdpa(monkeypatch, compiled):
    """The cudnn_frontend backend's custom ops (autograd, the padded log-sum-exp between forward and backward with
    the fake functions' bucketed shapes, grouped kv heads, q/k/v as views of one tensor, a compiled caller with
    dynamic lengths) around a stand-in kernel, against the exact per-segment backend. cuDNN's graphs run on GPUs
    only: bench/gpu_attention.py checks them against an fp32 reference there."""
    _cudnn_standin(monkeypatch)
    torch._dynamo.reset()
    run = torch.compile(_attend, dynamic=True, fullgraph=True) if compiled else _attend
    _assert_equals_sdpa("cudnn_frontend", run,
                        [([5, 11, 1, 7], True, 2), ([9, 3], False, 4), ([4, 6, 8, 2, 3, 1, 5, 2, 9], True, 1)])
    torch._dynamo.reset()


def test_cudnn_segment_metadata_and_buckets():
    """Segments described to cuDNN: int32 lengths and int64 element offsets per token stride, empty segments at the
    end up to the bucketed count; the buckets round up and never down; the cache returns one tensor's metadata
    again and recomputes it once the tensor changes in place."""
    from train.models import cudnn_attention as ca

    assert [ca.padded_segments(n) for n in (1, 8, 9)] == [8, 8, 16]
    assert [ca.padded_length(s) for s in (1, 256, 257)] == [256, 256, 512]
    assert [ca.padded_total(t) for t in (1, 2048, 2049)] == [2048, 2048, 4096]
    cu = torch.tensor([0, 3, 3, 10], dtype=torch.int32)
    lengths, offsets = ca.segment_metadata(cu, 5, (48, 16, 48))
    assert lengths.dtype == torch.int32 and lengths.shape == (5, 1, 1, 1)
    assert lengths.flatten().tolist() == [3, 0, 7, 0, 0]
    assert sorted(offsets) == [16, 48] and offsets[16].dtype == torch.int64 and offsets[16].shape == (6, 1, 1, 1)
    assert offsets[48].flatten().tolist() == [0, 144, 144, 480, 480, 480]

    cache = ca._MetadataCache(size=2)
    first = cache.get(cu, 8, (16,))
    assert cache.get(cu, 8, (16,)) is first  # the 24 blocks of a micro-batch compute it once
    cu[2] = 4  # changed in place: the version counter moved
    assert cache.get(cu, 8, (16,))[0].flatten().tolist()[:3] == [3, 1, 6]
    for n in range(3):  # bounded: the oldest entries go
        cache.get(torch.tensor([0, n + 1], dtype=torch.int32), 8, (16,))
    assert len(cache.entries) == 2
    with torch.inference_mode():
        frozen = torch.tensor([0, 2, 5], dtype=torch.int32)
    assert cache.get(frozen, 8, (1,))[0].flatten().tolist()[:3] == [2, 3, 0]  # no version counter: not cached


def test_cudnn_frontend_is_not_offered_where_it_cannot_run():
    """Not installed (as here) or not a Hopper-or-newer GPU: auto never picks cudnn_frontend, naming it is refused."""
    from shared.config import ConfigError
    from train.models.attention import set_backend

    assert "cudnn_frontend" not in available_backends(torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="train.attention_backend: cudnn_frontend cannot run bfloat16 tensors on cpu"):
        set_backend("cudnn_frontend", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ConfigError, match="train.vision_attention_backend: cudnn_frontend cannot run"):
        set_backend("auto", torch.device("cpu"), torch.bfloat16, vision="cudnn_frontend")


def test_vision_backend_takes_the_non_causal_calls(monkeypatch):
    """train.vision_attention_backend: the non-causal (vision tower's) calls go to its backend, the causal ones keep
    train.attention_backend's; "same" follows train.attention_backend, "auto" picks the fastest for vision alone."""
    from shared.config import ConfigError
    from train.models import attention

    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: ["aten_flash", "cudnn_frontend", "sdpa"])
    cuda, bf16 = torch.device("cuda"), torch.bfloat16
    try:
        attention.set_backend("auto", cuda, bf16, vision="cudnn_frontend")
        assert (attention.select_backend(cuda, bf16, causal=True), attention.select_backend(cuda, bf16, causal=False)) \
            == ("aten_flash", "cudnn_frontend")
        attention.set_backend("sdpa", cuda, bf16)  # vision: same
        assert attention.select_backend(cuda, bf16, causal=False) == "sdpa"
        attention.set_backend("sdpa", cuda, bf16, vision="auto")
        assert (attention.select_backend(cuda, bf16, causal=True), attention.select_backend(cuda, bf16, causal=False)) \
            == ("sdpa", "aten_flash")
        with pytest.raises(ConfigError, match="train.vision_attention_backend: 'cudnn' is unknown; write same, auto"):
            attention.set_backend("auto", vision="cudnn")
    finally:
        attention.set_backend("auto")
    assert attention.select_backend(cuda, bf16, causal=False) == "aten_flash"
