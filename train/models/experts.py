"""The experts of a MoE layer as two grouped GEMMs (`torch._grouped_mm`), without Transformer Engine.

Megatron-Core's MoE layer routes and dispatches the tokens (its router and token dispatcher, untouched) and
hands the experts module the tokens of this rank's experts sorted by expert, the number of tokens per expert
and each token's routing weight. `GroupedExperts` computes all local experts at once:

    h   = grouped_mm(x, gate_up_proj^T, offsets)      [tokens, 2 I]   one GEMM over every expert's rows
    a   = silu(h_gate) * h_up * routing weight        [tokens, I]
    out = grouped_mm(a, down_proj^T, offsets)         [tokens, hidden]

where `offsets` are the cumulative token counts (a small host-to-device copy of the counts the dispatcher
already holds on the host: no synchronisation per expert, none added per layer). Megatron-Core's own grouped
experts need the `grouped_gemm` package or Transformer Engine; its fallback, `SequentialMLP`, runs one GEMM
pair per expert from Python (128 of them per layer for Qwen3-VL-30B-A3B), ~48x slower on an H200.

Weights are held as transformers holds them (`gate_up_proj` [E, 2 I, hidden], gate rows first;
`down_proj` [E, hidden, I]), so the checkpoint converter only moves tensors. Under tensor parallelism each rank
holds a slice of I of every local expert (gate and up sliced alike), as Megatron's expert tensor parallelism
does (its size follows tensor_parallel); under expert parallelism each rank holds E / ep whole experts.

`torch._grouped_mm` covers bf16 (and fp16) on Hopper GPUs and fp32 on CPU in recent PyTorch; elsewhere (older
PyTorch, fp32 on a GPU, `train.moe_grouped_gemm: false`) the same function is computed by a loop over the
experts, which is also the reference the grouped path is tested against.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward hands on a contiguous gradient: `_grouped_mm`'s backward rejects the stride-0
    gradients an expand (a `.sum()` downstream) produces."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


@functools.cache
def _grouped_mm_runs(device_type: str, dtype: torch.dtype) -> bool:
    """Whether this PyTorch has `_grouped_mm` for this device and dtype, with a backward (probed once)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device_type == "cuda":
        return dtype in (torch.bfloat16, torch.float16) and torch.cuda.get_device_capability()[0] >= 9
    try:
        with torch.enable_grad():  # the first call may come from a forward under no_grad
            return _probe(dtype)
    except (RuntimeError, NotImplementedError):
        return False


def _probe(dtype: torch.dtype) -> bool:
    x = torch.ones(4, 8, dtype=dtype, requires_grad=True)
    w = torch.ones(2, 8, 8, dtype=dtype, requires_grad=True)
    torch._grouped_mm(x, w.transpose(1, 2), offs=torch.tensor([1, 4], dtype=torch.int32)).backward(torch.ones(4, 8, dtype=dtype))
    return True


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor | None, grouped: bool) -> torch.Tensor:
    """Rows of x (sorted by expert, counts[e] rows for expert e) times weight[e]^T: [T, K] x [E, N, K] -> [T, N]."""
    if grouped and offsets is not None and _grouped_mm_runs(x.device.type, x.dtype):
        return _ContiguousGrad.apply(torch._grouped_mm(x, weight.transpose(1, 2), offs=offsets))
    parts = x.split(counts.tolist())
    return torch.cat([F.linear(p, weight[e]) for e, p in enumerate(parts)])


class GroupedExperts(MegatronModule):
    """The local experts of one MoE layer (the `experts` submodule of Megatron-Core's MoELayer)."""

    def __init__(self, num_local_experts: int, config, pg_collection=None, grouped: bool = True):
        from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

        super().__init__(config=config)
        if config.add_bias_linear or not config.gated_linear_unit or config.activation_func is not F.silu:
            raise ValueError("GroupedExperts computes SwiGLU experts without biases (Qwen3-VL-MoE)")
        tp = pg_collection.expt_tp.size() if pg_collection is not None else 1
        if config.moe_ffn_hidden_size % tp:
            raise ValueError(f"moe_intermediate_size {config.moe_ffn_hidden_size} is not divisible by tensor_parallel={tp}")
        self.num_local_experts = num_local_experts
        inter, hidden = config.moe_ffn_hidden_size // tp, config.hidden_size
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        kw = dict(dtype=config.params_dtype, device=device)
        self.gate_up_proj = torch.nn.Parameter(torch.empty(num_local_experts, 2 * inter, hidden, **kw))
        self.down_proj = torch.nn.Parameter(torch.empty(num_local_experts, hidden, inter, **kw))
        if config.perform_initialization:
            self._init_weights(config)
        expert_parallel = config.expert_model_parallel_size > 1
        for p, dim in ((self.gate_up_proj, 1), (self.down_proj, 2)):
            # split over expert-tensor-parallel ranks (so the gradient norm sums them) and, with expert
            # parallelism, different on every EP rank: Megatron's DDP then reduces them over the
            # expert-data-parallel group (allreduce=False), as it does for its own experts
            set_tensor_model_parallel_attributes(p, is_parallel=True, dim=dim, stride=1)
            p.allreduce = not expert_parallel
            p.is_expert_weight = True
        self.grouped = grouped
        """False: one GEMM pair per expert (the reference; `train.moe_grouped_gemm: false`)."""

    def _init_weights(self, config) -> None:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker, get_expert_parallel_rng_tracker_name

        # on GPUs the expert-parallel RNG stream, so that EP ranks draw different experts (Megatron's convention)
        fork = get_cuda_rng_tracker().fork(get_expert_parallel_rng_tracker_name()) if torch.cuda.is_available() else contextlib.nullcontext()
        with fork:
            for e in range(self.num_local_experts):
                config.init_method(self.gate_up_proj.data[e])
                config.output_layer_init_method(self.down_proj.data[e])

    def forward(self, tokens: torch.Tensor, tokens_per_expert: torch.Tensor, probs: torch.Tensor):
        """tokens [T, hidden] sorted by local expert, tokens_per_expert [E_local] (host), probs [T] -> ([T, hidden], None)."""
        counts = tokens_per_expert.cpu() if tokens_per_expert.is_cuda else tokens_per_expert
        offsets = None
        if self.grouped and tokens.shape[0]:
            offsets = counts.cumsum(0).to(torch.int32)
            if tokens.is_cuda:
                offsets = offsets.pin_memory().to(tokens.device, non_blocking=True)
        h = grouped_linear(tokens, self.gate_up_proj, counts, offsets, self.grouped)
        gate, up = h.chunk(2, dim=-1)
        # the routing weight before the second GEMM, as Megatron's experts apply it (the same by linearity)
        act = (F.silu(gate) * up * probs.unsqueeze(-1)).to(tokens.dtype)
        return grouped_linear(act, self.down_proj, counts, offsets, self.grouped), None
