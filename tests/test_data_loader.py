"""End to end over the demo shards: sharding over ranks x workers, budget, labels, pixels, resume, order."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from shared.manifest import ShardSet
from shared.schema import PixelSpec, normalize_patches
from train.data import IGNORE_INDEX, DataConfig, SampleTooLongError, build_loader

BUDGET = 1024  # demo samples are ~150-300 tokens: 3-6 per micro-batch


def cfg(**kw) -> DataConfig:
    base = dict(max_tokens_per_gpu=BUDGET, global_batch_size=10, drop_last=False, num_epochs=2, num_workers=0)
    return DataConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def train_dir(demo_shards):
    return demo_shards / "train"


@pytest.fixture(scope="module")
def samples(train_dir):
    return {s.key: s for s in ShardSet(train_dir).iter_samples()}


def run_all_ranks(train_dir, dp_size: int, **kw):
    """Every rank's steps, as if dp_size processes ran side by side: [rank][step]."""
    return [list(build_loader(train_dir, cfg(**kw), rank, dp_size)) for rank in range(dp_size)]


@pytest.mark.parametrize("num_workers", [0, 1, 2])
@pytest.mark.parametrize("dp_size", [1, 2, 4])
def test_every_sample_exactly_once_per_epoch(train_dir, samples, dp_size, num_workers):
    ranks = run_all_ranks(train_dir, dp_size, num_workers=num_workers, pad_to_multiple_of=4)
    num_steps = len(ranks[0])
    assert num_steps == 2 * 5 and all(len(r) == num_steps for r in ranks)
    for epoch in (0, 1):
        keys = Counter(k for r in ranks for st in r if st.epoch == epoch for k in st.keys)
        assert set(keys) == set(samples) and set(keys.values()) == {1}
    for i in range(num_steps):
        steps = [r[i] for r in ranks]
        assert len({len(st.micro_batches) for st in steps}) == 1, "ranks disagree on the micro-batch count"
        mbs = [mb for st in steps for mb in st.micro_batches]
        assert all(mb.num_tokens <= BUDGET and mb.num_tokens % 4 == 0 for mb in mbs)
        assert steps[0].num_loss_tokens == sum(mb.num_loss_tokens for mb in mbs)
        assert steps[0].num_samples == sum(len(mb.keys) for mb in mbs) == (10 if steps[0].step < 4 else 8)


def test_drop_last_drops_a_different_remainder_each_epoch(train_dir):
    (steps,) = run_all_ranks(train_dir, 1, drop_last=True)
    assert len(steps) == 2 * 4 and all(st.num_samples == 10 for st in steps)
    per_epoch = [{k for st in steps if st.epoch == e for k in st.keys} for e in (0, 1)]
    assert all(len(k) == 40 for k in per_epoch) and per_epoch[0] != per_epoch[1]


def test_labels_are_shifted_within_samples(train_dir, samples):
    for step in build_loader(train_dir, cfg(num_epochs=1, pad_to_multiple_of=64)):
        for mb in step.micro_batches:
            ids, labels, bounds = mb.input_ids.numpy(), mb.labels.numpy(), mb.cu_seqlens.tolist()
            assert mb.input_ids.dtype == mb.labels.dtype == mb.position_ids.dtype == torch.int64
            assert mb.cu_seqlens.dtype == torch.int32 and bounds[0] == 0 and bounds[-1] == mb.num_tokens
            assert len(bounds) - 1 == len(mb.keys) + (mb.num_tokens > mb.num_real_tokens)
            assert mb.max_seqlen == max(np.diff(bounds))
            for i, key in enumerate(mb.keys):
                s, seg = samples[key], slice(bounds[i], bounds[i + 1])
                np.testing.assert_array_equal(ids[seg], s.input_ids)
                expect = np.where(s.loss_mask[1:] == 1, s.input_ids[1:], IGNORE_INDEX)
                np.testing.assert_array_equal(labels[seg][:-1], expect)
                assert labels[seg][-1] == IGNORE_INDEX, "a sample's last token must not predict the next sample"
            assert (labels[mb.num_real_tokens :] == IGNORE_INDEX).all()
            assert (mb.position_ids[:, mb.num_real_tokens :] == torch.arange(mb.num_tokens - mb.num_real_tokens)).all()
            assert mb.num_loss_tokens == int((labels != IGNORE_INDEX).sum())


def test_shipped_positions_and_host_grid(train_dir):
    """loss_positions / image_positions spare the model a nonzero() per micro-batch; the grid stays on the host."""
    processor = ShardSet(train_dir).processor
    image_id = processor["special_ids"]["image_pad"]
    merge = PixelSpec.from_dict(processor["pixel_spec"]).merge_size ** 2  # patches per image token
    seen_images = 0
    for step in build_loader(train_dir, cfg(num_epochs=1)):
        for mb in step.micro_batches:
            labels, ids = mb.labels.numpy(), mb.input_ids.numpy()
            np.testing.assert_array_equal(mb.loss_positions.numpy(), np.flatnonzero(labels != IGNORE_INDEX))
            np.testing.assert_array_equal(mb.image_positions.numpy(), np.flatnonzero(ids == image_id))
            assert len(mb.loss_positions) == mb.num_loss_tokens
            assert len(mb.image_positions) == int(mb.image_grid_thw.prod(dim=1).sum()) // merge
            seen_images += mb.num_images
            moved = mb.to("cpu")
            assert moved.image_grid_thw is mb.image_grid_thw  # .to(device) leaves the grid where it is
            assert torch.equal(moved.loss_positions, mb.loss_positions)
    assert seen_images > 0


def test_pixels_equal_the_numpy_reference(train_dir, samples):
    spec = ShardSet(train_dir).pixel_spec
    step = next(iter(build_loader(train_dir, cfg(num_epochs=1))))
    for mb in step.micro_batches:
        expect = np.concatenate([normalize_patches(samples[k].patches, spec) for k in mb.keys])
        assert mb.pixel_values.dtype == torch.float32 and mb.pixel_values.shape == (mb.num_patches, spec.patch_dim)
        np.testing.assert_array_equal(mb.pixel_values.numpy(), expect)
        grid = np.concatenate([samples[k].image_grid_thw for k in mb.keys])
        np.testing.assert_array_equal(mb.image_grid_thw.numpy(), grid)
        assert mb.image_grid_thw.dtype == torch.int64
        assert mb.num_patches == int(grid.prod(axis=1).sum())
        moved = mb.to("cpu", non_blocking=True, pixel_dtype=torch.bfloat16)
        assert moved.pixel_values.dtype == torch.bfloat16
        torch.testing.assert_close(moved.pixel_values.float(), torch.from_numpy(expect).bfloat16().float())
        inputs = mb.model_inputs()
        assert set(inputs) == {"input_ids", "position_ids", "cu_seqlens", "max_seqlen", "pixel_values", "image_grid_thw", "labels"}


def snapshot(steps) -> list[tuple]:
    return [(st.epoch, st.step, [(tuple(mb.keys), mb.input_ids.tolist()) for mb in st.micro_batches]) for st in steps]


@pytest.mark.parametrize("stop_after", [3, 5, 7])  # mid-epoch 0, the epoch boundary, mid-epoch 1
def test_resume_continues_exactly(train_dir, stop_after):
    full = snapshot(build_loader(train_dir, cfg(num_workers=2), 1, 2))
    loader = build_loader(train_dir, cfg(num_workers=2), 1, 2)
    it = iter(loader)
    head = [next(it) for _ in range(stop_after)]  # the workers have prefetched beyond this point
    state = loader.state_dict()
    del it
    resumed = build_loader(train_dir, cfg(num_workers=1), 1, 2)
    resumed.load_state_dict(state)
    assert len(resumed) == len(full) - stop_after
    assert snapshot(head) + snapshot(resumed) == full


def test_resume_on_another_dp_size_sees_the_same_steps(train_dir):
    loader = build_loader(train_dir, cfg(), 0, 2)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    before = [sorted(k for r in ranks for k in r.keys) for ranks in zip(*run_all_ranks(train_dir, 2))][3:]
    after = []
    for rank in range(4):
        resumed = build_loader(train_dir, cfg(), rank, 4)
        resumed.load_state_dict(state)
        after.append(list(resumed))
    assert [sorted(k for st in steps for k in st.keys) for steps in zip(*after)] == before


def test_resume_refuses_another_order(train_dir):
    state = build_loader(train_dir, cfg()).state_dict()
    with pytest.raises(ValueError, match="seed"):
        build_loader(train_dir, cfg(seed=5)).load_state_dict(state)
    with pytest.raises(ValueError, match="global_batch_size"):
        build_loader(train_dir, cfg(global_batch_size=12)).load_state_dict(state)


def test_same_seed_same_order_new_epoch_new_order(train_dir):
    order = lambda **kw: [st.keys for st in build_loader(train_dir, cfg(**kw))]  # noqa: E731
    a = order()
    assert a == order(num_workers=2)
    assert a[:5] != a[5:], "epoch 1 repeats epoch 0's order"
    assert a != order(seed=1)


def test_sample_over_budget_fails_before_training(train_dir):
    with pytest.raises(SampleTooLongError, match="max_tokens_per_gpu=128"):
        build_loader(train_dir, cfg(max_tokens_per_gpu=128))


def test_empty_micro_batch_is_padding_only(train_dir):
    # 4 ranks share 5 samples with a budget of about 2 samples: a rank holding 1 sample must still run k passes
    steps = run_all_ranks(train_dir, 4, global_batch_size=5, max_tokens_per_gpu=512, num_epochs=1, pad_to_multiple_of=8)
    empties = [mb for r in steps for st in r for mb in st.micro_batches if not mb.keys]
    assert empties, "expected at least one padding-only micro-batch in this setting"
    for mb in empties:
        assert mb.num_tokens == 8 and mb.num_loss_tokens == 0 and (mb.labels == IGNORE_INDEX).all()
        assert mb.model_inputs()["pixel_values"] is None and mb.cu_seqlens.tolist() == [0, 8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned memory needs CUDA")
def test_pinned_batches_move_to_the_gpu(train_dir, samples):
    loader = build_loader(train_dir, cfg(num_workers=1, pin_memory=True))
    mb = next(iter(loader)).micro_batches[0]
    assert mb.patches.is_pinned() and mb.input_ids.is_pinned()
    spec = ShardSet(train_dir).pixel_spec
    expect = np.concatenate([normalize_patches(samples[k].patches, spec) for k in mb.keys])
    np.testing.assert_array_equal(mb.to("cuda", non_blocking=True).pixel_values.cpu().numpy(), expect)


def test_real_geo3k_samples(sample_shards):
    """The ten real Geo3K problems: all packed once, pixels and labels as the records say."""
    shard_set = ShardSet(sample_shards)
    samples = {s.key: s for s in shard_set.iter_samples()}
    steps = list(build_loader(sample_shards, DataConfig(global_batch_size=4, drop_last=False, num_epochs=1, num_workers=1)))
    assert sorted(k for st in steps for k in st.keys) == sorted(samples)
    for mb in (mb for st in steps for mb in st.micro_batches):
        expect = np.concatenate([normalize_patches(samples[k].patches, shard_set.pixel_spec) for k in mb.keys])
        np.testing.assert_array_equal(mb.pixel_values.numpy(), expect)
        assert mb.num_loss_tokens == sum(int(samples[k].loss_mask.sum()) for k in mb.keys)
