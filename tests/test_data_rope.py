"""M-RoPE positions of the data path vs transformers' own get_rope_index (Qwen3-VL and Qwen2.5-VL)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from shared.manifest import ShardSet
from shared.schema import RecordError
from tests.conftest import make_config
from train.data import DataConfig, build_loader, mrope_position_ids

IMG = 151655


def _tiny_qwen3_vl():
    from transformers import Qwen3VLConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                intermediate_size=32, vocab_size=152000,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True})
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                  deepstack_visual_indexes=[], patch_size=16, spatial_merge_size=2)
    return Qwen3VLModel(Qwen3VLConfig(text_config=text, vision_config=vision, image_token_id=IMG))


def _tiny_qwen2_5_vl():
    from transformers import Qwen2_5_VLConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    text = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                intermediate_size=32, vocab_size=152000,
                rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "type": "mrope"})
    vision = dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=16,
                  fullatt_block_indexes=[0], patch_size=14, spatial_merge_size=2)
    return Qwen2_5_VLModel(Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=IMG))


@pytest.fixture(scope="module", params=["qwen3-vl", "qwen2.5-vl"])
def hf_model(request):
    torch.manual_seed(0)
    return _tiny_qwen3_vl() if request.param == "qwen3-vl" else _tiny_qwen2_5_vl()


def reference(model, input_ids: np.ndarray, grid: np.ndarray) -> np.ndarray:
    ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))[None]
    pos, _ = model.get_rope_index(
        ids, mm_token_type_ids=(ids == IMG).int(), image_grid_thw=torch.from_numpy(np.asarray(grid, dtype=np.int64)).reshape(-1, 3)
    )
    return pos[:, 0].numpy()


SYNTHETIC = {
    "one image": ([1, 2, 3] + [IMG] * 6 + [4, 5, 6], [[1, 4, 6]]),
    "tall image": ([9] + [IMG] * 10 + [8, 7], [[1, 10, 4]]),
    "two images": ([1, 2, 3] + [IMG] * 6 + [4, 5] + [IMG] * 4 + [7], [[1, 4, 6], [1, 4, 4]]),
    "image first": ([IMG] * 4 + [5, 6], [[1, 4, 4]]),
    "image last": ([5, 6] + [IMG] * 6, [[1, 6, 4]]),
    "text only": ([5, 6, 7, 8], np.zeros((0, 3))),
}


@pytest.mark.parametrize("case", list(SYNTHETIC))
def test_mrope_matches_transformers_synthetic(hf_model, case):
    ids, grid = SYNTHETIC[case]
    grid = np.asarray(grid, dtype=np.int64).reshape(-1, 3)
    if case == "text only":  # transformers needs an image (or video) grid to take the multimodal path
        expect = np.broadcast_to(np.arange(len(ids)), (3, len(ids)))
    else:
        expect = reference(hf_model, np.asarray(ids), grid)
    np.testing.assert_array_equal(mrope_position_ids(np.asarray(ids), grid, IMG, 2), expect)


def test_mrope_rejects_inconsistent_records():
    with pytest.raises(RecordError, match="image tokens"):
        mrope_position_ids(np.array([1] + [IMG] * 5), np.array([[1, 4, 4]]), IMG, 2)
    with pytest.raises(RecordError, match="contiguous"):
        mrope_position_ids(np.array([IMG, IMG, 1, IMG, IMG]), np.array([[1, 4, 4]]), IMG, 2)


def _check_packed_positions(shard_dir, model, **cfg):
    loader = build_loader(shard_dir, DataConfig(global_batch_size=8, num_workers=0, num_epochs=1, drop_last=False, **cfg))
    shard_set = ShardSet(shard_dir)
    samples = {s.key: s for s in shard_set.iter_samples()}
    image_token = shard_set.processor["special_ids"]["image_pad"]
    assert image_token == IMG
    checked = 0
    for step in loader:
        for mb in step.micro_batches:
            bounds = mb.cu_seqlens.tolist()
            for i, key in enumerate(mb.keys):
                s = samples[key]
                got = mb.position_ids[:, bounds[i] : bounds[i + 1]].numpy()
                np.testing.assert_array_equal(got, reference(model, s.input_ids, s.image_grid_thw), err_msg=key)
                checked += 1
    assert checked == len(samples)


def test_packed_positions_equal_transformers_qwen3_vl(demo_shards):
    _check_packed_positions(demo_shards / "train", _tiny_qwen3_vl(), max_tokens_per_gpu=1024, pad_to_multiple_of=8)


@pytest.fixture(scope="module")
def qwen25_shards(demo_data, tmp_path_factory):
    """A small shard set tokenized by the Qwen2.5-VL-3B processor (patch 14)."""
    from preprocess.pipeline import run_preprocess

    out = tmp_path_factory.mktemp("qwen25-shards")
    cfg = make_config(
        out,
        {"train": str(demo_data / "train.parquet")},
        **{"shards.samples_per_shard": "8", "model.name_or_path": "qwen2.5-vl-3b", "source.max_rows": "16"},
    )
    run_preprocess(cfg, progress=False)
    return out / "geo3k" / "train"


def test_packed_positions_equal_transformers_qwen2_5_vl(qwen25_shards):
    assert ShardSet(qwen25_shards).pixel_spec.patch_size == 14
    _check_packed_positions(qwen25_shards, _tiny_qwen2_5_vl(), max_tokens_per_gpu=1024)
