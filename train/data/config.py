"""The data path's knobs, one per decision, checked when built.

    cfg = DataConfig(max_tokens_per_gpu=4096, global_batch_size=128, num_epochs=3)

The trainer builds it from pipeline.yaml's `train:` section (train/trainer.py: budget, patch cap, global batch,
epochs, seed, workers; the tensor-parallel size as pad_to_multiple_of under sequence parallelism), and
`DataConfig.from_train_config` sets the same fields for `geo3k inspect`'s batching estimate. The other knobs
(balance, drop_last, prefetch, pin_memory) keep these defaults there; tests and benchmarks set them here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DataConfig:
    """How shards become packed micro-batches and global steps (train/data/loader.py explains the plan)."""

    max_tokens_per_gpu: int = 4096
    """Token budget of one packed micro-batch, padding included. Every sample must fit on its own."""
    max_patches_per_gpu: int | None = None
    """Cap on vision patches per micro-batch (bounds the vision encoder's activations); None: no cap."""
    pad_to_multiple_of: int = 1
    """Pad each micro-batch to a multiple of this many tokens (the tensor-parallel size under sequence parallelism)."""
    global_batch_size: int = 128
    """Samples per optimizer step over all data-parallel ranks (the recipe's 128)."""
    drop_last: bool = True
    """Drop the last, partial global batch of each epoch (verl's SFT loader does): every step has exactly
    `global_batch_size` samples. The dropped remainder differs per epoch because the shuffle does."""
    num_epochs: int = 3
    """Passes over the shard set (the recipe trains 3)."""
    seed: int = 0
    """Seed of the per-epoch shuffle; the order is a function of (seed, epoch) only."""
    balance: str = "flops"
    """How a global batch is split across data-parallel ranks: `flops` (LLM + vision estimate) or `tokens`."""
    num_workers: int = 2
    """Background processes that read, decode and pack micro-batches; 0 does it in the training process."""
    prefetch_factor: int = 4
    """Micro-batches each worker keeps ready ahead of the trainer."""
    pin_memory: bool | None = None
    """Page-lock host batches for asynchronous copies; None: when CUDA is available."""

    def __post_init__(self) -> None:
        self.validate()

    @classmethod
    def from_train_config(cls, tc) -> "DataConfig":
        """The knobs pipeline.yaml's `train:` section sets (a shared.config.TrainConfig); the rest keep their defaults."""
        return cls(
            max_tokens_per_gpu=tc.max_tokens_per_gpu,
            max_patches_per_gpu=tc.max_patches_per_micro_batch,
            pad_to_multiple_of=tc.tensor_parallel if tc.sequence_parallel else 1,
            global_batch_size=tc.global_batch_size,
            num_epochs=tc.epochs,
            seed=tc.seed,
            num_workers=tc.num_workers,
        )

    def validate(self, path: str = "train.data") -> "DataConfig":
        def need(cond: bool, name: str, msg: str) -> None:
            if not cond:
                raise ValueError(f"{path}.{name}: {msg}")

        need(self.pad_to_multiple_of >= 1, "pad_to_multiple_of", "must be >= 1 (1 means no padding)")
        need(self.max_tokens_per_gpu >= 1, "max_tokens_per_gpu", "must be a positive token count, e.g. 4096")
        need(
            self.max_tokens_per_gpu % self.pad_to_multiple_of == 0,
            "max_tokens_per_gpu",
            f"{self.max_tokens_per_gpu} is not a multiple of pad_to_multiple_of={self.pad_to_multiple_of}; "
            f"use {self.max_tokens_per_gpu - self.max_tokens_per_gpu % self.pad_to_multiple_of or self.pad_to_multiple_of}",
        )
        need(
            self.max_patches_per_gpu is None or self.max_patches_per_gpu >= 1,
            "max_patches_per_gpu",
            "must be a positive patch count or null (no cap)",
        )
        need(self.global_batch_size >= 1, "global_batch_size", "must be >= 1 sample")
        need(self.num_epochs >= 1, "num_epochs", "must be >= 1")
        need(self.balance in ("flops", "tokens"), "balance", f"{self.balance!r}: write flops or tokens")
        need(self.num_workers >= 0, "num_workers", "must be >= 0 (0 = load in the training process)")
        need(self.prefetch_factor >= 1, "prefetch_factor", "must be >= 1")
        return self
