"""train/gc_policy.py: automatic collection off while training, collections at step boundaries only."""

import gc

import pytest

from shared.config import TrainConfig
from shared.errors import UserError
from train.gc_policy import TrainingGC


class _Cycle:
    def __init__(self):
        self.me = self


def _collections() -> list[int]:
    return [s["collections"] for s in gc.get_stats()]


def test_collector_off_inside_and_restored_after():
    assert gc.isenabled()
    with TrainingGC(5) as collector:
        assert not gc.isenabled()
        before = _collections()
        for _ in range(20_000):  # far past the young generation's threshold: no automatic collection
            _Cycle()
        assert _collections() == before
        collector.step_done(4)
        assert _collections() == before  # not a multiple of the interval
        collector.step_done(5)
        after = _collections()
        assert after[1] == before[1] + 1 and after[2] == before[2]  # a young-generation collection
        collector.step_done(50)
        assert _collections()[2] == before[2] + 1  # every 10 intervals, a full one
    assert gc.isenabled()


def test_interval_zero_changes_nothing():
    with TrainingGC(0) as collector:
        assert gc.isenabled()
        before = _collections()
        collector.step_done(50)
        assert _collections() == before
    assert gc.isenabled()


def test_negative_interval_is_refused():
    with pytest.raises(UserError, match="gc_interval"):
        TrainConfig(gc_interval=-1).validate()
