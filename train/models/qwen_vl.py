"""Qwen2.5-VL and Qwen3-VL (dense and MoE) on Megatron-Core, over packed micro-batches.

Structure (one class per concern, no Transformer Engine):

- `VisionTower` (vision.py): transformers' vision module, replicated on tensor-parallel ranks.
- `QwenVLLanguageModel`: Megatron-Core's `GPTModel` built from the *local* layer spec, with
  `VarlenCoreAttention` as core attention (packed sequences), `QwenMRoPE` as rotary embedding
  (Qwen3-VL's interleaved sections are not in Megatron-Core) and `QwenRMSNorm` (the reference's
  bf16 rounding, and sequence parallelism, which the local spec's torch norm refuses). GQA, RMSNorm, SwiGLU, QK-norm (Qwen3) or
  QKV bias (Qwen2.5), tied embeddings and MoE come from Megatron-Core's own layers.
- Deepstack (Qwen3-VL): features of intermediate ViT layers are added to the hidden states after the
  first LLM layers at image positions. They travel through `TransformerBlock` as its `context` tensor,
  which the local spec's self-attention-only layers pass through untouched; `DeepstackTransformerLayer`
  adds slice `layer_number - 1`. Riding on `context` keeps Megatron's own activation recomputation
  working (it re-feeds `context` to recomputed layers) without subclassing `TransformerBlock`.

The packed micro-batch interface (see docs/megatron-models.md) is `QwenVLModel.forward`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import scatter_to_sequence_parallel_region
from megatron.core.transformer import TransformerConfig
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.router import TopKRouter
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_layer import TransformerLayer

from shared.schema import IGNORE_INDEX
from train.models import fused, moe_layer_pattern
from train.models.attention import VarlenCoreAttention
from train.models.experts import GroupedExperts
from train.models.rope import QwenMRoPE
from train.models.vision import VisionTower, place_image_features

SUPPORTED_MODEL_TYPES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe")

# Defaults of the transformers rotary classes when a config carries no mrope_section.
_DEFAULT_MROPE_SECTION = {"qwen2_5_vl": [16, 24, 24], "qwen3_vl": [24, 20, 20], "qwen3_vl_moe": [24, 20, 20]}


def _check_model_type(hf_config) -> str:
    if hf_config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {hf_config.model_type!r} is not supported; use a checkpoint of one of {SUPPORTED_MODEL_TYPES}"
        )
    return hf_config.model_type


def mrope_settings(hf_config) -> tuple[list[int], bool, float]:
    """(mrope_section, interleaved, rope_theta) of the language model."""
    text = hf_config.text_config
    model_type = _check_model_type(hf_config)
    rope = dict(getattr(text, "rope_parameters", None) or {})
    legacy = getattr(text, "rope_scaling", None) or {}  # transformers < 5 spelling, still in old config.json files
    section = rope.get("mrope_section") or legacy.get("mrope_section") or _DEFAULT_MROPE_SECTION[model_type]
    theta = rope.get("rope_theta", getattr(text, "rope_theta", None))
    if theta is None:
        raise ValueError("the text config has no rope_theta (rope_parameters['rope_theta'])")
    # Qwen3-VL always interleaves (transformers hard-codes it; configs also say mrope_interleaved=true).
    return list(section), model_type != "qwen2_5_vl", float(theta)


def tie_word_embeddings(hf_config) -> bool:
    # The top-level flag is the one transformers acts on for the VL wrapper classes.
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def head_dim(text) -> int:
    return getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads


def transformer_config_from_hf(hf_config, **overrides) -> TransformerConfig:
    """Megatron-Core `TransformerConfig` for the language model of a transformers Qwen-VL config.

    `overrides` are TransformerConfig fields set by the trainer (parallel sizes, bf16, recomputation...).
    """
    model_type = _check_model_type(hf_config)
    text = hf_config.text_config
    if text.hidden_act != "silu":
        raise ValueError(f"only SwiGLU (hidden_act='silu') is supported, got {text.hidden_act!r}")
    section, _, _ = mrope_settings(hf_config)
    kwargs = dict(
        num_layers=text.num_hidden_layers,
        hidden_size=text.hidden_size,
        ffn_hidden_size=text.intermediate_size,
        num_attention_heads=text.num_attention_heads,
        num_query_groups=text.num_key_value_heads,
        kv_channels=head_dim(text),
        normalization="RMSNorm",
        layernorm_epsilon=text.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        # Qwen2.5 has biases on q/k/v only; Qwen3 has none and normalises q and k per head instead.
        add_qkv_bias=bool(getattr(text, "attention_bias", model_type == "qwen2_5_vl")),
        qk_layernorm=model_type != "qwen2_5_vl",
        hidden_dropout=0.0,
        attention_dropout=0.0,
        mrope_section=section,
        # Most fusions need Apex/TE kernels we do not assume; the unfused paths are exact. SwiGLU's fusion is
        # plain torch.compile: the engine turns it on for GPUs (train.fused_kernels).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        cross_entropy_loss_fusion=False,
    )
    pattern = moe_layer_pattern(text)
    if pattern is not None:
        kwargs.update(
            num_moe_experts=text.num_experts,
            moe_router_topk=text.num_experts_per_tok,
            moe_ffn_hidden_size=text.moe_intermediate_size,
            moe_layer_freq=pattern,
            # transformers: softmax over all experts, top-k, renormalise. Without pre-softmax Megatron
            # takes the top-k logits and softmaxes them: the same probabilities.
            moe_router_pre_softmax=False,
            moe_router_score_function="softmax",
            moe_router_load_balancing_type="none",
            moe_token_dispatcher_type="alltoall",
            moe_grouped_gemm=False,
            moe_aux_loss_coeff=0.0,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


class DeepstackTransformerLayer(TransformerLayer):
    """A TransformerLayer that adds `context[layer_number - 1]` (deepstack features) to its output.

    `context` is [num_deepstack_layers, T, 1, hidden] (zeros away from image tokens) or None.
    """

    compiled_forward = None
    """Set by layer_compile.compile_layers: TransformerLayer.forward as one compiled graph. The deepstack
    addition stays outside it, because its index is this layer's number: a compiled graph would be
    specialised to each layer instead of shared by all."""

    def forward(self, *args, **kwargs):
        # decoding with a KV cache runs eager: the cache's writes and growing span would recompile every step
        if self.compiled_forward is not None and getattr(kwargs.get("packed_seq_params"), "kv_cache", None) is None:
            output, context = self.compiled_forward(*args, **kwargs)
        else:
            output, context = super().forward(*args, **kwargs)
        idx = self.layer_number - 1
        if context is not None and idx < context.shape[0]:
            output = output + context[idx].to(output.dtype)
        return output, context


class QwenRMSNorm(torch.nn.Module):
    """RMSNorm with the rounding of transformers' Qwen models: normalise in float32, cast back to the
    input dtype, then scale by the weight in that dtype.

    Megatron's local spec uses `torch.nn.RMSNorm`, whose fused CUDA kernel scales before the single
    final rounding; in bf16 that differs from the reference by about an ulp at every norm, which 28
    layers of a random model amplify. It also refuses sequence parallelism; this one supports it (the
    weight is marked `sequence_parallel`, so Megatron all-reduces its gradient across TP ranks).
    """

    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-6, **kwargs):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused.rms_norm(x, self.weight, self.eps)  # one compiled kernel on GPU (fused.py)

    def extra_repr(self) -> str:
        return f"{self.weight.numel()}, eps={self.eps}"


class LocalTopKRouter(TopKRouter):
    """Megatron-Core's top-k router with a plain-PyTorch gating matmul, and routing statistics for the logs.

    megatron-core 0.16.1's `TopKRouter.gating` moves its weight to `torch.cuda.current_device()` and
    calls `te_general_gemm`, a name that exists only when Transformer Engine is installed (NameError
    otherwise). The logits are the same `input @ weight.T` in the router dtype.

    Every forward adds to `routing_stats` (on the device, no sync): tokens routed to each expert and the
    summed softmax probability of each expert, from which the trainer logs the expert load imbalance and the
    load-balancing loss value of each step, whether or not that loss is trained on (train.moe_aux_loss).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.routing_stats: torch.Tensor | None = None  # [2, num_experts]: token counts, probability sums
        self._logits: torch.Tensor | None = None

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        router_dtype = {"fp32": torch.float32, "fp64": torch.float64}.get(self.config.moe_router_dtype, input.dtype)
        bias = self.bias.to(router_dtype) if self.bias is not None else None
        logits = F.linear(input.to(router_dtype), self.weight.to(router_dtype), bias)
        self._logits = logits
        return logits

    def forward(self, input: torch.Tensor, padding_mask: torch.Tensor | None = None):
        probs, routing_map = super().forward(input, padding_mask)
        with torch.no_grad():
            logits = self._logits.reshape(-1, self.config.num_moe_experts)
            stats = torch.stack([routing_map.sum(0).float(), torch.softmax(logits.float(), dim=-1).sum(0)])
            self.routing_stats = stats if self.routing_stats is None else self.routing_stats + stats
        self._logits = None
        return probs, routing_map


def language_block_spec(tf_config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None,
                        grouped_experts: bool = True):
    """Megatron-Core's local (no Transformer Engine) GPT layers, with varlen attention and deepstack.

    The block spec (not a single layer spec) so that MoE models can mix dense and MoE layers
    (`moe_layer_freq`, from transformers' `mlp_only_layers` / `decoder_sparse_step`). MoE layers keep
    Megatron's MoELayer, router logic and token dispatcher; their experts are `GroupedExperts` (experts.py:
    grouped GEMMs, or one GEMM pair per expert when `grouped_experts` is false).
    """
    block = get_gpt_decoder_block_spec(
        tf_config, use_transformer_engine=False, normalization="RMSNorm", vp_stage=vp_stage, pp_rank=pp_rank
    )
    block.layer_norm = QwenRMSNorm
    for spec in block.layer_specs:
        spec.module = DeepstackTransformerLayer
        spec.submodules.input_layernorm = QwenRMSNorm
        spec.submodules.pre_mlp_layernorm = QwenRMSNorm
        attn = spec.submodules.self_attention.submodules
        attn.core_attention = VarlenCoreAttention
        if tf_config.qk_layernorm:
            attn.q_layernorm = QwenRMSNorm
            attn.k_layernorm = QwenRMSNorm
        mlp = spec.submodules.mlp
        if hasattr(getattr(mlp, "submodules", None), "router"):
            mlp.submodules.router = LocalTopKRouter
            mlp.submodules.experts = ModuleSpec(module=GroupedExperts, params={"grouped": grouped_experts})
    return block


class QwenVLLanguageModel(GPTModel):
    """GPTModel whose rotary embedding is the Qwen M-RoPE of this checkpoint."""

    def __init__(self, tf_config: TransformerConfig, hf_config, *, pre_process=True, post_process=True,
                 grouped_experts: bool = True, **kwargs):
        text = hf_config.text_config
        super().__init__(
            config=tf_config,
            transformer_layer_spec=language_block_spec(tf_config, vp_stage=kwargs.get("vp_stage"), grouped_experts=grouped_experts),
            vocab_size=text.vocab_size,
            max_sequence_length=text.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            share_embeddings_and_output_weights=tie_word_embeddings(hf_config),
            # Built without Megatron's rotary module (its mrope is contiguous-only and allocates on
            # torch.cuda at init); ours is installed below and GPTModel calls it as its 'mrope'.
            position_embedding_type="none",
            # The vision features are merged into the full sequence first; the model scatters the
            # sequence for sequence parallelism itself afterwards.
            scatter_embedding_sequence_parallel=False,
            **kwargs,
        )
        section, interleaved, theta = mrope_settings(hf_config)
        # GPTModel never calls this module (position_embedding_type stays "none", so Megatron's unfused
        # per-layer RoPE is skipped): QwenVLModel computes cos/sin once per micro-batch with it and
        # VarlenCoreAttention rotates q and k with one fused kernel each.
        self.rotary_pos_emb = QwenMRoPE(head_dim(text), theta, section, interleaved)

    def _postprocess(self, hidden_states, input_ids, position_ids, labels, *args, **kwargs):
        """With labels and `loss_index`: the output layer and cross entropy at the loss positions only.

        Geo3K trains on a few answer tokens per sample, so this skips ~97% of the LM head's matmul (10% of
        the 2B model's FLOPs) and never materialises [T, 151,936] logits. Under sequence parallelism each
        rank holds a slice of the sequence, so the full head runs there (Megatron's own path)."""
        packed = kwargs.get("packed_seq_params")
        index = getattr(packed, "loss_index" if labels is not None else "logits_index", None)
        if index is None or self.config.sequence_parallel or self.config.mtp_num_layers or not self.post_process:
            return super()._postprocess(hidden_states, input_ids, position_ids, labels, *args, **kwargs)
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        if labels is None:  # logits at these positions only (generation: each prompt's last token), gathered over TP
            logits, _ = self.output_layer(hidden_states.index_select(0, index), weight=weight, runtime_gather_output=True)
            return logits.transpose(0, 1).contiguous()  # [1, n, V]
        logits, _ = self.output_layer(hidden_states.index_select(0, index), weight=weight)  # [n, 1, V / tp]
        return self.compute_language_model_loss(labels.index_select(1, index), logits)  # [1, n]


@dataclass
class QwenPackedSeqParams(PackedSeqParams):
    """Megatron's PackedSeqParams plus what all layers of one packed micro-batch share.

    `qkv_format` is "sbhd" so that Megatron treats the sequence as one batch row; VarlenCoreAttention reads
    the sample boundaries from cu_seqlens_q and rotates q/k with rope_cos/rope_sin."""

    rope_cos: torch.Tensor | None = None
    """[T, 1, head_dim] in the activation dtype (cos of the M-RoPE angles), or None for no rotation."""
    rope_sin: torch.Tensor | None = None
    loss_index: torch.Tensor | None = None
    """int64 [n]: positions with labels; the LM head runs only there (None: everywhere)."""
    logits_index: torch.Tensor | None = None
    """int64 [n]: without labels, the positions whose logits are wanted (None: every position)."""
    kv_cache: Any = None
    """A kv_cache.KVCache while decoding greedily: prefill writes it, decode reads and extends it."""


class QwenVLModel(MegatronModule):
    """Vision tower + language model. Call with one packed micro-batch (see `forward`)."""

    def __init__(self, hf_config, tf_config: TransformerConfig, *, pre_process: bool = True, post_process: bool = True,
                 grouped_experts: bool = True):
        super().__init__(config=tf_config)
        _check_model_type(hf_config)
        self.hf_config = hf_config
        self.pre_process = pre_process
        self.post_process = post_process
        self.image_token_id = hf_config.image_token_id
        self.num_deepstack = len(getattr(hf_config.vision_config, "deepstack_visual_indexes", None) or [])
        if pre_process:
            self.vision = VisionTower(hf_config, dtype=tf_config.params_dtype)
        self.language_model = QwenVLLanguageModel(
            tf_config, hf_config, pre_process=pre_process, post_process=post_process, grouped_experts=grouped_experts
        )
        self.share_embeddings_and_output_weights = self.language_model.share_embeddings_and_output_weights

    def set_input_tensor(self, input_tensor):
        self.language_model.set_input_tensor(input_tensor)

    def shared_embedding_or_output_weight(self):
        return self.language_model.shared_embedding_or_output_weight()

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        loss_index: torch.Tensor | None = None,
        image_index: torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        kv_cache=None,
    ) -> torch.Tensor:
        """One packed micro-batch (batch dimension 1, left implicit).

        input_ids int64 [T]; position_ids int64 [3, T] (M-RoPE, restarting per sample); cu_seqlens int32
        [num_samples + 1]; max_seqlen the longest sample; pixel_values [num_patches, C*t*P*P] and
        image_grid_thw int64 [num_images, 3] for the images in order of appearance (or None);
        labels int64 [T] already shifted (-100: no loss). Optional, to spare the GPU a host sync each:
        loss_index = positions of labels != -100 and image_index = positions of image tokens (int64,
        ascending; the data path ships both, train/data/batch.py); computed here when not given.

        Generation (train/evaluate.py): `logits_index` = the positions whose logits are wanted (each prompt's
        last token), `kv_cache` = a kv_cache.KVCache in its prefill or decode phase.

        Returns logits [T, vocab] (gathered over tensor-parallel ranks; [n, vocab] at logits_index) when labels is None, else the
        float32 per-token loss [T], 0 where labels == -100: the trainer sums it and divides by the
        number of loss tokens of the global batch.
        """
        if input_ids.dim() != 1 or position_ids.shape != (3, input_ids.shape[0]):
            raise ValueError(
                f"expected input_ids [T] and position_ids [3, T], got {tuple(input_ids.shape)} and "
                f"{tuple(position_ids.shape)}: pass one packed sequence without a batch dimension"
            )
        decoder_input, deepstack = None, None
        if self.pre_process:
            decoder_input, deepstack = self._embed(input_ids, pixel_values, image_grid_thw, image_index)
            if self.config.sequence_parallel:
                decoder_input = scatter_to_sequence_parallel_region(decoder_input)
                if deepstack is not None:
                    deepstack = torch.stack([scatter_to_sequence_parallel_region(d) for d in deepstack])
        # cos/sin of the M-RoPE angles once per micro-batch, in the activation dtype (as transformers and
        # Megatron round them), instead of once per layer.
        angles = self.language_model.rotary_pos_emb(position_ids[:, None, :])[:, 0]  # [T, 1, head_dim] fp32
        act_dtype = decoder_input.dtype if decoder_input is not None else self.config.params_dtype
        safe_labels = None
        if labels is not None:
            # Megatron's vocab-parallel cross entropy has no ignore index: give it a valid id, mask after.
            loss_mask = labels != IGNORE_INDEX
            safe_labels = torch.where(loss_mask, labels, torch.zeros_like(labels))[None]
            if loss_index is None:
                loss_index = loss_mask.nonzero().squeeze(1)
        packed = QwenPackedSeqParams(
            qkv_format="sbhd",
            cu_seqlens_q=cu_seqlens,
            cu_seqlens_kv=cu_seqlens,
            max_seqlen_q=int(max_seqlen),
            max_seqlen_kv=int(max_seqlen),
            rope_cos=angles.cos().to(act_dtype),
            rope_sin=angles.sin().to(act_dtype),
            loss_index=loss_index if labels is not None else None,
            logits_index=logits_index if labels is None else None,
            kv_cache=kv_cache,
        )
        out = self.language_model(
            input_ids=input_ids[None],
            position_ids=position_ids[:, None, :],
            attention_mask=None,
            decoder_input=decoder_input,
            labels=safe_labels,
            packed_seq_params=packed,
            extra_block_kwargs={"context": deepstack} if deepstack is not None else None,
            runtime_gather_output=True if labels is None else None,
        )
        if not self.post_process:
            return out
        if labels is None:
            if logits_index is not None and self.config.sequence_parallel:  # the full head ran (_postprocess)
                return out[0].index_select(0, logits_index)
            return out[0]  # [T or n, vocab]
        if out.shape[1] != labels.shape[0]:  # the loss at loss_index only (QwenVLLanguageModel._postprocess)
            return torch.zeros(labels.shape, dtype=torch.float32, device=out.device).index_put((loss_index,), out[0].float())
        return out[0].float() * loss_mask

    def _embed(self, input_ids, pixel_values, image_grid_thw, image_index=None):
        """Token embeddings with the image features written over the image placeholder tokens."""
        # Megatron's [s, b, h] layout, with the strides every layer's output has (a transposed [1, T, H] counts as
        # contiguous but carries another stride for b: a compiled layer would guard on it and compile twice).
        emb = self.language_model.embedding.word_embeddings(input_ids[None])[0][:, None, :]  # [T, 1, H]
        if image_index is None:
            image_index = (input_ids == self.image_token_id).nonzero().squeeze(1)
        num_image_tokens = image_index.shape[0]
        if pixel_values is None or pixel_values.numel() == 0:
            if num_image_tokens:
                raise ValueError(f"{num_image_tokens} image tokens but no pixel_values")
            return emb, None
        vis = self.vision(pixel_values, image_grid_thw)
        emb = place_image_features(emb, vis.image_embeds, image_index)
        deepstack = None
        if vis.deepstack_embeds:
            # Megatron's layers take the deepstack features as one dense `context` tensor (zeros away from the
            # image tokens) that DeepstackTransformerLayer adds; transformers' model places them itself
            deepstack = emb.new_zeros((len(vis.deepstack_embeds),) + tuple(emb.shape))
            for i, feats in enumerate(vis.deepstack_embeds):
                deepstack[i, image_index, 0] = feats.to(emb.dtype)
        return emb, deepstack


def mark_tensor_parallel_weights(model: torch.nn.Module) -> None:
    """Give every tensor-parallel weight Megatron-Core's `tensor_model_parallel` / `partition_dim` attributes.

    Megatron-Core sets them only inside its own weight initialisation, so a model built to receive a checkpoint
    (`perform_initialization=False`) has none, and the code that reads them then treats split weights as
    replicated: its gradient norm counts them on TP rank 0 only (a wrong norm, so wrong clipping, under TP)."""
    from megatron.core.tensor_parallel.layers import (
        ColumnParallelLinear,
        RowParallelLinear,
        VocabParallelEmbedding,
        set_tensor_model_parallel_attributes,
    )

    for module in model.modules():
        dim = {ColumnParallelLinear: 0, VocabParallelEmbedding: 0, RowParallelLinear: 1}.get(type(module))
        weight = getattr(module, "weight", None)
        if dim is not None and weight is not None and not hasattr(weight, "tensor_model_parallel"):
            set_tensor_model_parallel_attributes(weight, is_parallel=True, dim=dim, stride=1)


def build_model(hf_config, grouped_experts: bool = True, **overrides) -> QwenVLModel:
    """A model for a transformers Qwen-VL config: randomly initialised, or empty for a checkpoint
    (`perform_initialization=False`; load weights with convert.py). `overrides`: TransformerConfig fields."""
    model = QwenVLModel(hf_config, transformer_config_from_hf(hf_config, **overrides), grouped_experts=grouped_experts)
    mark_tensor_parallel_weights(model)
    return model
