"""The vision encoder: transformers' own Qwen-VL vision module, run with our varlen attention.

Reusing `Qwen3VLVisionModel` / `Qwen2_5_VisionTransformerPretrainedModel` keeps the encoder's output
identical to transformers by construction (patch embedding, learned position-grid interpolation, 2-D
rotary, Qwen2.5-VL's window attention and the patch mergers are theirs), and its parameter names equal
the checkpoint's under `model.visual.`, so conversion is a prefix change. Only the attention kernel is
swapped, through transformers' public `AttentionInterface`, for `attention.varlen_attention`: all images
of a micro-batch (or all windows) go through one varlen call instead of a Python loop.

The encoder is small next to the language model (0.4-0.6 B parameters), so it is replicated on every
tensor-parallel rank: all ranks see the same pixels and, in backward, the same gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from train.models.attention import register_hf_attention


@dataclass
class VisionOutput:
    image_embeds: torch.Tensor
    """[num_image_tokens, llm_hidden]: merged patches, in order of the images' placeholder tokens."""
    deepstack_embeds: list[torch.Tensor]
    """Qwen3-VL only: one [num_image_tokens, llm_hidden] tensor per deepstack LLM layer (empty otherwise)."""


def vision_class(model_type: str):
    if model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel

        return Qwen3VLVisionModel
    if model_type == "qwen3_vl_moe":
        from transformers.models.qwen3_vl_moe.modeling_qwen3_vl_moe import Qwen3VLMoeVisionModel

        return Qwen3VLMoeVisionModel
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VisionTransformerPretrainedModel

        return Qwen2_5_VisionTransformerPretrainedModel
    raise ValueError(f"no vision encoder for model_type={model_type!r}; supported: qwen2_5_vl, qwen3_vl, qwen3_vl_moe")


class VisionTower(torch.nn.Module):
    """Wraps the transformers vision module; parameters live under `.model` (checkpoint `model.visual.`)."""

    def __init__(self, hf_config, dtype: torch.dtype = torch.float32):
        super().__init__()
        cls = vision_class(hf_config.model_type)
        # _from_config builds with random init; the converter loads the real weights afterwards.
        self.model = cls._from_config(hf_config.vision_config, attn_implementation="sdpa", dtype=dtype)
        # Switched after construction: at construction transformers would try to load a flash-attn
        # kernel for any name containing "flash". The attention modules read the name per call.
        name = register_hf_attention()
        for module in self.model.modules():
            config = getattr(module, "config", None)
            if config is not None and hasattr(config, "_attn_implementation"):
                config._attn_implementation = name
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        out = self.model(pixel_values.to(self.dtype), grid_thw=image_grid_thw, return_dict=True)
        deepstack = list(getattr(out, "deepstack_features", None) or [])
        return VisionOutput(image_embeds=out.pooler_output, deepstack_embeds=deepstack)
