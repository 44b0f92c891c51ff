"""cuDNN's fused attention over packed sequences, through NVIDIA's cudnn-frontend Python package (`import cudnn`;
`pip install nvidia-cudnn-frontend`), for the ``cudnn_frontend`` attention backend (train/models/attention.py).

Why: FlashAttention-2 runs the vision tower's attention (head size 64, non-causal, one segment per image) at
~180 TFLOP/s on Hopper and is the largest cost after the matrix products (docs/performance.md, "Attention");
cuDNN's Hopper kernels are the faster ones this torch (2.11) can reach, and its own packed path
(`aten._cudnn_attention_forward` with cumulative lengths) gave wrong output there. The frontend builds cuDNN
operation graphs directly, against the cuDNN library torch already loads.

The layout: q [T, Hq, D], k/v [T, Hkv, D] described to cuDNN as [B, H, S, D] with per-segment ("ragged") element
offsets and lengths, B segments of at most S tokens. A cuDNN graph is built per shape of that description, and the
backward's also per packed token total (it sizes an accumulator), so the three are rounded up to buckets: the
segment count with empty segments at the end, S and the total to multiples. Otherwise every micro-batch, with its
own image count and largest image, would build (and compile) new graphs. The log-sum-exp the backward needs stays
in the padded [B, Hq, S, 1] layout both ways (cuDNN's packed one is not accepted by every backward).

Lengths and offsets are computed on the device from `cu_seqlens` (no host sync) and kept for the tensor they came
from, so the 24 vision blocks (and 28 decoder layers) of a micro-batch, forward and backward, compute them once.

Custom ops with fake functions: a compiled layer calls the kernels as opaque ops, as it does FlashAttention-4's.
The kernels are reached through `_KERNELS` so that a CPU test can put a stand-in of the same convention in their
place; the graphs themselves need a GPU (bench/gpu_attention.py checks them against an fp32 reference there).
"""

from __future__ import annotations

import collections
import functools
import time

import torch

from train.models.kernel_ops import register_varlen_autograd

# The frontend release this was written against (the graph API's keyword names move between releases):
# bench/gpu_run.sh prepare-cudnn downloads it.
FRONTEND = "nvidia-cudnn-frontend==1.32.0"

# Bucket sizes: the segment count to a multiple of 8, the longest segment (S) to a multiple of 256, the backward's
# token total to a multiple of 2,048. Coarser buckets mean fewer graphs and more padded rows in each kernel's grid
# (rows past a segment's length do no work, but are scheduled).
SEGMENT_BUCKET, LENGTH_BUCKET, TOTAL_BUCKET = 8, 256, 2048


def _ceil_to(n, multiple):
    # plain integer arithmetic: the fake functions below call it with symbolic sizes
    return (n + multiple - 1) // multiple * multiple


def padded_segments(n):
    return _ceil_to(n, SEGMENT_BUCKET)


def padded_length(s):
    return _ceil_to(s, LENGTH_BUCKET)


def padded_total(t):
    return _ceil_to(t, TOTAL_BUCKET)


@functools.cache
def frontend():
    """The `cudnn` module, or None where it is not installed or cannot load its library."""
    try:
        import cudnn

        cudnn.backend_version()
    except Exception:  # ImportError, or no loadable libcudnn: the other backends serve
        return None
    return cudnn


def runs_on(device: torch.device) -> bool:
    """CUDA (not ROCm) Hopper or newer, with the frontend importable."""
    return (device.type == "cuda" and torch.version.hip is None and torch.cuda.get_device_capability(device)[0] >= 9
            and frontend() is not None)


# ---------------------------------------------------------------------------------------------------
# Per-segment lengths and offsets
# ---------------------------------------------------------------------------------------------------

def segment_metadata(cu: torch.Tensor, segments: int, token_strides) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """`cu` (int32 [n + 1], 0 .. T) described as `segments` >= n segments, the last `segments - n` empty at T:
    int32 lengths [segments, 1, 1, 1] and, per token stride, int64 element offsets [segments + 1, 1, 1, 1]
    (a tensor's segment b starts at offset[b] elements). Device ops only."""
    cu64 = cu.to(torch.int64)
    n = cu64.numel() - 1
    if segments > n:
        cu64 = torch.cat([cu64, cu64[-1:].expand(segments - n)])
    lengths = (cu64[1:] - cu64[:-1]).to(torch.int32).view(-1, 1, 1, 1)
    return lengths, {s: (cu64 * s).view(-1, 1, 1, 1) for s in sorted(set(token_strides))}


class _MetadataCache:
    """segment_metadata per cu_seqlens tensor, for the last few tensors. An entry holds a reference to its tensor,
    so no other tensor can take its memory while the entry lives: (address, version counter) then names its
    contents. Inference tensors have no version counter and are not cached."""

    def __init__(self, size: int = 8):
        self.size, self.entries = size, collections.OrderedDict()

    def get(self, cu: torch.Tensor, segments: int, token_strides) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        strides = tuple(sorted(set(token_strides)))
        try:
            key = (cu.data_ptr(), cu._version, cu.numel(), cu.device, segments, strides)
        except RuntimeError:  # an inference tensor
            return segment_metadata(cu, segments, strides)
        hit = self.entries.get(key)
        if hit is not None:
            self.entries.move_to_end(key)
            return hit[1]
        value = segment_metadata(cu, segments, strides)
        self.entries[key] = (cu, value)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)
        return value


_METADATA = _MetadataCache()


# ---------------------------------------------------------------------------------------------------
# Graphs
# ---------------------------------------------------------------------------------------------------

class _Uid:
    Q, K, V, O, STATS, DO, DQ, DK, DV = 1, 2, 3, 4, 5, 6, 7, 8, 9
    SEQ_Q, SEQ_KV, OFF_Q, OFF_K, OFF_V, OFF_O, OFF_DQ, OFF_DK, OFF_DV = 10, 11, 12, 13, 14, 15, 16, 17, 18


# Built graphs by shape key, and what building them cost (bench/gpu_attention.py reports it).
_GRAPHS: dict[tuple, tuple] = {}
BUILDS = {"count": 0, "seconds": 0.0}


@functools.cache
def _handle(device_index: int):
    with torch.cuda.device(device_index):
        return frontend().create_handle()


def _bound_handle(device: torch.device):
    handle = _handle(device.index if device.index is not None else torch.cuda.current_device())
    frontend().set_stream(handle=handle, stream=torch.cuda.current_stream(device).cuda_stream)
    return handle


def _graph(key, build):
    hit = _GRAPHS.get(key)
    if hit is None:
        start = time.perf_counter()
        hit = _GRAPHS[key] = build()
        BUILDS["count"] += 1
        BUILDS["seconds"] += time.perf_counter() - start
    return hit


def _io_type(dtype: torch.dtype):
    cudnn = frontend()
    return {torch.bfloat16: cudnn.data_type.BFLOAT16, torch.float16: cudnn.data_type.HALF}[dtype]


def _describe(g, name, uid, t: torch.Tensor, B: int, S: int, io, offsets):
    """A packed [T, H, D] tensor as a [B, H, S, D] graph tensor with ragged offsets: its own token and head
    strides, the batch stride a placeholder (the offsets give each segment's start)."""
    st, sh, sd = t.stride()
    tensor = g.tensor(name=name, dim=[B, t.shape[1], S, t.shape[2]], stride=[S * st, sh, st, sd], data_type=io, uid=uid)
    tensor.set_ragged_offset(offsets)
    return tensor


def _packed_output(tensor, uid, B, H, S, D, io, offsets):
    tensor.set_uid(uid).set_output(True).set_dim([B, H, S, D]).set_stride([S * H * D, D, H * D, 1]).set_data_type(io)
    tensor.set_ragged_offset(offsets)


def _offset_tensor(g, name, uid, B):
    cudnn = frontend()
    return g.tensor(name=name, dim=[B + 1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT64, uid=uid)


def _length_tensors(g, B):
    cudnn = frontend()
    return [g.tensor(name=name, dim=[B, 1, 1, 1], stride=[1, 1, 1, 1], data_type=cudnn.data_type.INT32, uid=uid)
            for name, uid in (("seq_len_q", _Uid.SEQ_Q), ("seq_len_kv", _Uid.SEQ_KV))]


def _mask(causal: bool) -> dict:
    # causal inside each segment: no column right of the diagonal, aligned top-left (queries and keys are the
    # same tokens); the padding mask keeps every row and column inside its segment's length
    cudnn = frontend()
    return dict(diagonal_alignment=cudnn.diagonal_alignment.TOP_LEFT, **({"diagonal_band_right_bound": 0} if causal else {}))


def _new_graph(dtype: torch.dtype, handle):
    cudnn = frontend()
    io = _io_type(dtype)
    return cudnn.pygraph(handle=handle, io_data_type=io, intermediate_data_type=cudnn.data_type.FLOAT,
                         compute_data_type=cudnn.data_type.FLOAT), io


def _finish(g):
    cudnn = frontend()
    g.validate()
    g.build_operation_graph()
    g.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
    g.check_support()
    g.build_plans()
    return g, g.get_workspace_size()


def _forward_graph(q, k, v, B, S, causal, scale, handle):
    cudnn = frontend()
    g, io = _new_graph(q.dtype, handle)
    offsets = {uid: _offset_tensor(g, name, uid, B) for name, uid in
               (("off_q", _Uid.OFF_Q), ("off_k", _Uid.OFF_K), ("off_v", _Uid.OFF_V), ("off_o", _Uid.OFF_O))}
    tq = _describe(g, "q", _Uid.Q, q, B, S, io, offsets[_Uid.OFF_Q])
    tk = _describe(g, "k", _Uid.K, k, B, S, io, offsets[_Uid.OFF_K])
    tv = _describe(g, "v", _Uid.V, v, B, S, io, offsets[_Uid.OFF_V])
    seq_q, seq_kv = _length_tensors(g, B)
    o, stats = g.sdpa(name="sdpa", q=tq, k=tk, v=tv, generate_stats=True, attn_scale=scale, use_padding_mask=True,
                      seq_len_q=seq_q, seq_len_kv=seq_kv, **_mask(causal))
    H, D = q.shape[1], v.shape[2]
    _packed_output(o, _Uid.O, B, H, S, D, io, offsets[_Uid.OFF_O])
    stats.set_uid(_Uid.STATS).set_output(True).set_dim([B, H, S, 1]).set_stride([H * S, S, 1, 1]) \
        .set_data_type(cudnn.data_type.FLOAT)
    return _finish(g)


def _backward_graph(q, k, v, o, B, S, total, causal, scale, handle):
    cudnn = frontend()
    g, io = _new_graph(q.dtype, handle)
    names = (("off_q", _Uid.OFF_Q), ("off_k", _Uid.OFF_K), ("off_v", _Uid.OFF_V), ("off_o", _Uid.OFF_O),
             ("off_dq", _Uid.OFF_DQ), ("off_dk", _Uid.OFF_DK), ("off_dv", _Uid.OFF_DV))
    offsets = {uid: _offset_tensor(g, name, uid, B) for name, uid in names}
    tq = _describe(g, "q", _Uid.Q, q, B, S, io, offsets[_Uid.OFF_Q])
    tk = _describe(g, "k", _Uid.K, k, B, S, io, offsets[_Uid.OFF_K])
    tv = _describe(g, "v", _Uid.V, v, B, S, io, offsets[_Uid.OFF_V])
    to = _describe(g, "o", _Uid.O, o, B, S, io, offsets[_Uid.OFF_O])
    tdo = _describe(g, "do", _Uid.DO, o, B, S, io, offsets[_Uid.OFF_O])  # dO is made to share O's layout
    H, D = q.shape[1], q.shape[2]
    stats = g.tensor(name="stats", dim=[B, H, S, 1], stride=[H * S, S, 1, 1], data_type=cudnn.data_type.FLOAT,
                     uid=_Uid.STATS)
    seq_q, seq_kv = _length_tensors(g, B)
    dq, dk, dv = g.sdpa_backward(name="sdpa_backward", q=tq, k=tk, v=tv, o=to, dO=tdo, stats=stats, attn_scale=scale,
                                 use_padding_mask=True, seq_len_q=seq_q, seq_len_kv=seq_kv,
                                 max_total_seq_len_q=total, max_total_seq_len_kv=total, **_mask(causal))
    _packed_output(dq, _Uid.DQ, B, H, S, D, io, offsets[_Uid.OFF_DQ])
    _packed_output(dk, _Uid.DK, B, k.shape[1], S, D, io, offsets[_Uid.OFF_DK])
    _packed_output(dv, _Uid.DV, B, v.shape[1], S, v.shape[2], io, offsets[_Uid.OFF_DV])
    return _finish(g)


def _operand(t: torch.Tensor) -> torch.Tensor:
    """`t` [T, H, D] as cuDNN's ragged layout takes it: token-major (each token's heads together, any gap between
    tokens, as q/k/v split from one projection have), the head dimension dense, a 16-byte aligned base. Anything
    else (a head-major view, say) is copied contiguous."""
    st, sh, sd = t.stride()
    if sd == 1 and sh >= t.shape[2] and st >= sh * t.shape[1] and t.data_ptr() % 16 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _strides_key(*tensors):
    return tuple(t.stride() for t in tensors)


def _cudnn_forward(q, k, v, cu, max_seqlen, causal, scale):
    q, k, v = _operand(q), _operand(k), _operand(v)
    B, S = padded_segments(cu.numel() - 1), padded_length(max_seqlen)
    T, H, D = q.shape[0], q.shape[1], v.shape[2]
    handle = _bound_handle(q.device)
    key = ("forward", q.dtype, B, S, H, k.shape[1], q.shape[2], D, _strides_key(q, k, v), causal, scale, q.device)
    g, workspace_size = _graph(key, lambda: _forward_graph(q, k, v, B, S, causal, scale, handle))
    out = q.new_empty(T, H, D)
    stats = torch.empty(B, H, S, 1, dtype=torch.float32, device=q.device)
    lengths, offsets = _METADATA.get(cu, B, (q.stride(0), k.stride(0), v.stride(0), H * D))
    buffers = {_Uid.Q: q, _Uid.K: k, _Uid.V: v, _Uid.O: out, _Uid.STATS: stats, _Uid.SEQ_Q: lengths,
               _Uid.SEQ_KV: lengths, _Uid.OFF_Q: offsets[q.stride(0)], _Uid.OFF_K: offsets[k.stride(0)],
               _Uid.OFF_V: offsets[v.stride(0)], _Uid.OFF_O: offsets[H * D]}
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=q.device)
    g.execute(list(buffers.values()), workspace, handle=handle, tensor_uids=list(buffers))
    return out, stats


def _cudnn_backward(grad, q, k, v, out, stats, cu, max_seqlen, causal, scale):
    q, k, v, out = _operand(q), _operand(k), _operand(v), _operand(out)
    grad = grad if grad.stride() == out.stride() and grad.data_ptr() % 16 == 0 else \
        torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device).copy_(grad)
    B, S, total = padded_segments(cu.numel() - 1), padded_length(max_seqlen), padded_total(q.shape[0])
    T, H, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[2]
    handle = _bound_handle(q.device)
    key = ("backward", q.dtype, B, S, total, H, Hkv, D, Dv, _strides_key(q, k, v, out), causal, scale, q.device)
    g, workspace_size = _graph(key, lambda: _backward_graph(q, k, v, out, B, S, total, causal, scale, handle))
    dq, dk, dv = q.new_empty(T, H, D), k.new_empty(k.shape[0], Hkv, D), v.new_empty(v.shape[0], Hkv, Dv)
    lengths, offsets = _METADATA.get(cu, B, (q.stride(0), k.stride(0), v.stride(0), out.stride(0), H * D, Hkv * D, Hkv * Dv))
    buffers = {_Uid.Q: q, _Uid.K: k, _Uid.V: v, _Uid.O: out, _Uid.DO: grad, _Uid.STATS: stats, _Uid.DQ: dq,
               _Uid.DK: dk, _Uid.DV: dv, _Uid.SEQ_Q: lengths, _Uid.SEQ_KV: lengths,
               _Uid.OFF_Q: offsets[q.stride(0)], _Uid.OFF_K: offsets[k.stride(0)], _Uid.OFF_V: offsets[v.stride(0)],
               _Uid.OFF_O: offsets[out.stride(0)], _Uid.OFF_DQ: offsets[H * D], _Uid.OFF_DK: offsets[Hkv * D],
               _Uid.OFF_DV: offsets[Hkv * Dv]}
    workspace = torch.empty(max(workspace_size, 1), dtype=torch.uint8, device=q.device)
    g.execute(list(buffers.values()), workspace, handle=handle, tensor_uids=list(buffers))
    return dq, dk, dv


_KERNELS = {"forward": _cudnn_forward, "backward": _cudnn_backward}


# ---------------------------------------------------------------------------------------------------
# Custom ops and autograd
# ---------------------------------------------------------------------------------------------------

@torch.library.custom_op("geo3k::cudnn_varlen_fwd", mutates_args=())
def _fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool,
         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out, stats = _KERNELS["forward"](q, k, v, cu, max_seqlen, causal, scale)
    return out.contiguous(), stats


@_fwd.register_fake
def _(q, k, v, cu, max_seqlen, causal, scale):
    B, S = padded_segments(cu.shape[0] - 1), padded_length(max_seqlen)
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(B, q.shape[1], S, 1, dtype=torch.float32)


@torch.library.custom_op("geo3k::cudnn_varlen_bwd", mutates_args=())
def _bwd(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
         stats: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool,
         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dq, dk, dv = _KERNELS["backward"](grad, q, k, v, out, stats, cu, max_seqlen, causal, scale)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


@_bwd.register_fake
def _(grad, q, k, v, out, stats, cu, max_seqlen, causal, scale):
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


register_varlen_autograd(_fwd, _bwd)


def cudnn_varlen_attn(q, k, v, cu_seqlens, max_seqlen, causal, softmax_scale):
    """q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], attention inside each cu_seqlens segment, through cuDNN."""
    return _fwd(q, k, v, cu_seqlens, max_seqlen, causal, float(softmax_scale))[0]
