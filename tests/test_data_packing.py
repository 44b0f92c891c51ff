"""The epoch plan on synthetic indexes: budget, balance, agreement across ranks, determinism, errors."""

from __future__ import annotations

import numpy as np
import pytest

from shared.presets import preset_names
from train.data import DataConfig, FlopsModel, SampleTable, SampleTooLongError, plan_epoch
from train.data.packing import pack_first_fit_decreasing, split_to_count


def geo3k_like(n: int = 600, seed: int = 0) -> SampleTable:
    """Lengths like Geo3K's: 100-600 tokens, mostly image tokens (4 patches per image token)."""
    rng = np.random.default_rng(seed)
    image_tokens = rng.integers(60, 480, n)
    text = rng.integers(40, 120, n)
    return SampleTable.synthetic(image_tokens + text, image_tokens * 4, num_loss_tokens=rng.integers(2, 30, n))


def all_rows(plan) -> list[int]:
    return [i for st in plan.steps for rank in st.micro_batches for mb in rank for i in mb]


@pytest.mark.parametrize("dp_size", [1, 2, 4, 8])
def test_plan_covers_every_sample_once_within_budget(dp_size):
    table = geo3k_like()
    cfg = DataConfig(global_batch_size=64, drop_last=False, max_patches_per_gpu=12000)
    plan = plan_epoch(table, cfg, epoch=0, dp_size=dp_size)
    assert sorted(all_rows(plan)) == list(range(len(table)))
    for st in plan.steps:
        assert len({len(rank) for rank in st.micro_batches}) == 1, "ranks disagree on the micro-batch count"
        for rank in st.micro_batches:
            for mb in rank:
                assert table.num_tokens[mb].sum() <= cfg.max_tokens_per_gpu
                assert table.num_patches[mb].sum() <= cfg.max_patches_per_gpu
        rows = [i for rank in st.micro_batches for mb in rank for i in mb]
        assert st.num_loss_tokens == table.num_loss_tokens[rows].sum()
        assert st.num_samples == len(rows)


def test_drop_last_keeps_whole_global_batches():
    table = geo3k_like(300)
    plan = plan_epoch(table, DataConfig(global_batch_size=128), epoch=0, dp_size=2)
    assert [st.num_samples for st in plan.steps] == [128, 128]
    assert len(set(all_rows(plan))) == 256


def test_steps_do_not_depend_on_dp_size_or_budget():
    table = geo3k_like()
    step_sets = lambda plan: [sorted(i for r in st.micro_batches for mb in r for i in mb) for st in plan.steps]  # noqa: E731
    a = step_sets(plan_epoch(table, DataConfig(), 1, dp_size=1))
    b = step_sets(plan_epoch(table, DataConfig(max_tokens_per_gpu=2048, pad_to_multiple_of=8), 1, dp_size=8))
    assert a == b


def test_order_is_seeded_and_changes_per_epoch():
    table = geo3k_like()
    cfg = DataConfig(global_batch_size=32)
    first = lambda plan: plan.steps[0].micro_batches  # noqa: E731
    assert first(plan_epoch(table, cfg, 0, 2)) == first(plan_epoch(table, cfg, 0, 2))
    assert first(plan_epoch(table, cfg, 0, 2)) != first(plan_epoch(table, cfg, 1, 2))
    assert first(plan_epoch(table, cfg, 0, 2)) != first(plan_epoch(table, DataConfig(global_batch_size=32, seed=1), 0, 2))


def test_flops_balance_across_ranks():
    table = geo3k_like(1024)
    flops = FlopsModel()
    cost = flops.sample_flops(table.num_tokens, table.num_patches, table.num_images)
    for st in plan_epoch(table, DataConfig(), 0, dp_size=8, flops=flops).steps:
        loads = [sum(cost[i] for mb in rank for i in mb) for rank in st.micro_batches]
        assert max(loads) / np.mean(loads) < 1.03


def test_ffd_reaches_the_bin_lower_bound_on_one_rank():
    table = geo3k_like(1280)
    plan = plan_epoch(table, DataConfig(), 0, dp_size=1)
    at_bound = sum(st.num_micro_batches == -(-st.num_tokens // 4096) for st in plan.steps)
    assert at_bound >= len(plan.steps) - 1


def test_split_to_count_halves_then_pads_with_empty_bins():
    tokens = np.array([100, 90, 80, 70])
    bins = split_to_count([[0, 1, 2, 3]], 3, tokens)
    assert len(bins) == 3 and sorted(i for b in bins for i in b) == [0, 1, 2, 3]
    assert split_to_count([[0]], 3, tokens) == [[0], [], []]


def test_tiny_global_batch_gives_empty_micro_batches_to_short_ranks():
    # LPT puts 4000 on rank 0 and both 3000s on rank 1, which needs 2 bins; rank 0 has nothing to split
    table = SampleTable.synthetic([4000, 3000, 3000], [0, 0, 0])
    plan = plan_epoch(table, DataConfig(global_batch_size=3, balance="tokens"), 0, dp_size=2)
    (st,) = plan.steps
    assert st.micro_batches == [[[0], []], [[1], [2]]]


def test_ffd_respects_patch_cap():
    tokens = np.array([100] * 10)
    patches = np.array([400] * 10)
    bins = pack_first_fit_decreasing(list(range(10)), tokens, patches, 4096, 1000)
    assert all(patches[b].sum() <= 1000 for b in bins) and len(bins) == 5


def test_sample_over_budget_is_named():
    table = SampleTable.synthetic([100, 5000, 200], [0, 0, 0])
    with pytest.raises(SampleTooLongError, match=r"00000001 \(5000 tokens\).*max_tokens_per_gpu"):
        plan_epoch(table, DataConfig(), 0, 1)
    with pytest.raises(SampleTooLongError, match="00000000 .*patches"):
        plan_epoch(SampleTable.synthetic([100], [900]), DataConfig(max_patches_per_gpu=800), 0, 1)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"max_tokens_per_gpu": 4095, "pad_to_multiple_of": 2}, "max_tokens_per_gpu"),
        ({"global_batch_size": 0}, "global_batch_size"),
        ({"balance": "samples"}, "balance"),
        ({"max_patches_per_gpu": 0}, "max_patches_per_gpu"),
    ],
)
def test_config_errors_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DataConfig(**kwargs)


@pytest.mark.parametrize("name", [n for n in preset_names() if n.startswith("qwen")])
def test_flops_model_reads_every_preset(name):
    f = FlopsModel.for_model(name)
    assert 1e8 < f.llm_params < 2e10 and 1e8 < f.vision_params < 2e9
    short, long = f.sample_flops(np.array([100, 400]), np.array([200, 1200]), np.array([1, 1]))
    assert long > 4 * short
