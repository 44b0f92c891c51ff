"""The fp32 gradient accumulation of the Megatron engine (train/grad_accum.py): its Triton kernel against
torch's add_, run by Triton's interpreter on CPU, and the DDP hook's steps (Megatron's DDP itself is CUDA-only)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from train import grad_accum

ROOT = Path(__file__).resolve().parents[1]


def test_the_kernel_equals_add_on_triton_s_interpreter():
    """Sizes around the block edge (a partial last block, one element, several blocks): the fp32 sum of fp32 and
    bf16 rounded once, as add_ rounds it: equal bit for bit."""
    pytest.importorskip("triton")
    code = textwrap.dedent("""
        import torch
        from train import grad_accum
        for n in (1, 4095, 4096, 4097, 3 * 4096 + 17):
            g = torch.Generator().manual_seed(n)
            dst = torch.randn(n, generator=g) * 100
            src = torch.randn(n, generator=g).bfloat16()
            want = dst.clone().add_(src)
            grad_accum.launch(dst, src)
            assert torch.equal(dst, want), n
        print("ok")
    """)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_accumulate_falls_back_to_add_off_the_gpu_and_for_small_tensors():
    dst, src = torch.ones(8), torch.full((8,), 0.5, dtype=torch.bfloat16)
    assert grad_accum.accumulate_(dst, src) is dst and torch.equal(dst, torch.full((8,), 1.5))


def test_the_ddp_hook_accumulates_and_frees_the_gradient():
    """Megatron's hook steps: main_grad += grad, grad dropped, a gradient already in main_grad not added twice,
    a parameter outside the buckets left alone, bucket readiness reported under overlap_grad_reduce."""
    pytest.importorskip("megatron.core")
    p = torch.nn.Parameter(torch.zeros(3))
    p.main_grad, p.grad_added_to_main_grad = torch.zeros(3), False
    ready = []
    bucket = SimpleNamespace(register_grad_ready=lambda param, force: ready.append((param, force)))
    ddp = SimpleNamespace(param_to_bucket_group={p: bucket}, ddp_config=SimpleNamespace(overlap_grad_reduce=True),
                          force_all_reduce=False)
    hook = grad_accum.backward_post_hook(ddp, p)
    for _ in range(2):
        p.grad = torch.tensor([1.0, 2.0, 3.0])
        hook()
        assert p.grad is None
    assert torch.equal(p.main_grad, torch.tensor([2.0, 4.0, 6.0])) and len(ready) == 2 and ready[0][0] is p
    p.grad, p.grad_added_to_main_grad = torch.ones(3), True  # written there by a fused weight-gradient GEMM
    hook()
    assert torch.equal(p.main_grad, torch.tensor([2.0, 4.0, 6.0])) and p.grad is None
    other = torch.nn.Parameter(torch.zeros(1))
    other.grad = torch.ones(1)
    grad_accum.backward_post_hook(ddp, other)()
    assert other.grad is not None


def test_the_engine_s_ddp_is_megatron_s_with_this_hook():
    pytest.importorskip("megatron.core")
    from megatron.core.distributed import DistributedDataParallel

    cls = grad_accum.distributed_data_parallel()
    assert issubclass(cls, DistributedDataParallel)
    assert cls._make_backward_post_hook is not DistributedDataParallel._make_backward_post_hook


def test_the_fused_weight_gradient_op_adds_into_main_grad():
    """add_weight_grad_: main_grad += g^T x in main_grad's dtype; mixed dtypes off the GPU take the unfused sum (the
    product rounded to bf16, then added in fp32, as the hook's path does), not the fp32 product of the GPU's GEMM."""
    g, x = torch.randn(7, 3), torch.randn(7, 5)
    main = torch.randn(3, 5)
    want = main + g.T @ x
    grad_accum.add_weight_grad_(main, g, x)
    torch.testing.assert_close(main, want)
    main32 = torch.zeros(3, 5)
    gb, xb = g.bfloat16(), x.bfloat16()
    grad_accum.add_weight_grad_(main32, gb, xb)
    assert torch.equal(main32, (gb.T @ xb).float())
    assert not torch.equal(main32, gb.float().T @ xb.float())  # so the bf16-rounded path it was


def test_the_fused_op_runs_with_grad_enabled_and_survives_a_reload():
    """The op has no autograd kernel: called where grad is on with inputs that need one (a backward with
    create_graph), it still adds; reloading its module keeps the one definition working (in a fresh process: a
    reload here would swap this module's classes under the other tests)."""
    code = textwrap.dedent("""
        import gc, importlib, torch
        from train import grad_accum
        main_grad = torch.zeros(3, 4)
        g, x = torch.randn(5, 3, requires_grad=True), torch.randn(5, 4, requires_grad=True)
        grad_accum.add_weight_grad_(main_grad, g, x)
        importlib.reload(grad_accum)
        gc.collect()
        grad_accum.add_weight_grad_(main_grad, g, x)
        torch.testing.assert_close(main_grad, 2 * g.detach().t() @ x.detach())
        print("added twice")
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert out.returncode == 0 and "added twice" in out.stdout, out.stderr[-2000:]
