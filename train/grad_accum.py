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


# ---------------------------------------------------------------------------------------------------------------
# Gradient-accumulation fusion: each linear layer's weight-gradient GEMM adds into main_grad itself.
#
# Unfused, every micro-batch's backward writes a bf16 weight gradient per linear (one GEMM), autograd hands it to
# the DDP hook above, and the hook adds it into the fp32 main_grad (a second pass over 10 bytes a parameter, plus a
# kernel launch and a Python hook per parameter). Megatron-Core fuses the two with Apex's `wgrad_gemm_accum_fp32`
# (config.gradient_accumulation_fusion), which this project does not assume. cuBLAS does the same with a GEMM
# whose output C is main_grad and beta = 1 (`addmm` with `out_dtype`, torch >= 2.8 on CUDA): one pass, and the
# micro-batch's gradient is never rounded to bf16 before the fp32 sum (a sum at least as exact as the unfused one).


@functools.cache
def _fp32_out_addmm(device: torch.device) -> bool:
    """Whether this torch's CUDA addmm takes an fp32 C with bf16 A and B (`out_dtype`): the overload exists from 2.8,
    but before ~2.10 it refuses a C whose dtype differs from the matrices'. Tried once per device on 2 x 2 tensors."""
    if not hasattr(torch.ops.aten.addmm, "dtype_out"):
        return False
    c, a = torch.zeros(2, 2, device=device), torch.ones(2, 2, device=device, dtype=torch.bfloat16)
    try:
        torch.addmm(c, a, a, out_dtype=torch.float32, out=c)
    except RuntimeError:
        return False
    return bool((c == 2).all())


# the op has no autograd kernel: called with grad on (a backward with create_graph), addmm's out= would refuse
@torch.no_grad()
def _add_weight_grad(main_grad: torch.Tensor, grad_output: torch.Tensor, inputs: torch.Tensor) -> None:
    if main_grad.dtype == grad_output.dtype:
        torch.addmm(main_grad, grad_output.t(), inputs, out=main_grad)
    elif main_grad.is_cuda and main_grad.dtype == torch.float32 and _fp32_out_addmm(main_grad.device):
        torch.addmm(main_grad, grad_output.t(), inputs, out_dtype=torch.float32, out=main_grad)
    else:  # no mixed-dtype GEMM here: the unfused sum
        accumulate_(main_grad, grad_output.t() @ inputs)


# An opaque op to the compiler (Inductor would otherwise lower the in-place GEMM-plus-add to a GEMM and an add),
# defined on torch.library's lower level rather than as a `custom_op`: the compiled backward calls it ~1,100 times a
# step, and custom_op's Python wrapper costs ~5 us a call more (4.4-4.9 against 9.4 us on CPU, of which addmm 1.7-2.2).
# Defined once per process: a reload of this module or a second import under another name keeps the first
# definition (and its library object, whose end would remove the op).
if not hasattr(torch.ops.geo3k, "add_weight_grad_"):
    _LIB = torch.library.Library("geo3k", "FRAGMENT")
    _LIB.define("add_weight_grad_(Tensor(a!) main_grad, Tensor grad_output, Tensor inputs) -> ()")
    for _key in ("CPU", "CUDA"):
        _LIB.impl("add_weight_grad_", _add_weight_grad, _key)
    _LIB.impl("add_weight_grad_", lambda main_grad, grad_output, inputs: None, "Meta")
add_weight_grad_ = torch.ops.geo3k.add_weight_grad_.default
"""main_grad += grad_output^T @ inputs: grad_output [tokens, out], inputs [tokens, in], main_grad [out, in]."""


class _LinearIntoMainGrad(torch.autograd.Function):
    """y = x W^T + b whose backward adds dW (and db) into W.main_grad (b.main_grad) and returns no gradient for
    them. W and b come in detached, so autograd has no edge to them: no gradient, no AccumulateGrad node and no
    DDP hook call for these parameters (only valid without overlapped gradient reduction, which needs the hook).
    main_grad is a saved tensor: saved-tensor hooks that copy (activation offloading to the host) would make the add
    land in the copy, and a module called twice in one forward would trip its version check; the engine uses
    neither (Megatron keeps main_grad on ctx for its MTP layers' reuse)."""

    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, main_grad_bias):
        ctx.save_for_backward(x, weight, main_grad, main_grad_bias)
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight, main_grad, main_grad_bias = ctx.saved_tensors
        grad_2d = grad.reshape(-1, grad.shape[-1])
        add_weight_grad_(main_grad, grad_2d, x.reshape(-1, x.shape[-1]))
        if main_grad_bias is not None:
            main_grad_bias.add_(grad_2d.sum(0, dtype=main_grad_bias.dtype))
        return grad.matmul(weight), None, None, None, None


def _fusable(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    # x must carry the graph: with W detached nothing else makes the output require a gradient.
    return (torch.is_grad_enabled() and x.requires_grad and weight.requires_grad
            and getattr(weight, "main_grad", None) is not None
            and (bias is None or (bias.requires_grad and getattr(bias, "main_grad", None) is not None)))


def linear_into_main_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) whose weight (and bias) gradients go straight into their `main_grad`."""
    main_bias = bias.main_grad if bias is not None else None
    return _LinearIntoMainGrad.apply(x, weight.detach(), None if bias is None else bias.detach(), weight.main_grad, main_bias)


class MainGradLinear(torch.nn.Linear):
    """torch's Linear whose weight and bias gradients go into their main_grad (the vision tower's layers)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fusable(x, self.weight, self.bias):
            return linear_into_main_grad(x, self.weight, self.bias)
        return super().forward(x)


@functools.cache
def _fused_megatron_class(cls):
    """A subclass of Megatron's Column/RowParallelLinear `cls` whose `_forward_impl` is fused where its backward has
    no collective inside the GEMMs (no all-reduce or reduce-scatter of the input gradient, no deferred embedding
    wgrad); elsewhere Megatron's own. A subclass, not a per-module function: the compiled layers guard on the module's
    type, which all layers share (an attribute per module would be a guard per module, and a graph per layer)."""

    def _forward_impl(self, input, weight, *args, bias=None, allreduce_dgrad=False, sequence_parallel=False,
                      grad_output_buffer=None, **kwargs):
        if (not args and not allreduce_dgrad and not sequence_parallel and grad_output_buffer is None
                and _fusable(input, weight, bias)):
            return linear_into_main_grad(input, weight, bias)
        return cls._forward_impl(self, input, weight, *args, bias=bias, allreduce_dgrad=allreduce_dgrad,
                                 sequence_parallel=sequence_parallel, grad_output_buffer=grad_output_buffer, **kwargs)

    return type(cls.__name__, (cls,), {"_forward_impl": _forward_impl, "__module__": __name__,
                                       "__doc__": f"{cls.__name__} with gradient-accumulation fusion (grad_accum.py)"})


class _IntoMainGrad(torch.autograd.Function):
    """(x, w, b) -> the same tensors (views), with the gradients reaching w and b added into their main_grad and x's
    passed on. For the norms: their weight gradient is a reduction inside the compiled layer's backward, which then
    adds it into main_grad in the same graph, instead of handing autograd a gradient for a DDP hook to add. x (which
    needs a gradient) carries the graph: w and b come in detached, so they get no AccumulateGrad node and no hook."""

    @staticmethod
    def forward(ctx, x, weight, bias, main_grad, main_grad_bias):
        ctx.save_for_backward(main_grad, main_grad_bias)
        return x.view_as(x), weight.view_as(weight), None if bias is None else bias.view_as(bias)

    @staticmethod
    def backward(ctx, grad_x, grad_weight, grad_bias):
        main_grad, main_grad_bias = ctx.saved_tensors
        if grad_weight is not None:
            main_grad.add_(grad_weight)
        if grad_bias is not None and main_grad_bias is not None:
            main_grad_bias.add_(grad_bias)
        return grad_x, None, None, None, None


def into_main_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None):
    """(x, weight, bias) to compute a layer with, whose weight and bias gradients go into their main_grad."""
    return _IntoMainGrad.apply(x, weight.detach(), None if bias is None else bias.detach(), weight.main_grad,
                               None if bias is None else bias.main_grad)


class MainGradLayerNorm(torch.nn.LayerNorm):
    """torch's LayerNorm (the vision blocks' norms) with its weight and bias gradients into main_grad."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None and _fusable(x, self.weight, self.bias):
            x, weight, bias = into_main_grad(x, self.weight, self.bias)
            return torch.nn.functional.layer_norm(x, self.normalized_shape, weight, bias, self.eps)
        return super().forward(x)


@functools.cache
def _fused_rms_norm_class(cls):
    """The language model's QwenRMSNorm (train/models/qwen_vl.py) with its weight gradient into main_grad."""
    from train.models import fused

    def forward(self, x):
        if _fusable(x, self.weight, None):
            x, weight, _ = into_main_grad(x, self.weight)
            return fused.rms_norm(x, weight, self.eps)
        return cls.forward(self, x)

    return type(cls.__name__, (cls,), {"forward": forward, "__module__": __name__})


def _own_version_counter(t: torch.Tensor) -> torch.Tensor:
    """A tensor on t's memory (same offset, shape, strides) with a version counter of its own. Megatron's main_grad
    tensors are views of one bucket buffer, and views share their base's counter: each fused backward's in-place
    add would bump every other parameter's main_grad, and autograd, which saved those for their own backward,
    would refuse them as modified. Each alias is written only by its own parameter's backward."""
    alias = t.new_empty(0)
    return alias.set_(t.untyped_storage(), t.storage_offset(), t.shape, t.stride())


def fuse_weight_gradients(model: torch.nn.Module) -> int:
    """Route the weight gradients of every linear layer of `model` (Megatron's Column/RowParallelLinear, the vision
    tower's torch Linear) and norm (QwenRMSNorm, torch's LayerNorm) into their parameters' `main_grad`; returns how
    many layers. Left to autograd's gradients and the DDP hook: the embeddings, the patch embedding, the router.
    Call after Megatron's DDP has given the parameters `main_grad` (a layer whose weight has none keeps its usual
    backward) and only with overlap_grad_reduce off (the DDP hook no longer sees these gradients). The layers change
    class (a subclass each, as FSDP2's fully_shard does), so compiled layers guard on one type for all of them."""
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from train.models.qwen_vl import QwenRMSNorm

    n = 0
    for module in model.modules():
        if type(module) in (ColumnParallelLinear, RowParallelLinear):
            module.__class__ = _fused_megatron_class(type(module))
        elif type(module) is torch.nn.Linear:
            module.__class__ = MainGradLinear
        elif type(module) is torch.nn.LayerNorm:
            module.__class__ = MainGradLayerNorm
        elif type(module) is QwenRMSNorm:
            module.__class__ = _fused_rms_norm_class(QwenRMSNorm)
        else:
            continue
        n += 1
    for p in model.parameters():  # all of them: the LM head saves the (tied) embedding's main_grad too
        if getattr(p, "main_grad", None) is not None:
            p.main_grad = _own_version_counter(p.main_grad)
    return n
