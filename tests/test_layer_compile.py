"""Whole-layer torch.compile (train/models/layer_compile.py) against the eager model, on CPU in float32.

On GPUs the attention is torch's `varlen_attn`, an opaque custom op to the compiler. CPUs have no such
kernel and our exact CPU fallback loops over segments in Python (`.tolist()`: a graph break), so here a
stand-in custom op with varlen_attn's calling convention (torch 2.10/2.11's: `window_size` for causal, no
`enable_gqa`) takes its place as the `torch_varlen` backend. What is checked is the rest: that Megatron's
decoder layers and transformers' vision blocks trace whole (no graph break), that all layers of a kind share
one graph, and that the compiled forward and backward equal the eager ones over micro-batches of different
lengths and sample counts.
"""

from __future__ import annotations

import pytest
import torch

from tests import models_fixtures as fx
from tests.megatron_cpu import CPU_OVERRIDES, init_megatron_cpu
from train.models import attention


@torch.library.custom_op("geo3k_test::varlen_attn", mutates_args=())
def _standin_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, causal: bool, scale: float) -> torch.Tensor:
    return attention._sdpa_loop(q, k, v, cu, causal, scale)


@_standin_fwd.register_fake
def _(q, k, v, cu, causal, scale):
    return torch.empty_like(q)


@torch.library.custom_op("geo3k_test::varlen_attn_backward", mutates_args=())
def _standin_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, causal: bool,
                 scale: float) -> list[torch.Tensor]:
    """Attention's backward per segment, written out (no autograd inside a custom op): heads match (the caller
    expands grouped kv heads, as on torch 2.10/2.11)."""
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    bounds = cu.tolist()
    for start, end in zip(bounds[:-1], bounds[1:]):
        qs, ks, vs, gs = (t[start:end].transpose(0, 1) for t in (q, k, v, g))  # [heads, n, dim]
        s = qs @ ks.transpose(1, 2) * scale
        if causal:
            s = s.masked_fill(torch.ones(end - start, end - start, dtype=torch.bool).triu(1), float("-inf"))
        p = s.softmax(-1)
        dp = gs @ vs.transpose(1, 2)
        ds = p * (dp - (dp * p).sum(-1, keepdim=True))
        dq[start:end] = (ds @ ks * scale).transpose(0, 1)
        dk[start:end] = (ds.transpose(1, 2) @ qs * scale).transpose(0, 1)
        dv[start:end] = (p.transpose(1, 2) @ gs).transpose(0, 1)
    return [dq, dk, dv]


@_standin_bwd.register_fake
def _(g, q, k, v, cu, causal, scale):
    return [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.causal, ctx.scale = inputs[4], inputs[5]


def _backward(ctx, g):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = _standin_bwd(g, q, k, v, cu, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None


_standin_fwd.register_autograd(_backward, setup_context=_setup)


def varlen_attn_standin(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (the parts this code uses)."""
    assert query.shape[1] == key.shape[1], "torch 2.11's varlen_attn needs as many kv heads as query heads"
    causal = tuple(window_size) == (-1, 0)
    return _standin_fwd(query, key, value, cu_seq_q, causal, float(scale if scale is not None else query.shape[-1] ** -0.5))


@pytest.fixture
def standin_varlen(monkeypatch):
    import inspect

    monkeypatch.setattr(attention, "_TORCH_VARLEN", (varlen_attn_standin, frozenset(inspect.signature(varlen_attn_standin).parameters)))
    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: ["torch_varlen", "sdpa"])
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _batch(hf, seed, grids):
    samples = [fx.make_sample(seed + i, [g]) for i, g in enumerate(grids)]
    batch = fx.pack(samples, [fx.rope_positions(hf, s) for s in samples])
    labels = batch["input_ids"].roll(-1).clone()
    labels[::3] = -100
    batch["labels"] = labels
    return batch


def _step(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).sum()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family,cpp_wrapper", [("qwen2_5_vl", False), ("qwen3_vl_moe", False),  # MoE: dense layers too
                                                ("qwen2_5_vl", True)])  # train.compile_cpp_wrapper
def test_compiled_layers_equal_eager(family, cpp_wrapper, standin_varlen, tmp_path):
    from torch._dynamo.utils import counters

    from train.models import convert
    from train.models.layer_compile import compile_layers
    from train.models.qwen_vl import build_model

    init_megatron_cpu()
    cfg, hf = fx.random_hf_model(family, seed=3, save_to=tmp_path)
    models = []
    for _ in range(2):
        # Megatron's SwiGLU fusion as on GPUs (its own torch.compile'd function, here nested in the layer's graph).
        m = build_model(cfg, **CPU_OVERRIDES, bias_activation_fusion=True)
        convert.load_hf_checkpoint(m, str(tmp_path))
        models.append(m)
    eager, compiled = models
    n_llm, n_vit = compile_layers(compiled, cpp_wrapper=cpp_wrapper)
    assert (n_llm, n_vit) == (cfg.text_config.num_hidden_layers, cfg.vision_config.depth)
    # Three micro-batches: different token counts, sample counts and longest samples (all dynamic).
    batches = [_batch(hf, 10 * i, grids) for i, grids in enumerate([[(1, 4, 4), (1, 8, 4)], [(1, 4, 8), (1, 4, 4), (1, 8, 8)], [(1, 8, 4)]])]
    expected = [_step(eager, b) for b in batches]  # first, so that the counters below see the compiled model only
    counters.clear()
    for batch, (loss_e, grads_e) in zip(batches, expected):
        loss_c, grads_c = _step(compiled, batch)
        assert set(grads_c) == set(grads_e), "the compiled model must train the same parameters"
        torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=0)
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)
    assert not counters["graph_break"], f"graph breaks in compiled layers: {dict(counters['graph_break'])}"
    # One graph for the decoder layer and two for the vision block, reused by every layer and micro-batch: the
    # first block's input is a view (of the patch embedding), and Dynamo guards on a view's base. MoE layers
    # add one: their attention half (the expert half runs eagerly).
    graphs = 3 + (family == "qwen3_vl_moe")
    assert counters["stats"]["unique_graphs"] == graphs, dict(counters["stats"])


def test_a_compiled_graph_follows_the_forced_attention_backend(monkeypatch):
    """A graph traced under one train.attention_backend is not reused once set_backend names another (a benchmark
    runs variants of several backends in one process): the compiled caller guards on the forced name."""
    import inspect

    def marked_varlen(query, key, value, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
        return varlen_attn_standin(query, key, value, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size) * 0

    monkeypatch.setattr(attention, "_TORCH_VARLEN", (marked_varlen, frozenset(inspect.signature(marked_varlen).parameters)))
    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: ["torch_varlen", "sdpa"])
    torch._dynamo.reset()
    attend = torch.compile(lambda q, cu: attention.varlen_attention(q, q, q, cu, 6, causal=True), dynamic=True)
    q, cu = torch.randn(10, 2, 4), torch.tensor([0, 4, 10], dtype=torch.int32)
    try:
        attention.set_backend("torch_varlen")
        assert attend(q, cu).abs().max() == 0  # the marked stand-in ran
        attention.set_backend("sdpa")
        torch.testing.assert_close(attend(q, cu), attention.varlen_attention(q, q, q, cu, 6, causal=True, backend="sdpa"))
        attention.set_backend("auto")
        assert attend(q, cu).abs().max() == 0  # auto picks the first available: the stand-in again
        # the vision tower's (non-causal) calls follow train.vision_attention_backend the same way
        see = torch.compile(lambda q, cu: attention.varlen_attention(q, q, q, cu, 6, causal=False), dynamic=True)
        assert see(q, cu).abs().max() == 0
        attention.set_backend("auto", vision="sdpa")
        torch.testing.assert_close(see(q, cu), attention.varlen_attention(q, q, q, cu, 6, causal=False, backend="sdpa"))
        assert attend(q, cu).abs().max() == 0  # the causal calls keep auto's pick
    finally:
        attention.set_backend("auto")
        torch._dynamo.reset()


@pytest.mark.parametrize("compiled", [True, False])
def test_weight_gradients_fused_into_main_grad_equal_unfused(compiled, standin_varlen, tmp_path):
    """Gradient-accumulation fusion (train/grad_accum.py) inside the compiled layers: over three micro-batches every
    Megatron linear (column, row, the tied LM head), vision-tower Linear and norm adds its weight gradient into
    `main_grad` and leaves `.grad` unset, the embeddings keep autograd's gradients, and the sums equal the eager
    unfused model's; the layers still trace whole, one graph per kind."""
    from torch._dynamo.utils import counters

    from train import grad_accum
    from train.models import convert
    from train.models.layer_compile import compile_layers
    from train.models.qwen_vl import build_model

    init_megatron_cpu()
    cfg, hf = fx.random_hf_model("qwen3_vl", seed=5, save_to=tmp_path)
    eager, fused = (build_model(cfg, **CPU_OVERRIDES, bias_activation_fusion=True) for _ in range(2))
    for m in (eager, fused):
        convert.load_hf_checkpoint(m, str(tmp_path))
    if compiled:
        compile_layers(fused)
    # main_grad as Megatron's DDP lays it out: views of one flat fp32 buffer (they share its version counter)
    params = list(fused.parameters())
    buffer = torch.zeros(sum(p.numel() for p in params))
    offset = 0
    for p in params:
        p.main_grad = buffer[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
    n = grad_accum.fuse_weight_gradients(fused)
    # the layers changed class, not their state: checkpoints and exports read the same keys
    assert list(fused.state_dict()) == list(eager.state_dict())
    text, vision = cfg.text_config, cfg.vision_config
    # 4 linears a decoder layer, the LM head, 4 a vision block, and the patch merger's (deepstack mergers included)
    assert n >= 4 * text.num_hidden_layers + 1 + 4 * vision.depth
    batches = [_batch(hf, 10 * i, grids) for i, grids in enumerate([[(1, 4, 4), (1, 8, 4)], [(1, 4, 8), (1, 4, 4), (1, 8, 8)], [(1, 8, 4)]])]
    eager.zero_grad(set_to_none=True)
    for b in batches:
        eager(**b).sum().backward()
    counters.clear()
    for b in batches:
        fused(**b).sum().backward()
    if compiled:
        assert not counters["graph_break"], dict(counters["graph_break"])
        assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])
    fused_params = dict(fused.named_parameters())
    into_main = 0
    for name, p in eager.named_parameters():
        q = fused_params[name]
        if p.grad is None:
            continue
        # Fused weights hold their sum in main_grad, the others in .grad; the tied embedding in both (the LM head's
        # part fused, the lookup's from autograd), as Megatron's DDP hook would then add them.
        into_main += q.grad is None
        got = q.main_grad + (q.grad if q.grad is not None else 0)
        torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-4 * p.grad.abs().max().item(), msg=name)
    assert into_main >= n  # every fused layer's weight (and bias) went into main_grad
    # what still reaches autograd's .grad (and so a DDP hook): the embeddings alone
    left = sorted(name for name, q in fused_params.items() if q.grad is not None)
    assert left and all("embed" in name for name in left), left


def test_gradient_accumulation_fusion_is_left_out_where_it_cannot_apply():
    """A linear whose weight has no main_grad, an input without a gradient (the fused backward would never run) and
    no-grad mode keep torch's linear: same output, autograd's gradient."""
    from train import grad_accum

    lin = torch.nn.Linear(4, 3)
    assert grad_accum.fuse_weight_gradients(torch.nn.Sequential(lin)) == 1
    x = torch.randn(5, 4)
    lin(x).sum().backward()  # no main_grad: the weight gets .grad
    assert lin.weight.grad is not None
    lin.weight.grad = lin.bias.grad = None
    lin.weight.main_grad, lin.bias.main_grad = torch.zeros(3, 4), torch.zeros(3)
    y = lin(x)  # x needs no gradient: the weight's gradient must come from autograd
    y.sum().backward()
    assert lin.weight.grad is not None and not lin.weight.main_grad.any()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), x @ lin.weight.T + lin.bias)
    lin.weight.grad = lin.bias.grad = None
    xr = x.clone().requires_grad_()
    lin(xr).sum().backward()
    assert lin.weight.grad is None and lin.bias.grad is None
    torch.testing.assert_close(lin.weight.main_grad, torch.ones(5, 3).T @ x)
    torch.testing.assert_close(lin.bias.main_grad, torch.full((3,), 5.0))
    torch.testing.assert_close(xr.grad, torch.ones(5, 3) @ lin.weight.detach())
