"""The Megatron engine's optimizer kernels without Apex or Transformer Engine (train/engine_megatron.py): the
foreach gradient norm and scale that replace Megatron-Core's per-tensor fallbacks, and torch's fused AdamW in
place of its foreach form. They run on GPUs; the functions themselves are device-agnostic, so they are checked
here on CPU tensors against the plain computations."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core")

from train.engine_megatron import _fast_torch_optimizer, _foreach_l2_norm, _foreach_scale  # noqa: E402


def _tensors(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in ((7, 3), (11,), (2, 5, 4), (1,))]


def test_foreach_norm_is_the_norm_of_all_tensors():
    ts = _tensors()
    norm, per_tensor = _foreach_l2_norm(2048 * 32, None, [ts], False)
    assert per_tensor is None and norm.shape == (1,) and norm.dtype == torch.float32
    expected = torch.linalg.vector_norm(torch.cat([t.reshape(-1) for t in ts]))
    torch.testing.assert_close(norm[0], expected, rtol=1e-6, atol=0)


def test_foreach_scale_in_place_and_into_other_tensors():
    ts = _tensors(1)
    ref = [t * 0.25 for t in ts]
    _foreach_scale(0, None, [ts, ts], 0.25)  # Megatron's clipping: src is dst
    for a, b in zip(ts, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    src, dst = _tensors(2), [torch.zeros_like(t) for t in ts]
    _foreach_scale(0, None, [src, dst], 3.0)
    for s, d in zip(src, dst):
        torch.testing.assert_close(d, s * 3.0, rtol=0, atol=0)


class _Chained:
    """Megatron's ChainedOptimizer > DistributedOptimizer > torch AdamW nesting, as _fast_torch_optimizer walks it."""

    def __init__(self, adam):
        self.chained_optimizers = [type("Dist", (), {"optimizer": adam})()]


def test_fused_adamw_takes_the_same_steps_and_installs_the_foreach_kernels():
    from megatron.core.optimizer import clip_grads

    params = [torch.nn.Parameter(t) for t in _tensors(3)]
    twin = copy.deepcopy(params)
    kw = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    fused, plain = torch.optim.AdamW(params, **kw), torch.optim.AdamW(twin, **kw, foreach=True)
    _fast_torch_optimizer(_Chained(fused))
    assert all(g["fused"] and not g["foreach"] for g in fused.param_groups)
    assert clip_grads.l2_norm_impl is _foreach_l2_norm and clip_grads.multi_tensor_scale_impl is _foreach_scale
    for step in range(3):
        for p, q, g in zip(params, twin, _tensors(10 + step)):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    # a state that already exists (a resumed optimizer) is left in its form
    again = torch.optim.AdamW(params, **kw)
    again.state[params[0]]["step"] = torch.tensor(1.0)
    _fast_torch_optimizer(_Chained(again))
    assert not again.param_groups[0]["fused"]
