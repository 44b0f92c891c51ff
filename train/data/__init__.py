"""The GPU stage's data path: shard sets -> token-budget packed micro-batches (loader.py explains the flow).

The names below load on first use: the planner (packing.py, reader.py, config.py) needs only NumPy, so
`geo3k inspect` plans an epoch the way training does without importing torch, which loader.py and batch.py need.
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "IGNORE_INDEX": "batch",
    "PackedBatch": "batch",
    "PackingSpec": "batch",
    "normalize_patches_torch": "batch",
    "pack_samples": "batch",
    "DataConfig": "config",
    "GlobalStep": "loader",
    "PackedLoader": "loader",
    "build_loader": "loader",
    "EpochPlan": "packing",
    "FlopsModel": "packing",
    "SampleTooLongError": "packing",
    "StepPlan": "packing",
    "plan_epoch": "packing",
    "SampleTable": "reader",
    "TarRecordReader": "reader",
    "mrope_position_ids": "rope",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value  # once loaded, a plain module attribute
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))
