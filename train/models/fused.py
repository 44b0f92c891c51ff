"""Fused element-wise kernels of the language model: Qwen's RMSNorm and rotary embedding (RoPE).

Why: written as plain PyTorch, one RMSNorm is ~8 kernels forward and ~14 backward (cast, square, mean,
rsqrt, scale, cast back, weight), and RoPE another ~15 per layer for q and k. The Qwen3-VL-2B profile
(docs/performance.md) spent ~0.5 s of a 1.2 s step in such kernels and ~0.4 s more waiting on the CPU to
launch ~25k of them. `torch.compile` turns each function below into one kernel forward and one or two
backward (Inductor generates the backward through AOTAutograd), at the cost of a compile on first use
(seconds; the token dimension is dynamic, so each new packed length reuses it).

The functions are the reference arithmetic of transformers' Qwen models; on CPU, in float32, or with
train.fused_kernels=false they run eagerly and give exactly the unfused results (the CPU tests compare against
transformers with that path). Compiled, Inductor keeps float32 inside the kernel and rounds once at
the end, so bf16 outputs can differ from the eager ones by an ulp: the same size as the difference
between any two bf16 implementations.
"""

from __future__ import annotations

import functools

import torch

_enabled = True


def set_enabled(on: bool) -> None:
    """Turn the compiled path on or off for this process (train.fused_kernels)."""
    global _enabled
    _enabled = bool(on)


def _use_compiled(t: torch.Tensor) -> bool:
    # float32 stays eager: that is the exactness-checking path, and nothing in training runs it on GPU.
    # Inside a compiled layer (layer_compile.py) the reference is traced into the layer's graph, which
    # Inductor fuses as it would fuse this function alone.
    if torch.compiler.is_compiling():
        return False
    return _enabled and t.is_cuda and t.dtype in (torch.bfloat16, torch.float16)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' Qwen RMSNorm: normalise in float32, round to the input dtype, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def rotate_half(t: torch.Tensor) -> torch.Tensor:
    t1, t2 = t.chunk(2, dim=-1)
    return torch.cat((-t2, t1), dim=-1)


def rope_reference(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE with cos/sin already in t's dtype (transformers' apply_rotary_pos_emb)."""
    return t * cos + rotate_half(t) * sin


# Each distinct (rank, static sizes, strides, grad mode) of an input is a separate compiled graph; past
# torch._dynamo's recompile limit (8) a fullgraph function fails. Megatron hands the norms views of several
# layouts (the QKV split, the [s, b, h] transpose), whose strides depend on the length: guarded, so one new
# graph per length. Hence the inputs below are made contiguous with only the token dimension dynamic, which
# leaves one graph per hidden size and grad mode (about 8 in all: norms of width hidden and head_dim, RoPE
# for the query and key head counts, each with and without grad).
_RECOMPILE_LIMIT = 32


@functools.cache
def _compiled(fn):
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    from train.models.layer_compile import _inductor_options  # no size-range guards from mix-order reduction

    return torch.compile(fn, dynamic=False, fullgraph=True, options=_inductor_options())


def _tokens_dynamic(*tensors: torch.Tensor) -> None:
    for t in tensors:
        torch._dynamo.maybe_mark_dynamic(t, 0)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if _use_compiled(x):
        x2 = x.reshape(-1, x.shape[-1]).contiguous()  # [tokens * heads, width]
        _tokens_dynamic(x2)
        return _compiled(rms_norm_reference)(x2, weight, eps).view(x.shape)
    return rms_norm_reference(x, weight, eps)


def rope(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """t [T, heads, D]; cos, sin [T, 1, D]."""
    if _use_compiled(t):
        t, cos, sin = t.contiguous(), cos.contiguous(), sin.contiguous()
        _tokens_dynamic(t, cos, sin)
        return _compiled(rope_reference)(t, cos, sin)
    return rope_reference(t, cos, sin)
