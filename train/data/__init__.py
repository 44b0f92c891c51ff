"""The GPU stage's data path: shard sets -> token-budget packed micro-batches (loader.py explains the flow)."""

from train.data.batch import IGNORE_INDEX, PackedBatch, PackingSpec, normalize_patches_torch, pack_samples
from train.data.config import DataConfig
from train.data.loader import GlobalStep, PackedLoader, build_loader
from train.data.packing import EpochPlan, FlopsModel, SampleTooLongError, StepPlan, plan_epoch
from train.data.reader import SampleTable, TarRecordReader
from train.data.rope import mrope_position_ids

__all__ = [
    "IGNORE_INDEX",
    "DataConfig",
    "EpochPlan",
    "FlopsModel",
    "GlobalStep",
    "PackedBatch",
    "PackedLoader",
    "PackingSpec",
    "SampleTable",
    "SampleTooLongError",
    "StepPlan",
    "TarRecordReader",
    "build_loader",
    "mrope_position_ids",
    "normalize_patches_torch",
    "pack_samples",
    "plan_epoch",
]
