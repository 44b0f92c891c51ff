"""The training stage's data path: shards -> per-rank packed micro-batches, grouped into global steps.

    from train.data import DataConfig, build_loader

    loader = build_loader("data_shards/geo3k/train", DataConfig(), dp_rank=rank, dp_size=world)
    loader.load_state_dict(ckpt["data"])            # optional: resume exactly where the checkpoint was
    for step in loader:                             # one GlobalStep per optimizer step, 3 epochs by default
        for mb in step.micro_batches:               # this rank's share; every rank has the same count
            mb = mb.to(device, non_blocking=True, pixel_dtype=torch.bfloat16)
            loss = model(**mb.model_inputs()).sum() / step.num_loss_tokens   # global loss-token count
            loss.backward()                         # (times dp_size if gradients are averaged over ranks)
        optimizer.step()
        ckpt["data"] = loader.state_dict()          # (epoch, step) of the next step, same on every rank

The stages, each a plain function or generator:

    plan_epoch (packing.py)     index only: shuffle -> global batches -> balance ranks -> FFD micro-batches
    _work_items (here)          this rank's micro-batches in order, from the saved position on: the sampler
    _MicroBatches (here)        in a worker: read the records (reader.py), pack them (batch.py)
    torch DataLoader            workers, prefetch, pinned memory, results returned in sampler order
    __iter__ (here)             k consecutive micro-batches -> one GlobalStep, position advanced

Sharding. Ranks never read the same sample: the plan gives each rank its own micro-batches of every step.
Workers never build the same micro-batch: the DataLoader hands each sampler item to exactly one worker and
returns the results in sampler order, whatever the number of workers. So every sample of an epoch is used
exactly once over ranks x workers (with `drop_last`, exactly once among those kept).

Resuming. The plan is a pure function of (index, config, epoch, dp_size), so the position is just (epoch, step
within the epoch). `state_dict()` is the step after the last one this iterator yielded; prefetched micro-batches
beyond it are rebuilt after a restore, so nothing is repeated or skipped. The samples of a step do not depend
on dp_size, so a restore may change the number of ranks.

Errors. A shard that is missing, truncated or differs from the manifest's sha256, and a record that cannot be
decoded, fails its checks (reader.py) or disagrees with the index, stop training with one `ShardError` naming
the shard and how to rebuild it: skipping it would break the plan and the global loss-token count that every
rank already knows. Missing and truncated shards are found when the loader is built (a stat per shard), before
step 1; a worker that meets a bad record hands the message back instead of raising, so the trainer raises it
as it is, not wrapped in a worker traceback.

Throughput. Workers hold no cache: records are positioned reads into the tars (the OS page cache keeps a
Geo3K-sized shard set in memory for all workers at once), decoding is one zstd decompression per record, and
packing is a handful of array copies. Pixel normalisation waits for `.to(device)` (batch.py says why).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from shared.errors import UserError
from shared.manifest import ShardSet
from shared.schema import RecordError
from train.data.batch import PackedBatch, PackingSpec, pack_samples
from train.data.config import DataConfig
from train.data.packing import EpochPlan, FlopsModel, check_fits, flops_model_for, plan_epoch, steps_per_epoch
from train.data.reader import SampleTable, ShardError, TarRecordReader, check_shard_files, expected_shards, rebuild_hint


class LoaderError(UserError, ValueError):
    """A shard set or saved position this loader cannot serve; the message says what to change."""


@dataclass
class GlobalStep:
    """One optimizer step as seen by one rank."""

    epoch: int
    step: int
    """Index within the epoch."""
    global_step: int
    """epoch * steps_per_epoch + step."""
    micro_batches: list[PackedBatch]
    """This rank's micro-batches; all ranks have the same number."""
    num_loss_tokens: int
    """Loss tokens of the whole global batch (all ranks): divide the summed per-token loss by this."""
    num_samples: int
    """Samples of the whole global batch."""
    num_tokens: int
    """Real (unpadded) tokens of the whole global batch."""

    @property
    def keys(self) -> list[str]:
        return [k for mb in self.micro_batches for k in mb.keys]


@dataclass
class _Failed:
    """What a worker returns instead of a micro-batch it could not build: the one-line reason."""

    message: str


class _MicroBatches(Dataset):
    """Map-style dataset whose 'index' is a work item: (epoch, step, micro-batch, table rows)."""

    def __init__(self, reader: TarRecordReader, keys: list[str], shards: list[str], num_tokens, num_loss_tokens, spec: PackingSpec):
        self.reader = reader
        self.keys, self.shards, self.num_tokens, self.num_loss_tokens, self.spec = keys, shards, num_tokens, num_loss_tokens, spec

    def __getitem__(self, item):
        where, rows = item
        try:
            samples = []
            for r in rows:
                s = self.reader.read(self.shards[r], self.keys[r])
                loss_tokens = int(s.loss_mask.sum())
                if s.num_tokens != int(self.num_tokens[r]) or loss_tokens != int(self.num_loss_tokens[r]):
                    raise ShardError(
                        f"{self.reader.root / self.shards[r]}: record {s.key} holds {s.num_tokens} tokens, {loss_tokens} in "
                        f"the loss; the index says {int(self.num_tokens[r])} and {int(self.num_loss_tokens[r])}: "
                        f"{rebuild_hint(self.reader.root)}"
                    )
                samples.append(s)
            return where, pack_samples(samples, self.spec)
        except (ShardError, RecordError) as e:
            # raised in a worker, torch would re-raise it wrapped in that worker's traceback
            return where, _Failed(str(e))

    def __len__(self) -> int:  # the sampler decides; this only satisfies Dataset's interface
        raise TypeError("_MicroBatches is indexed by work items, it has no length")


def _as_is(x):
    return x


class PackedLoader:
    """Iterate global steps of packed micro-batches for one data-parallel rank; resumable mid-epoch."""

    def __init__(
        self,
        shard_dir: str | os.PathLike,
        cfg: DataConfig,
        dp_rank: int = 0,
        dp_size: int = 1,
        *,
        flops: FlopsModel | None = None,
    ):
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must lie in 0..dp_size-1 (dp_size={dp_size})")
        self.cfg = cfg.validate()
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.shard_set = ShardSet(shard_dir)
        self.table = SampleTable.from_shard_set(self.shard_set)
        if len(self.table) != self.shard_set.num_samples:
            raise ShardError(
                f"{self.shard_set.root}: the index has {len(self.table)} samples, the manifest {self.shard_set.num_samples}: "
                f"{rebuild_hint(self.shard_set.root)}"
            )
        if not len(self.table):
            raise LoaderError(f"{self.shard_set.root} holds no samples (every row was rejected?): see its rejects.jsonl")
        check_shard_files(self.shard_set, set(self.table.shards))  # a deleted or truncated shard: refused now
        check_fits(self.table, cfg)  # fail before training starts, not in the middle of an epoch
        self.steps_per_epoch = steps_per_epoch(len(self.table), cfg)
        if self.steps_per_epoch == 0:
            raise LoaderError(
                f"{self.shard_set.root} holds {len(self.table)} samples, fewer than global_batch_size="
                f"{cfg.global_batch_size} with drop_last: lower train.global_batch_size (--set train.global_batch_size=N)"
            )
        self.spec = PackingSpec.from_processor_identity(self.shard_set.processor, cfg.pad_to_multiple_of)
        self.flops = flops if flops is not None else flops_model_for(self.shard_set.processor_name)
        self.pin_memory = torch.cuda.is_available() if cfg.pin_memory is None else cfg.pin_memory
        self._epoch, self._step = 0, 0
        self._plans: dict[int, EpochPlan] = {}

    # -- facts
    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.cfg.num_epochs

    @property
    def global_step(self) -> int:
        """Steps already yielded (or restored), i.e. the global index of the next step."""
        return self._epoch * self.steps_per_epoch + self._step

    def __len__(self) -> int:
        """Steps left to yield."""
        return self.total_steps - self.global_step

    def plan(self, epoch: int) -> EpochPlan:
        """The plan of an epoch for all ranks (cached: the sampler and the step assembly both need it)."""
        if epoch not in self._plans:
            self._plans = {e: p for e, p in self._plans.items() if e >= epoch - 1}
            self._plans[epoch] = plan_epoch(self.table, self.cfg, epoch, self.dp_size, self.flops)
        return self._plans[epoch]

    # -- position
    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self._epoch,
            "step": self._step,
            "seed": self.cfg.seed,
            "global_batch_size": self.cfg.global_batch_size,
            "drop_last": self.cfg.drop_last,
            "num_samples": len(self.table),
            "fingerprint": self.shard_set.fingerprint,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        # These decide which samples form each step; anything else (dp_size, budget, workers) may change.
        mine = self.state_dict()
        for name in ("seed", "global_batch_size", "drop_last", "num_samples", "fingerprint"):
            if state.get(name) != mine[name]:
                raise LoaderError(
                    f"cannot resume the data position: the checkpoint has {name}={state.get(name)!r}, this run "
                    f"{mine[name]!r}; use the checkpoint's shard set and train settings (seed, global_batch_size), or start a new run"
                )
        epoch, step = int(state["epoch"]), int(state["step"])
        if epoch < 0 or not 0 <= step < self.steps_per_epoch:
            raise ValueError(f"data position epoch={epoch} step={step} is outside 0..{self.steps_per_epoch - 1} steps")
        self._epoch, self._step = epoch, step

    # -- iteration
    def _work_items(self, epoch0: int, step0: int) -> Iterator[tuple[tuple[int, int, int], list[int]]]:
        for epoch in range(epoch0, self.cfg.num_epochs):
            for sp in self.plan(epoch).steps[step0 if epoch == epoch0 else 0 :]:
                for j, rows in enumerate(sp.micro_batches[self.dp_rank]):
                    yield (epoch, sp.step, j), rows

    def __iter__(self) -> Iterator[GlobalStep]:
        epoch0, step0 = self._epoch, self._step
        workers = self.cfg.num_workers
        reader = TarRecordReader(self.shard_set.root, expected_shards(self.shard_set), self.shard_set.processor)
        t = self.table
        dataset = _MicroBatches(reader, t.keys, t.shards, t.num_tokens, t.num_loss_tokens, self.spec)
        loader = DataLoader(
            dataset,
            sampler=self._work_items(epoch0, step0),
            batch_size=None,
            collate_fn=_as_is,
            num_workers=workers,
            prefetch_factor=self.cfg.prefetch_factor if workers else None,
            pin_memory=self.pin_memory,
            # (no persistent_workers needed: this one DataLoader spans all remaining epochs, so the workers and
            # their prefetch queue carry across epoch boundaries without a restart stall)
        )
        it = iter(loader)
        try:
            for epoch in range(epoch0, self.cfg.num_epochs):
                steps = self.plan(epoch).steps
                for sp in steps[step0 if epoch == epoch0 else 0 :]:
                    micro_batches = []
                    for j in range(sp.num_micro_batches):
                        where, mb = next(it)
                        assert tuple(where) == (epoch, sp.step, j), f"work item {where} out of order, expected {(epoch, sp.step, j)}"
                        if isinstance(mb, _Failed):
                            raise ShardError(mb.message)
                        micro_batches.append(mb)
                    # Advance before yielding: a state_dict() taken after this step is consumed points at the next.
                    self._epoch, self._step = (epoch, sp.step + 1) if sp.step + 1 < len(steps) else (epoch + 1, 0)
                    yield GlobalStep(
                        epoch=epoch,
                        step=sp.step,
                        global_step=epoch * self.steps_per_epoch + sp.step,
                        micro_batches=micro_batches,
                        num_loss_tokens=sp.num_loss_tokens,
                        num_samples=sp.num_samples,
                        num_tokens=sp.num_tokens,
                    )
        finally:
            del it  # shuts the workers down when the trainer stops early


def build_loader(
    shard_dir: str | os.PathLike, cfg: DataConfig | None = None, dp_rank: int = 0, dp_size: int = 1, *, flops: FlopsModel | None = None
) -> PackedLoader:
    """The loader of one data-parallel rank over a split folder such as data_shards/geo3k/train."""
    return PackedLoader(shard_dir, cfg or DataConfig(), dp_rank, dp_size, flops=flops)
