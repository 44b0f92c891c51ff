"""Whole-layer `torch.compile`: each decoder layer of the language model and each block of the vision
tower runs as one compiled graph forward and one backward.

Why: on one GPU the Qwen3-VL-2B step is host-bound (docs/performance.md, "Where the time goes"): the GPU
runs a micro-batch's forward faster than Python launches it, op by op, through Megatron's layers and
transformers' vision blocks. A compiled layer is one call into a graph whose element-wise work Inductor has
fused between the matrix products, so the launching thread does a fraction of the work per layer.

How it stays cheap to compile and correct:
- One compiled function per layer *class*, shared by every layer of it: Dynamo takes the parameters as
  graph inputs, so the 28 decoder layers reuse one graph (and the 24 vision blocks another, plus one for the
  first block, whose input is a view: Dynamo guards on a view's base) instead of compiling each. Anything that differs per layer must stay outside: deepstack's per-layer addition does
  (`DeepstackTransformerLayer.compiled_forward`).
- `dynamic=True`: the token count, the number of samples (cu_seqlens) and max_seqlen change with every
  micro-batch; parameter shapes stay static (torch's default), so the hidden sizes are specialised.
- Megatron-Core 0.16.1's RowParallelLinear passes `tp_group=None` and so calls `warnings.warn`
  (a DeprecationWarning) on every forward. Dynamo cannot trace `warnings.warn` and would split each layer
  in two there; inside compiled code it is replaced by a no-op below (eager code still warns).
- The attention kernels are opaque custom ops to the compiler (`varlen_attn`); the backend is chosen once
  when the graph is traced (attention.select_backend), and the graph guards on `train.attention_backend` and
  `train.vision_attention_backend`, so naming another backend later traces a new graph instead of reusing the old
  kernel.

Applied on GPUs (`train.compile_layers`) by both engines, with no activation recomputation: the Megatron engine's
`compile_layers` (dense layers whole, MoE layers' attention half, tensor-parallel size 1) and the FSDP engine's
`compile_hf_layers` (transformers' decoder layers and vision blocks, after `fully_shard`). Recomputation re-runs
layers inside a checkpoint function and tensor parallelism adds collectives to the layer: both untested compiled.
"""

from __future__ import annotations

import contextlib
import functools
import warnings

import torch


@functools.cache
def _install_warn_substitute() -> None:
    @torch.compiler.substitute_in_graph(warnings.warn, skip_signature_check=True)
    def _warn_in_graph(*args, **kwargs):
        return None


def _inductor_options() -> dict:
    """Inductor's mix-order reduction (Triton) fuses a norm's backward row reduction with its weight-gradient column
    reduction, but only past size thresholds that it checks on the token count (tokens x hidden >= 5 Mi, tokens >=
    2 x hidden, tokens >= 4096) and turns into guards: on an H100 the decoder layer compiled 3 times and the vision
    block 4 (ranges such as 2560 <= tokens <= 4095), the last ones whenever a micro-batch of a new range first came,
    some steps into training. Its non-strict mode skips those heuristics (fuses at every size), so one graph serves
    every micro-batch length; a torch without that mode leaves the fusion out, for the same reason."""
    triton = torch._inductor.config.triton
    if hasattr(triton, "mix_order_reduction_non_strict_mode"):
        return {"triton.mix_order_reduction_non_strict_mode": True}
    if hasattr(triton, "mix_order_reduction"):
        return {"triton.mix_order_reduction": False}
    return {}


@functools.cache
def _compiled(fn, cpp_wrapper: bool = False):
    """fn compiled; cpp_wrapper: Inductor writes the code that calls a graph's kernels in C++ rather than Python
    (train.compile_cpp_wrapper): the host's cost per kernel launch, which the GPU waits on in a host-bound step,
    for a longer first compile (a C++ build per graph)."""
    _install_warn_substitute()
    # A safety margin: past Dynamo's default limit of 8 graphs per function a new shape would run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
    options = _inductor_options() | ({"cpp_wrapper": True} if cpp_wrapper else {})
    return _skipping_guards_when_asked(torch.compile(fn, dynamic=True, options=options))


_skip_guards = False
"""Set inside `skipping_guards()`: the compiled layers' calls then check only the guards that tell their graphs apart."""


@contextlib.contextmanager
def skipping_guards():
    """Around training steps after warm-up (train.compile_skip_guards_after): each compiled layer's call checks only
    the guards that pick between its cached graphs (torch.compiler.set_stance's skip_guard_eval_unsafe). Scoped to
    the layers compiled here: other compiled code (the fused kernels outside a layer, Megatron's own fused
    functions) keeps every guard, and so its right to compile a new size."""
    global _skip_guards
    before, _skip_guards = _skip_guards, True
    try:
        yield
    finally:
        _skip_guards = before


def _skipping_guards_when_asked(compiled):
    def call(*args, **kwargs):
        if not _skip_guards:
            return compiled(*args, **kwargs)
        try:
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                return compiled(*args, **kwargs)
        except RuntimeError as e:
            # no cached graph fits (a size outside every range compiled so far): Dynamo refuses to compile under
            # this stance, and says so before the frame runs, so the call is made again with every guard
            if "skip_guard_eval_unsafe" not in str(e):
                raise
        return compiled(*args, **kwargs)

    return call


def compile_language_layers(language_model, cpp_wrapper: bool = False) -> int:
    """Compile the decoder layers of a `QwenVLLanguageModel` (MoE layers: their attention half); returns how many."""
    from megatron.core.transformer.moe.moe_layer import MoELayer
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from train.models.qwen_vl import DeepstackTransformerLayer

    n = 0
    for layer in language_model.decoder.layers:
        if not isinstance(layer, DeepstackTransformerLayer):
            continue
        if isinstance(layer.mlp, MoELayer):
            # The MoE half routes tokens with data-dependent shapes (host syncs for the expert sizes) and stays
            # eager; the attention half (norms, projections, rope, residual) is one graph like a dense layer's.
            layer._forward_attention = functools.partial(_compiled(TransformerLayer._forward_attention, cpp_wrapper), layer)
        else:
            layer.compiled_forward = functools.partial(_compiled(TransformerLayer.forward, cpp_wrapper), layer)
        n += 1
    return n


def compile_vision_blocks(visual: torch.nn.Module, cpp_wrapper: bool = False) -> int:
    """Compile the blocks of a transformers vision tower (`Qwen3VLVisionModel`, Qwen2.5-VL's); returns how many."""
    for block in visual.blocks:
        # An instance attribute shadows the class's forward; nn.Module.__call__ (hooks included) stays eager.
        block.forward = functools.partial(_compiled(type(block).forward, cpp_wrapper), block)
    return len(visual.blocks)


def compile_layers(model, cpp_wrapper: bool = False) -> tuple[int, int]:
    """Compile a `QwenVLModel`'s decoder layers and vision blocks in place: (LLM layers, vision blocks)."""
    n_llm = compile_language_layers(model.language_model, cpp_wrapper)
    n_vit = compile_vision_blocks(model.vision.model, cpp_wrapper) if getattr(model, "pre_process", True) else 0
    return n_llm, n_vit


def compile_hf_layers(model, cpp_wrapper: bool = False) -> tuple[int, int]:
    """Compile a transformers Qwen-VL model's text decoder layers and vision blocks in place (the FSDP backend's
    model, `AutoModelForImageTextToText`): (decoder layers, vision blocks).

    Dense decoder layers run whole as one graph; a sparse MoE layer only its attention module (the routed experts
    stay eager, as in `compile_language_layers`). Each layer's `forward` becomes an instance attribute, so
    nn.Module.__call__ and the hooks on the layer (FSDP2's all-gather and reshard) stay outside the graph.

    The per-micro-batch Python ints the layers take (`max_length_q/k` from the packed forward, the vision blocks'
    `max_seqlen`) are graph inputs under dynamic=True, symbolic like the token count: they reach the attention op
    as each micro-batch's own value, without a graph per value. transformers wraps every layer class's forward
    in one checkpointing function (GradientCheckpointingLayer), so decoder layers and vision blocks share one
    code object and so one Dynamo cache: a handful of graphs (view and non-view inputs, train and eval) against
    the raised recompile limit."""
    core = model.model
    n = 0
    for layer in core.language_model.layers:
        if hasattr(layer.mlp, "experts"):
            attn = layer.self_attn
            attn.forward = functools.partial(_compiled(type(attn).forward, cpp_wrapper), attn)
        else:
            layer.forward = functools.partial(_compiled(type(layer).forward, cpp_wrapper), layer)
        n += 1
    return n, compile_vision_blocks(core.visual, cpp_wrapper)
