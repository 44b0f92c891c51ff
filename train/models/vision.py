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

import functools
from dataclasses import dataclass

import torch

from train.models.attention import use_varlen_attention


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
        use_varlen_attention(self.model)
        linear_patch_embed(self.model)
        self.spatial_merge_size = hf_config.vision_config.spatial_merge_size

    @property
    def dtype(self) -> torch.dtype:
        return self.model.patch_embed.proj.weight.dtype

    def forward(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
        return encode_images(self.model, pixel_values.to(self.dtype), image_grid_thw)


def _patch_embed_linear(embed: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    proj = embed.proj
    x = hidden_states.reshape(-1, proj.weight[0].numel()).to(proj.weight.dtype)
    return torch.nn.functional.linear(x, proj.weight.reshape(proj.weight.shape[0], -1), proj.bias)


def linear_patch_embed(visual: torch.nn.Module) -> None:
    """Run the patch embedding, a Conv3d whose kernel equals its stride (one output per patch), as the matrix
    product it is: [patches, C*T*P*P] x [C*T*P*P, hidden]. The same weights and sums; cuDNN's 3-D convolution
    took ~1.9 ms a micro-batch on an H100 for what is a 50 GFLOP GEMM (docs/performance.md). The parameter
    stays the Conv3d's (names, shapes and checkpoints unchanged)."""
    embed = visual.patch_embed
    conv = embed.proj
    if tuple(conv.kernel_size) != tuple(conv.stride) or conv.padding != (0, 0, 0) or conv.groups != 1:
        return  # not a patchify convolution: leave it as transformers runs it
    embed.forward = functools.partial(_patch_embed_linear, embed)


def encode_images(visual: torch.nn.Module, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> VisionOutput:
    """The merged image features and deepstack features of a transformers vision module (both backends).

    The module is called directly rather than through the model's get_image_features: its signature and return
    type differ across transformers 5.x (5.17 has no `mm_encoder_outputs`, and a kwarg it does not know is
    silently dropped: the images would never reach the language model)."""
    out = run_vision(visual, pixel_values, image_grid_thw)
    return VisionOutput(image_embeds=out.pooler_output, deepstack_embeds=list(getattr(out, "deepstack_features", None) or []))


def place_image_features(emb: torch.Tensor, features: torch.Tensor, image_positions: torch.Tensor) -> torch.Tensor:
    """The token embeddings emb [T, ...] with rows `image_positions` (the image placeholder tokens, in order)
    replaced by the image features [N, ...] (both backends: the Megatron model's [T, 1, H], transformers' [T, H])."""
    if features.shape[0] != image_positions.shape[0]:
        raise ValueError(
            f"the images give {features.shape[0]} features but input_ids hold {image_positions.shape[0]} image tokens: "
            "pixel_values/image_grid_thw do not match the text"
        )
    return emb.index_put((image_positions,), features.reshape(features.shape[0], *emb.shape[1:]).to(emb.dtype))


def _host_to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An asynchronous copy of a fresh host tensor. From pageable memory, CUDA stages copies of more than
    ~64 KB by first waiting for the stream to drain: the host then waits for the previous micro-batch's
    backward and starts this forward with an empty GPU queue (found by sampling the host threads on an H200: docs/performance.md).
    From pinned memory (torch's caching host allocator, which keeps the block until the copy is done), the copy
    is queued and the host goes on launching."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


@functools.lru_cache(maxsize=4096)
def _image_indices(thw: tuple[int, int, int], merge: int, interp: tuple | None):
    """One image's rotary position ids and (Qwen3-VL) position-grid interpolation indices and weights, by
    transformers' own functions. Each depends on that image's grid alone, with no offset from the images before
    it, so a micro-batch's are the concatenation of its images'. Cached per grid: computed per micro-batch they
    took ~14 ms of host time in a profiled H200 step (per-image loops over small tensor ops), and Geo3K's
    diagrams come in a few hundred sizes. The cached tensors are only read (concatenated, then copied)."""
    from transformers import vision_utils as vu

    grid = torch.tensor([thw])
    pos = vu.get_vision_position_ids(grid, merge)
    if interp is None:
        return pos, None, None
    side, mode, align_corners, interp_merge = interp
    idx, weights = vu.get_vision_interpolation_indices_and_weights(
        grid, num_grid_per_side=side, mode=mode, align_corners=align_corners, spatial_merge_size=interp_merge
    )
    return pos, idx, weights


def interpolation_args(visual: torch.nn.Module) -> tuple | None:
    """The position-grid interpolation settings `_image_indices` takes (Qwen3-VL's learned position grid, resampled
    per image), or None for a tower without one (Qwen2.5-VL)."""
    if not hasattr(visual, "num_grid_per_side"):
        return None
    return (visual.num_grid_per_side, visual.interpolation_mode, visual.interpolation_align_corners,
            visual.config.spatial_merge_size)


def run_vision(visual: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor):
    """`visual(pixel_values, grid_thw=...)` with the grid-derived index tensors computed on the host.

    The transformers vision modules derive cu_seqlens, rotary positions, the position-grid interpolation
    (Qwen3-VL) and the window order (Qwen2.5-VL) from grid_thw with per-image Python loops, `.tolist()`
    and `.item()`: a dozen GPU syncs per micro-batch when grid_thw lives on the GPU, and one more per
    ViT block for max_seqlen. transformers.vision_utils computes each of them by the same function the
    module calls and lets the caller pass them in (the module pops them from its kwargs), so here they
    are computed from a host copy of the grid and shipped to the device. The data path keeps
    image_grid_thw on the host for this (train/data/batch.py); a GPU grid costs one sync here.
    """
    device = pixel_values.device
    to_device = functools.partial(_host_to_device, device=device)
    try:
        from transformers import vision_utils as vu
        from transformers.utils.generic import get_max_seqlen
    except ImportError:  # a transformers without precomputable vision inputs: let the module derive them
        return visual(pixel_values, grid_thw=grid_thw.to(device), return_dict=True)
    grid = grid_thw.cpu()
    cfg = visual.config
    kw: dict = {}
    cu_seqlens, kw["max_seqlen"] = vu.get_vision_attention_seqlens(grid, cfg)
    kw["cu_seqlens"] = to_device(cu_seqlens)
    interp = interpolation_args(visual)
    per_image = [_image_indices(tuple(g), visual.spatial_merge_size, interp) for g in grid.tolist()]
    kw["position_ids"] = to_device(torch.cat([p for p, _, _ in per_image]))
    if interp is not None:
        kw["interp_indices"] = to_device(torch.cat([i for _, i, _ in per_image]))
        kw["interp_weights"] = to_device(torch.cat([w for _, _, w in per_image]))
    if hasattr(visual, "window_size"):  # Qwen2.5-VL: window attention in most blocks
        window_index, cu_window = vu.get_vision_window_index(
            grid, spatial_merge_size=visual.spatial_merge_size, window_size=visual.window_size, patch_size=visual.patch_size
        )
        kw["max_window_seqlen"] = get_max_seqlen(cu_window, cfg)
        kw["window_index"], kw["cu_window_seqlens"] = to_device(window_index), to_device(cu_window)
    return visual(pixel_values, grid_thw=grid, return_dict=True, **kw)
