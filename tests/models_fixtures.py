"""Tiny Qwen-VL configs, inputs with images, and reference positions for the model tests.

Shared by tests/test_models_*.py. Sizes are chosen for a 2-core CI machine: hidden 64, 2-3 layers,
vision depth 2, images of a few dozen patches.
"""

from __future__ import annotations

import warnings

import inspect

import torch

VOCAB = 256
IMAGE_TOKEN, VISION_START, VISION_END, VIDEO_TOKEN = 250, 251, 252, 253
PATCH = 8
TEXT_IDS = 240  # ordinary text tokens are drawn from [0, TEXT_IDS)

_SPECIAL = dict(
    image_token_id=IMAGE_TOKEN,
    vision_start_token_id=VISION_START,
    vision_end_token_id=VISION_END,
    video_token_id=VIDEO_TOKEN,
)
_TEXT = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=4096, bos_token_id=None, eos_token_id=None, pad_token_id=None)
_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=PATCH, spatial_merge_size=2,
               temporal_patch_size=2, out_hidden_size=64)


def tiny_config(family: str, tie: bool = True):
    if family == "qwen3_vl":
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig(
            text_config=dict(_TEXT, num_hidden_layers=3, head_dim=16,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                                  mrope_interleaved=True)),
            vision_config=dict(_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0, 1]),
            tie_word_embeddings=tie, **_SPECIAL)
    if family == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig(
            text_config=dict(_TEXT, num_hidden_layers=2,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
            # window 32 px = 2x2 merged patches per window: several windows per image, so the window
            # attention (and its reordering) is really exercised.
            vision_config=dict(_VISION, window_size=32, fullatt_block_indexes=[1]),
            tie_word_embeddings=tie, **_SPECIAL)
    if family == "qwen3_vl_moe":
        from transformers import Qwen3VLMoeConfig

        return Qwen3VLMoeConfig(
            text_config=dict(_TEXT, num_hidden_layers=3, head_dim=16, moe_intermediate_size=24, num_experts=4,
                             num_experts_per_tok=2, mlp_only_layers=[1], decoder_sparse_step=1,
                             rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[4, 2, 2],
                                                  mrope_interleaved=True)),
            vision_config=dict(_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0]),
            tie_word_embeddings=tie, **_SPECIAL)
    raise ValueError(family)


def hf_model_class(family: str):
    import transformers

    return {
        "qwen3_vl": transformers.Qwen3VLForConditionalGeneration,
        "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
        "qwen3_vl_moe": transformers.Qwen3VLMoeForConditionalGeneration,
    }[family]


def randomize_(model: torch.nn.Module, seed: int, std: float = 0.08) -> None:
    """Random values in every parameter, norms included, so that no weight can be silently ignored."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or ".norm" in name or "layernorm" in name or "_norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))


def random_hf_model(family: str, seed: int, save_to=None, tie: bool = True):
    """(config, model): a tiny transformers model of `family` with seeded random weights (randomize_), saved with
    `save_pretrained` to save_to when given, the checkpoint the Megatron and FSDP models import."""
    cfg = tiny_config(family, tie=tie)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = hf_model_class(family)(cfg).eval()
    randomize_(hf, seed=seed)
    if save_to is not None:
        hf.save_pretrained(save_to)
    return cfg, hf


class Sample:
    """One sample: input_ids [L], the images' grid_thw and pixel values (processor layout)."""

    def __init__(self, input_ids, grids, pixel_values):
        self.input_ids = input_ids
        self.grid_thw = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
        self.pixel_values = pixel_values


def make_sample(seed: int, grids: list[tuple[int, int, int]], num_text: tuple[int, int] = (6, 5), channels: int = 3,
                temporal_patch: int = 2) -> Sample:
    """Text, then per image: <vision_start> image tokens <vision_end> text. grid (t, h, w) in patches."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT_IDS, (num_text[0],), generator=g).tolist()
    for t, h, w in grids:
        ids += [VISION_START] + [IMAGE_TOKEN] * (t * h * w // 4) + [VISION_END]
        ids += torch.randint(0, TEXT_IDS, (num_text[1],), generator=g).tolist()
    num_patches = sum(t * h * w for t, h, w in grids)
    pixels = torch.randn(num_patches, channels * temporal_patch * PATCH * PATCH, generator=g)
    return Sample(torch.tensor(ids, dtype=torch.long), grids, pixels)


def rope_positions(hf_model, sample: Sample) -> torch.Tensor:
    """[3, L] M-RoPE positions from transformers' get_rope_index for this sample alone."""
    inner = hf_model.model
    kwargs = dict(image_grid_thw=sample.grid_thw if len(sample.grid_thw) else None)
    params = inspect.signature(inner.get_rope_index).parameters
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (sample.input_ids == IMAGE_TOKEN).int()[None]
    if "attention_mask" in params:
        kwargs["attention_mask"] = torch.ones_like(sample.input_ids)[None]
    pos, _ = inner.get_rope_index(sample.input_ids[None], **kwargs)
    return pos[:, 0]


def pack(samples: list[Sample], positions: list[torch.Tensor], pad_to: int | None = None, pad_id: int = 0):
    """The packed micro-batch of the model interface, with an optional trailing padding 'sample'."""
    ids = [s.input_ids for s in samples]
    pos = list(positions)
    lens = [len(x) for x in ids]
    total = sum(lens)
    if pad_to is not None and pad_to > total:
        n = pad_to - total
        ids.append(torch.full((n,), pad_id, dtype=torch.long))
        pos.append(torch.arange(n).expand(3, n))
        lens.append(n)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    with_images = [s for s in samples if len(s.grid_thw)]
    pixels = torch.cat([s.pixel_values for s in with_images]) if with_images else None
    grids = torch.cat([s.grid_thw for s in with_images]) if with_images else None
    return dict(input_ids=torch.cat(ids), position_ids=torch.cat(pos, dim=1), cu_seqlens=cu, max_seqlen=max(lens),
                pixel_values=pixels, image_grid_thw=grids)


def hf_logits(hf_model, sample: Sample, positions: torch.Tensor) -> torch.Tensor:
    kwargs = {}
    if len(sample.grid_thw):
        kwargs = dict(pixel_values=sample.pixel_values, image_grid_thw=sample.grid_thw)
    with torch.no_grad():
        return hf_model(input_ids=sample.input_ids[None], position_ids=positions[:, None, :], **kwargs).logits[0]
