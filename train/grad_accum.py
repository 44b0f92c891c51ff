"""Gradient accumulation into Megatron's fp32 grad buffer, at the GPU's memory bandwidth.

Megatron's DDP adds each parameter's bf16 gradient into its fp32 `main_grad` after every micro-batch
(`main_grad.add_(grad)`, from a hook on the parameter's gradient accumulator). A mixed-dtype `add_` runs as
PyTorch's unrolled (not vectorised) element-wise kernel: in the H200 profile of the compiled 2B step that was
58 ms of the 780 ms of GPU work, at about half the card's memory bandwidth (docs/performance.md "Where the
time goes"). `accumulate_` is the same sum, fp32 += bf16 rounded once, as one
Triton kernel of wide loads; `DistributedDataParallel` (below) is Megatron's DDP with its hook calling it.
Small tensors (norm weights, biases) keep `add_`: there a launch costs more than the bandwidth saves.
"""

from __future__ import annotations

import functools

import torch

# Below this many elements a tensor keeps add_: the Triton launch's host cost (~10 us) outweighs the saving.
MIN_ELEMENTS = 1 << 16
_BLOCK = 4096


@functools.cache
def _kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def accumulate(dst, src, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        total = tl.load(dst + offs, mask=mask) + tl.load(src + offs, mask=mask).to(tl.float32)
        tl.store(dst + offs, total, mask=mask)

    return accumulate


def launch(dst: torch.Tensor, src: torch.Tensor) -> None:
    """dst += src through the Triton kernel: dst fp32, src fp32/bf16/fp16, both contiguous, of equal size."""
    n = dst.numel()
    _kernel()[((n + _BLOCK - 1) // _BLOCK,)](dst, src, n, BLOCK=_BLOCK, num_warps=8)


def accumulate_(dst: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """dst += src (dst the fp32 main gradient, src a parameter's gradient); the Triton kernel where it pays."""
    if (dst.is_cuda and dst.dtype == torch.float32 and src.dtype in (torch.bfloat16, torch.float16)
            and dst.numel() >= MIN_ELEMENTS and dst.shape == src.shape and dst.is_contiguous() and src.is_contiguous()):
        launch(dst, src)
        return dst
    return dst.add_(src)


def backward_post_hook(ddp, param: torch.nn.Parameter):
    """Megatron DDP's per-parameter hook (megatron-core 0.16 `_make_backward_post_hook`, the same steps), with the
    accumulation through `accumulate_`."""
    from megatron.core.transformer.cuda_graphs import is_graph_capturing

    def hook(*unused):
        if is_graph_capturing() or param not in ddp.param_to_bucket_group:
            return
        if ddp.ddp_config.overlap_grad_reduce:
            assert param.grad is not None, "param.grad being None is not safe when overlap_grad_reduce is True"
        if param.grad is not None and (not param.grad_added_to_main_grad or getattr(param, "zero_out_wgrad", False)):
            accumulate_(param.main_grad, param.grad.data)
        param.grad = None
        if ddp.ddp_config.overlap_grad_reduce:
            ddp.param_to_bucket_group[param].register_grad_ready(param, ddp.force_all_reduce)

    return hook


@functools.cache
def distributed_data_parallel():
    """Megatron-Core's DistributedDataParallel with `backward_post_hook` as its per-parameter hook (its constructor
    registers the hooks through `_make_backward_post_hook`)."""
    from megatron.core.distributed import DistributedDataParallel

    class FastAccumulateDDP(DistributedDataParallel):
        def _make_backward_post_hook(self, param):
            return backward_post_hook(self, param)

    return FastAccumulateDDP
