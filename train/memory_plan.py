"""How much memory each GPU needs, from the model config and the train settings, before any GPU is touched.

    geo3k train --plan [--nproc N] [--set train.tensor_parallel=...]     # prints this, trains nothing

The plan counts the model's parameters exactly (transformers builds it on the meta device: no memory) and
sorts them the way the layout places them:

- vision tower and norms: whole on every rank (replicated over tensor parallelism);
- vocabulary (embedding, LM head) and the language model's matrices: split over TP;
- experts: split over TP x EP.

Megatron backend, bf16 (per parameter held on the GPU): 2 bytes of bf16 weights, 4 of fp32 gradient buffer (2 with
train.grad_reduce_in_fp32 off), and 12 of fp32 master weight + Adam moments, the latter sharded by the distributed
optimizer over the data-parallel ranks (the experts over the expert-data-parallel ranks). FSDP: fp32 master weights, gradients and Adam moments
(16 bytes) sharded over all ranks, plus bf16 copies of the largest blocks being gathered and the root's
parameters (embeddings, LM head, patch embedding and mergers), which stay gathered.

Activations for one micro-batch of `max_tokens_per_gpu` tokens, of which a share are image tokens (4 patches
each through the vision tower): what backward keeps per token per layer in bf16 (the norm outputs, q/k/v,
the attention output, the MLP's two projections and SwiGLU output; for MoE layers every routed copy of a
token through the experts), divided by TP under sequence parallelism; with full recomputation only each
layer's input plus one layer's activations. `ACTIVATION_OVERHEAD` covers what this count leaves out (the
allocator's cache and fragmentation, temporaries, attention statistics); it is calibrated on the measured
peak of one run and checked against the others (BENCHMARKS.md, "Memory plan").
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

GIB = 2**30
ACTIVATION_OVERHEAD = 1.3
"""Peak over counted activations (calibrated, see the module docstring)."""
WORKSPACE_BYTES = 2 * GIB
"""CUDA context, kernels and library workspaces."""
H200_BYTES = 143_771 * 2**20
"""What an H200 reports (torch.cuda.get_device_properties): the card `geo3k train --plan` prints a plan against."""


@dataclass
class ParamCounts:
    vision: int = 0
    vocab: int = 0  # embedding + untied LM head
    split: int = 0  # the language model's matrices (TP-split)
    norms: int = 0  # 1-D weights of the language model
    experts: int = 0
    largest_block: int = 0  # parameters of the largest decoder layer or vision block (FSDP gathers them)
    root: int = 0  # parameters outside the blocks (FSDP keeps them gathered)

    @property
    def total(self) -> int:
        return self.vision + self.vocab + self.split + self.norms + self.experts


def count_parameters(hf_config) -> ParamCounts:
    """Exact counts, by the role each parameter plays in a parallel layout."""
    return _count(hf_config.to_json_string())


@functools.lru_cache(maxsize=8)
def _count(config_json: str) -> ParamCounts:
    import json

    import torch
    from transformers import AutoConfig
    from transformers import AutoModelForImageTextToText

    hf_config = AutoConfig.for_model(**json.loads(config_json))
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(hf_config)
    c = ParamCounts()
    for name, p in model.named_parameters():
        n = p.numel()
        if ".visual." in name or name.startswith("visual."):
            c.vision += n
        elif "embed_tokens" in name or name.startswith("lm_head"):
            c.vocab += n
        elif ".experts." in name:
            c.experts += n
        elif p.dim() == 1:
            c.norms += n
        else:
            c.split += n
    block_names = set(model._no_split_modules or [])
    blocks = [m for m in model.modules() if type(m).__name__ in block_names]
    c.largest_block = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    c.root = c.total - sum(sum(p.numel() for p in b.parameters()) for b in blocks)
    return c


@dataclass
class MemoryPlan:
    layout: str
    weights: float
    grads: float
    optimizer: float
    activations: float
    workspace: float = WORKSPACE_BYTES
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.workspace

    def lines(self, card_bytes: float | None = None) -> list[str]:
        row = lambda name, b: f"  {name:<12}{b / GIB:8.1f} GiB"  # noqa: E731
        out = [f"memory per GPU: {self.layout}"]
        out += [row("weights", self.weights), row("gradients", self.grads), row("optimizer", self.optimizer),
                row("activations", self.activations), row("workspace", self.workspace), row("total", self.total)]
        if card_bytes:
            out.append(f"  of {card_bytes / GIB:.0f} GiB on the card: {'fits' if self.fits(card_bytes) else 'does NOT fit'}")
        out += [f"  note: {n}" for n in self.notes]
        return out

    def fits(self, card_bytes: float) -> bool:
        return self.total <= 0.95 * card_bytes


def _activation_bytes_per_token_layer(h: int, q: int, kv: int, f: int) -> int:
    """bf16 bytes one token leaves for backward in a dense decoder layer (or vision block)."""
    return 2 * (2 * h + (q + 2 * kv) + q + h + h + 2 * f + f) + 2 * h  # + residual stream


def plan(hf_config, tc, world_size: int, image_token_fraction: float = 0.85) -> MemoryPlan:
    """The per-GPU plan of training `hf_config` with TrainConfig `tc` on `world_size` GPUs."""
    c = count_parameters(hf_config)
    t, v = hf_config.text_config, hf_config.vision_config
    tp, ep = tc.tensor_parallel, tc.expert_parallel
    dp = max(1, world_size // tp)
    edp = max(1, world_size // (tp * ep))
    notes = []
    if tc.backend == "fsdp":
        held = c.total / world_size
        # bf16 copies beside the fp32 shards: several processes gather a layer or two at a time; one process keeps
        # the whole model gathered (one FSDP group) and a micro-batch's bf16 gradients until its backward ends
        one = world_size == 1
        weights = 4 * held + 2 * (c.total if one else 2 * c.largest_block + c.root)
        grads, optimizer = 4 * held + (2 * c.total if one else 0), 8 * held
        layout = f"FSDP over {world_size} GPU(s), {'bf16' if tc.bf16 else 'fp32'}"
        if one:
            notes.append(f"the step's gradient reduction copies the float32 gradients once: +{8 * c.total / GIB:.1f} "
                         "GiB for a moment, after the activations are freed")
        else:
            notes.append(f"eval gathers the whole model: +{2 * c.total / GIB:.1f} GiB of bf16 weights while it runs")
    else:
        dense = c.vision + c.norms + (c.vocab + c.split) / tp
        experts = c.experts / (tp * ep)
        weights = 2 * (dense + experts) if tc.bf16 else 4 * (dense + experts)
        grads = (4 if tc.grad_reduce_in_fp32 or not tc.bf16 else 2) * (dense + experts)
        optimizer = 12 * (dense / dp + experts / edp) if tc.bf16 else 8 * (dense + experts)
        layout = (f"Megatron, {world_size} GPU(s): TP {tp}{' + SP' if tc.sequence_parallel else ''}, EP {ep}, DP {dp}, "
                  f"{'bf16' if tc.bf16 else 'fp32'}, recompute {tc.recompute}")
    tokens = tc.max_tokens_per_gpu
    patches = 4 * image_token_fraction * tokens
    vh = getattr(v, "hidden_size", None) or v.embed_dim
    hd = getattr(t, "head_dim", None) or t.hidden_size // t.num_attention_heads
    q, kv = t.num_attention_heads * hd, t.num_key_value_heads * hd
    num_experts = getattr(t, "num_experts", 0) or 0
    dense_layers = set(getattr(t, "mlp_only_layers", []) or []) if num_experts else set(range(t.num_hidden_layers))
    per_layer = []
    for i in range(t.num_hidden_layers):
        if i in dense_layers:
            per_layer.append(_activation_bytes_per_token_layer(t.hidden_size, q, kv, t.intermediate_size))
        else:  # attention as dense; each of the top-k copies of a token: its input, fc1 output, SwiGLU output
            k, inter = t.num_experts_per_tok, t.moe_intermediate_size
            attn = _activation_bytes_per_token_layer(t.hidden_size, q, kv, 0)
            per_layer.append(attn + 2 * k * (t.hidden_size + 3 * inter) + 4 * num_experts)
    vision_layer = _activation_bytes_per_token_layer(vh, vh, vh, getattr(v, "intermediate_size", 4 * vh))
    shard = tp if tc.sequence_parallel else 1
    if tc.recompute == "full":
        lm = tokens * (2 * t.hidden_size * t.num_hidden_layers + max(per_layer)) / shard
    else:
        lm = tokens * sum(per_layer) / shard
    vision = patches * vision_layer * v.depth
    head = 0.0
    if tc.backend == "megatron" and tc.sequence_parallel:
        head = 4 * tokens * t.vocab_size / tp  # the full LM head runs under SP: fp32 logits of every token
        notes.append("sequence parallelism computes the LM head on every token (fp32 logits)")
    activations = ACTIVATION_OVERHEAD * (lm + vision + head)
    return MemoryPlan(layout=layout, weights=weights, grads=grads, optimizer=optimizer, activations=activations, notes=notes)


def advice(p: MemoryPlan, tc, world_size: int, hf_config) -> str:
    """What to change when a plan does not fit."""
    tips = []
    if getattr(hf_config.text_config, "num_experts", 0) and tc.backend == "megatron":
        tips.append("more GPUs with train.expert_parallel (experts are most of the weights)")
    if tc.backend == "megatron" and p.optimizer > p.activations:
        tips.append("more GPUs (the distributed optimizer shards its 12 bytes per parameter over data-parallel ranks)")
    if tc.backend == "megatron":
        tips.append("train.tensor_parallel (splits weights and, with sequence_parallel, activations)")
    if tc.recompute != "full" and p.activations > 0.2 * p.total:
        tips.append("train.recompute=full")
    if p.activations > 0.2 * p.total:
        tips.append("a smaller train.max_tokens_per_gpu")
    return "; ".join(tips)
