"""The vision tower's per-image cached index tensors equal transformers' computation over the whole grid."""

from __future__ import annotations

import pytest
import torch

from tests.models_fixtures import randomize_, tiny_config
from train.models.vision import _image_indices, interpolation_args, run_vision, vision_class

# several images, one grid twice (the cache's hit) and one with two frames
GRID = torch.tensor([[1, 4, 6], [1, 8, 4], [1, 4, 6], [2, 4, 4]])


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_cached_indices_equal_whole_grid(family):
    from transformers import vision_utils as vu

    cfg = tiny_config(family).vision_config
    visual = vision_class(family)._from_config(cfg)
    merge = visual.spatial_merge_size
    interp = interpolation_args(visual)
    assert (interp is not None) == (family == "qwen3_vl")
    per_image = [_image_indices(tuple(g), merge, interp) for g in GRID.tolist()]
    assert torch.equal(torch.cat([p for p, _, _ in per_image]), vu.get_vision_position_ids(GRID, merge))
    if interp is not None:
        idx, weights = vu.get_vision_interpolation_indices_and_weights(
            GRID, num_grid_per_side=interp[0], mode=interp[1], align_corners=interp[2], spatial_merge_size=merge
        )
        assert torch.equal(torch.cat([i for _, i, _ in per_image]), idx)
        assert torch.equal(torch.cat([w for _, _, w in per_image]), weights)
    assert _image_indices(tuple(GRID[0].tolist()), merge, interp) is per_image[0]  # cached, not recomputed


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_run_vision_equals_module(family):
    cfg = tiny_config(family).vision_config
    visual = vision_class(family)._from_config(cfg)
    randomize_(visual, seed=3)
    width = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2
    pixels = torch.randn(int(GRID.prod(1).sum()), width, generator=torch.Generator().manual_seed(0))
    ours = run_vision(visual, pixels, GRID)
    theirs = visual(pixels, grid_thw=GRID, return_dict=True)
    torch.testing.assert_close(ours.pooler_output, theirs.pooler_output, rtol=1e-5, atol=1e-5)
    for a, b in zip(getattr(ours, "deepstack_features", None) or [], getattr(theirs, "deepstack_features", None) or []):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
