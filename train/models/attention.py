"""Variable-length ("packed", THD) attention for the Qwen-VL models.

A packed micro-batch is one sequence of several whole samples laid end to end; `cu_seqlens` marks
where each sample starts. Attention must never cross a boundary, so every kernel here takes
`[total_tokens, heads, head_dim]` tensors plus `cu_seqlens` and attends inside each segment only.

Backends, picked per call by what is available (`select_backend`), unless `train.attention_backend` names one
(the engines pass it to `set_backend`):

- ``fa4``: FlashAttention-4's CuTe kernels (the `flash-attn-4` package, `flash_attn.cute`) on Hopper and Blackwell
  (compute capability 9.x-11.x, fp16/bf16), as custom ops of ours; grouped kv heads natively. Auto picks it only
  where neither FlashAttention-2 route exists: on an H200 (torch 2.11) it matched FlashAttention-2's numerics but ran
  the vision tower's shapes 0.74x as fast, the language model's 1.17x (BENCHMARKS.md); name it to use it.
- ``flash_attn``: `flash_attn.flash_attn_varlen_func`, when the package is importable (CUDA, fp16/bf16).
- ``aten_flash``: aten's FlashAttention-2 op (`torch.ops.aten._flash_attention_forward`, what `varlen_attn`
  calls on torch 2.10/2.11) without `varlen_attn`'s Python custom op around it (CUDA, compute capability >= 8,
  fp16/bf16); grouped kv heads natively. Auto's pick where flash-attn is not installed: on an H200 (torch 2.11)
  the compiled 2B step ran 5% faster than through `varlen_attn`, with the same losses (BENCHMARKS.md).
- ``torch_varlen``: `torch.nn.attention.varlen.varlen_attn` (PyTorch >= 2.10, CUDA, fp16/bf16). PyTorch
  2.10/2.11 have no `is_causal` argument; `window_size=(-1, 0)` is its causal mask (checked equal to SDPA).
- ``cudnn_frontend``: cuDNN's fused attention kernels through NVIDIA's cudnn-frontend Python package
  (`nvidia-cudnn-frontend`, train/models/cudnn_attention.py) on Hopper and newer (fp16/bf16), as custom ops of
  ours; grouped kv heads natively. Never auto's pick: name it to use it. The candidate for the vision tower, where
  FlashAttention-2 runs head size 64 at ~180 TFLOP/s on an H200 (docs/performance.md, "Attention").
- ``sdpa``: exact fallback for CPU and fp32: one `scaled_dot_product_attention` call per segment. It is
  a Python loop, so it is meant for tests and small runs, not for GPU throughput.

aten's flash ops called from a plain `autograd.Function` cut an H200 LLM layer's attention host time from 0.98 to
0.22 ms but not the step time of eager layers (docs/performance.md, "What was tried"); ``aten_flash`` calls the op
with no Python autograd at all, for compiled layers, whose steps are host-bound at the compiled calls.

The same function serves the language model (causal) and the vision encoder (non-causal, one segment
per image or per attention window). `VarlenCoreAttention` plugs it into Megatron-Core's module specs as
the `core_attention` submodule, because Megatron-Core's own local `DotProductAttention` refuses packed
input and its packed path otherwise needs Transformer Engine.
"""

from __future__ import annotations

import functools
import inspect

import torch
import torch.nn.functional as F

from shared.config import ConfigError
from train.models import cudnn_attention, fused
from train.models.kernel_ops import register_varlen_autograd

BACKENDS = ("fa4", "flash_attn", "aten_flash", "torch_varlen", "cudnn_frontend", "sdpa")

# One backend for every call (train.attention_backend), to compare kernels or to work around a broken one;
# None picks the fastest available per call. `_forced_vision` (train.vision_attention_backend), where set, takes
# the non-causal calls instead: the vision tower's, whose shapes favour other kernels than the language model's.
_forced: str | None = None
_forced_vision: str | None = None


@functools.cache
def _flash_attn_varlen():
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError:
        return None
    return flash_attn_varlen_func


def _load_torch_varlen():
    """(varlen_attn, accepted keyword names), or None when this PyTorch has no varlen_attn."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn, frozenset(inspect.signature(varlen_attn).parameters)


# Resolved at import, not on first call: compiled layers (layer_compile.py) trace the attention call, and
# Dynamo cannot trace `inspect.signature`.
_TORCH_VARLEN = _load_torch_varlen()


@functools.cache
def _fa4_interface():
    """flash_attn.cute.interface (FlashAttention-4), or None where it is not installed or cannot load."""
    try:
        from flash_attn.cute import interface
    except Exception:  # ImportError, or its CUDA toolchain failing to load: then the other backends serve
        return None
    return interface


def _fa4_runs_on(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.hip is None and 9 <= torch.cuda.get_device_capability(device)[0] <= 11
            and _fa4_interface() is not None)


def available_backends(device: torch.device, dtype: torch.dtype) -> list[str]:
    """Backends that can run tensors of this device and dtype, fastest first."""
    names = []
    half = dtype in (torch.float16, torch.bfloat16)
    if device.type == "cuda" and half:
        if _flash_attn_varlen() is not None:
            names.append("flash_attn")
        if _aten_flash_runs_on(device):  # varlen_attn's kernel without its Python wrapper: faster compiled steps
            names.append("aten_flash")
        if _TORCH_VARLEN is not None:
            names.append("torch_varlen")
        if _fa4_runs_on(device):  # after FlashAttention-2: slower on the 2B model's vision shapes (BENCHMARKS.md)
            names.append("fa4")
        if cudnn_attention.runs_on(device):  # opt-in until measured against FlashAttention-2 on these shapes
            names.append("cudnn_frontend")
    names.append("sdpa")
    return names


def set_backend(name: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
                vision: str = "same") -> None:
    """Use backend `name` for every call from now on, or "auto" for the fastest available (train.attention_backend);
    `vision`, unless "same", for the non-causal calls, the vision tower's (train.vision_attention_backend).
    Given the device and dtype the model runs in, a backend that cannot run them is refused here, not at the first
    forward. Call it before layers are compiled: a compiled graph keeps the backend it was traced with."""
    global _forced, _forced_vision
    settings = (("attention_backend", name, "auto"), ("vision_attention_backend", vision, "same, auto"))
    for field, value, keywords in settings:
        if value not in (*keywords.split(", "), *BACKENDS):
            raise ConfigError(f"train.{field}: {value!r} is unknown; write {keywords} or one of {', '.join(BACKENDS)}")
    if device is not None and dtype is not None:
        names = available_backends(device, dtype)  # loads an installed FlashAttention-4 now, not in a layer's tracing
        for field, value, keywords in settings:
            if value in BACKENDS and value not in names:
                raise _unavailable(value, device, dtype, field)
    _forced = None if name == "auto" else name
    _forced_vision = None if vision == "same" else vision  # None: as _forced; "auto": the fastest, whatever _forced


def _unavailable(name: str, device: torch.device, dtype: torch.dtype, field: str = "attention_backend") -> ConfigError:
    return ConfigError(
        f"train.{field}: {name} cannot run {str(dtype).removeprefix('torch.')} tensors on {device.type}; "
        f"available here: {', '.join(available_backends(device, dtype))}. Set it to auto to pick automatically."
    )


def select_backend(device: torch.device, dtype: torch.dtype, causal: bool = True) -> str:
    # The forced names are read here, in traced code, so that a compiled graph guards on them: a graph traced with
    # one backend is not reused after set_backend names another (as a benchmark's next variant does in one process).
    forced = _forced if causal or _forced_vision is None else _forced_vision
    return _select_backend(device, dtype, None if forced == "auto" else forced)


# Evaluated once when a compiled layer is traced (the result is a constant of the graph): it imports
# flash-attn lazily, which Dynamo does not trace.
@torch.compiler.assume_constant_result
def _select_backend(device: torch.device, dtype: torch.dtype, forced: str | None) -> str:
    names = available_backends(device, dtype)
    if forced is None:
        return names[0]
    if forced not in names:
        raise _unavailable(forced, device, dtype)
    return forced


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Attention inside each segment of a packed sequence.

    q: [T, Hq, D]; k, v: [T, Hkv, D] with Hq a multiple of Hkv (grouped-query attention);
    cu_seqlens: int32 [num_segments + 1] starting at 0 and ending at T. Returns [T, Hq, D].
    """
    assert q.dim() == 3 and k.dim() == 3 and v.dim() == 3, "expected [tokens, heads, head_dim]"
    assert q.shape[1] % k.shape[1] == 0, "query heads must be a multiple of key/value heads"
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** -0.5
    backend = backend or select_backend(q.device, q.dtype, causal)
    cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32)
    max_seqlen = int(max_seqlen)
    if backend == "flash_attn":
        return _flash_attn_varlen()(
            q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
            dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
        )
    if backend == "fa4":
        return fa4_varlen_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if backend == "torch_varlen":
        return _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if backend == "aten_flash":
        return _aten_flash_attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if backend == "cudnn_frontend":
        return cudnn_attention.cudnn_varlen_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale)
    if backend == "sdpa":
        return _sdpa_loop(q, k, v, cu_seqlens, causal, softmax_scale)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")


def _repeat_kv(k: torch.Tensor, v: torch.Tensor, rep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k, v [T, Hkv, D] -> [T, Hkv * rep, D], head h reading kv head h // rep. expand + reshape is one copy
    kernel; `repeat_interleave` in its place made the H200 step 27% slower (docs/performance.md)."""
    def expand(t):
        return t[:, :, None, :].expand(t.shape[0], t.shape[1], rep, t.shape[2]).reshape(t.shape[0], -1, t.shape[2])

    return expand(k), expand(v)


def _torch_varlen_attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    varlen_attn, params = _TORCH_VARLEN
    kwargs = {}
    if "scale" in params:
        kwargs["scale"] = softmax_scale
    elif abs(softmax_scale - q.shape[-1] ** -0.5) > 1e-12:
        raise ValueError("this PyTorch's varlen_attn has no `scale`; set train.attention_backend=sdpa")
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # 2.10/2.11 need as many key/value heads as query heads: query head h reads kv head h // rep
            k, v = _repeat_kv(k, v, q.shape[1] // k.shape[1])
    if causal:
        if "is_causal" in params:
            kwargs["is_causal"] = True
        else:
            # PyTorch 2.10/2.11 spell causal as an unbounded left window and no right window.
            kwargs["window_size"] = (-1, 0)
    return varlen_attn(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, **kwargs)


# aten's FlashAttention-2 op, called as it is: its autograd formula is C++ (no Python autograd node) and the
# compiler traces it (a meta function, Inductor calls it as an extern kernel), so a compiled layer reaches the
# kernel through the dispatcher alone. `varlen_attn` wraps the same op in a Python custom op, which on the
# H200 profile of the compiled 2B step costs ~0.16 ms of host time a forward call and ~0.1 ms a backward one beyond
# the op (and a tensor fill for its RNG state), against layers whose GPU time is 0.6-1.6 ms. Grouped kv heads
# natively (FlashAttention-2 takes Hq a multiple of Hkv). Reached through `_ATEN_FLASH` so that a CPU test can put
# a stand-in of the same signature in its place.
_ATEN_FLASH = {"forward": getattr(torch.ops.aten, "_flash_attention_forward", None)}


def _aten_flash_runs_on(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.version.hip is None and _ATEN_FLASH["forward"] is not None
            and torch.backends.cuda.is_flash_attention_available() and torch.cuda.get_device_capability(device)[0] >= 8)


def _aten_flash_attention(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    out = _ATEN_FLASH["forward"](q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, 0.0, causal, False,
                                 scale=softmax_scale)
    return out[0]


# FlashAttention-4 as custom ops: opaque to the compiler like `varlen_attn` (Dynamo cannot trace the CuTe DSL's
# launch path), so a compiled layer calls the kernels as they are. Its calling convention: q [T, Hq, D], k/v
# [T, Hkv, D] contiguous, the output [T, Hq, D] and the log-sum-exp [Hq, T] fp32, both freshly allocated and
# contiguous, as the fake functions promise the code compiled around the ops. The kernels are reached through
# `_FA4_KERNELS` so that a CPU test can put a stand-in of the same convention in their place.
def _fa4_forward(q, k, v, cu, max_seqlen, causal, scale):
    out, lse = _fa4_interface()._flash_attn_fwd(
        q, k, v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
        softmax_scale=scale, causal=causal, return_lse=True,
    )[:2]
    return out, lse


def _fa4_backward(g, q, k, v, out, lse, cu, max_seqlen, causal, scale):
    dq, dk, dv = _fa4_interface()._flash_attn_bwd(
        q, k, v, out, g, lse, softmax_scale=scale, causal=causal,
        cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=max_seqlen, max_seqlen_k=max_seqlen,
    )[:3]
    return dq, dk, dv


_FA4_KERNELS = {"forward": _fa4_forward, "backward": _fa4_backward}


@torch.library.custom_op("geo3k::fa4_varlen_fwd", mutates_args=())
def _fa4_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, lse = _FA4_KERNELS["forward"](q.contiguous(), k.contiguous(), v.contiguous(), cu, max_seqlen, causal, scale)
    return out.contiguous(), lse.contiguous()


@_fa4_fwd.register_fake
def _(q, k, v, cu, max_seqlen, causal, scale):
    return (q.new_empty(q.shape[0], q.shape[1], v.shape[2]),
            q.new_empty(q.shape[1], q.shape[0], dtype=torch.float32))


@torch.library.custom_op("geo3k::fa4_varlen_bwd", mutates_args=())
def _fa4_bwd(g: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
             cu: torch.Tensor, max_seqlen: int, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _FA4_KERNELS["backward"](g.contiguous(), q.contiguous(), k.contiguous(), v.contiguous(), out, lse, cu,
                                          max_seqlen, causal, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_fa4_bwd.register_fake
def _(g, q, k, v, out, lse, cu, max_seqlen, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


register_varlen_autograd(_fa4_fwd, _fa4_bwd)


def fa4_varlen_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], through FlashAttention-4's varlen kernels."""
    return _fa4_fwd(q, k, v, cu_seqlens, max_seqlen, causal, float(softmax_scale))[0]


def _sdpa_loop(q, k, v, cu_seqlens, causal, softmax_scale):
    if q.shape[1] != k.shape[1]:  # GQA: the same head mapping as the GPU backends (head h uses kv h // rep)
        k, v = _repeat_kv(k, v, q.shape[1] // k.shape[1])
    bounds = cu_seqlens.tolist()
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:]):
        if end == start:  # zero-length windows occur in Qwen2.5-VL's window attention
            continue
        # SDPA wants [heads, tokens, dim]
        qs, ks, vs = (t[start:end].transpose(0, 1) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=causal, scale=softmax_scale)
        out[start:end] = o.transpose(0, 1)
    return out


# ---------------------------------------------------------------------------------------------------
# Megatron-Core core attention
# ---------------------------------------------------------------------------------------------------


class VarlenCoreAttention(torch.nn.Module):
    """Megatron-Core `core_attention` submodule over packed sequences.

    Plugged in through `SelfAttentionSubmodules(core_attention=VarlenCoreAttention)`. The model passes
    `QwenPackedSeqParams(qkv_format="sbhd", cu_seqlens_q=..., max_seqlen_q=..., rope_cos=..., rope_sin=...)`:
    "sbhd" makes Megatron treat the packed sequence as one batch row, the cu_seqlens mark the samples, and
    q/k are rotated here with the per-token M-RoPE cos/sin (when given) before attention. Query/key/value arrive as [T, 1, heads, dim]
    (batch dimension 1) with this rank's share of heads; the output is [T, 1, heads * dim].
    """

    def __init__(
        self,
        config,
        layer_number: int,
        attn_mask_type,
        attention_type: str = "self",
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection=None,
        **kwargs,
    ):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType

        self.config = config
        self.layer_number = layer_number
        if attention_type != "self":
            raise ValueError("VarlenCoreAttention supports self-attention only")
        if config.context_parallel_size != 1:
            raise ValueError("VarlenCoreAttention does not support context parallelism; set context_parallel_size=1")
        if (attention_dropout if attention_dropout is not None else config.attention_dropout) != 0.0:
            raise ValueError("VarlenCoreAttention has no attention dropout (the Qwen recipes use none); set attention_dropout=0")
        self.causal = attn_mask_type in (AttnMaskType.causal, AttnMaskType.padding_causal)
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels**-0.5

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask=None,
        attn_mask_type=None,
        attention_bias=None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if packed_seq_params is None or packed_seq_params.cu_seqlens_q is None:
            raise ValueError("VarlenCoreAttention needs packed_seq_params with cu_seqlens_q (the packed layout)")
        if attention_bias is not None:
            raise ValueError("VarlenCoreAttention does not take an attention bias")
        if query.dim() == 4:
            assert query.shape[1] == 1, "packed input has batch dimension 1"
            query, key, value = query.squeeze(1), key.squeeze(1), value.squeeze(1)
        cos = getattr(packed_seq_params, "rope_cos", None)
        if cos is not None:
            # RoPE here rather than in Megatron's attention (the model builds GPTModel without it): one
            # fused kernel per tensor with cos/sin shared by all layers (train/models/fused.py).
            sin = packed_seq_params.rope_sin
            query, key = fused.rope(query, cos, sin), fused.rope(key, cos, sin)
        cache = getattr(packed_seq_params, "kv_cache", None)  # greedy decoding (kv_cache.py)
        if cache is not None and cache.decoding:
            out = cache.attend(self.layer_number, query, key, value, self.softmax_scale)
            return out.reshape(out.shape[0], 1, -1)
        if cache is not None:
            cache.store_prompt(self.layer_number, key, value)
        out = varlen_attention(
            query, key, value,
            packed_seq_params.cu_seqlens_q,
            packed_seq_params.max_seqlen_q,
            causal=self.causal,
            softmax_scale=self.softmax_scale,
        )
        return out.reshape(out.shape[0], 1, -1)


# ---------------------------------------------------------------------------------------------------
# transformers attention interface (vision encoder)
# ---------------------------------------------------------------------------------------------------

# transformers passes the per-image cu_seqlens only to implementations whose name contains "flash"
# (`is_flash_attention_requested`); other names get a Python loop over images. Registering under such a
# name routes the vision tower's packed images into `varlen_attention` in one call.
HF_ATTN_NAME = "geo3k_flash_varlen"


def _hf_varlen_attention(module, query, key, value, attention_mask=None, scaling=None, dropout=0.0,
                         cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, max_length_k=None,
                         is_causal=None, **kwargs):
    # transformers hands [batch=1, heads, tokens, dim] and wants [batch=1, tokens, heads, dim] back.
    if cu_seq_lens_q is None:
        raise ValueError(f"{HF_ATTN_NAME} is for packed vision input (cu_seq_lens_q is required)")
    if dropout:
        raise ValueError(f"{HF_ATTN_NAME} has no attention dropout")
    causal = bool(is_causal if is_causal is not None else getattr(module, "is_causal", False))
    q, k, v = (t.squeeze(0).transpose(0, 1) for t in (query, key, value))
    if max_length_q is None:
        max_length_q = int((cu_seq_lens_q[1:] - cu_seq_lens_q[:-1]).max())
    out = varlen_attention(q, k, v, cu_seq_lens_q, max_length_q, causal=causal, softmax_scale=scaling)
    return out.unsqueeze(0), None


@functools.cache
def register_hf_attention() -> str:
    """Registers the varlen kernel with transformers (idempotent) and returns its implementation name."""
    from transformers import AttentionInterface

    AttentionInterface.register(HF_ATTN_NAME, _hf_varlen_attention)
    return HF_ATTN_NAME


def use_varlen_attention(model: torch.nn.Module) -> None:
    """Route every attention module of a transformers model (text and vision) to the varlen kernel.

    Switched after construction: at construction transformers would try to load a flash-attn kernel for any name
    containing "flash". The attention modules read the name per call."""
    name = register_hf_attention()
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            config._attn_implementation = name
        for sub in ("text_config", "vision_config"):
            sub_config = getattr(config, sub, None)
            if sub_config is not None:
                sub_config._attn_implementation = name
