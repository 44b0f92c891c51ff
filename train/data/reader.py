"""Read a shard set for training: the per-sample index as arrays, and records by key.

Why random access instead of a sequential webdataset stream: the loader plans each epoch from the index
(every sample's token and patch counts are known without decoding), so it knows which records each
micro-batch needs before reading any. A WebDataset tar is uncompressed, so a record is a few byte ranges
of a file: `TarRecordReader` scans each shard's headers once (no data is read), then fetches a record's
members with `os.pread`. Workers share the OS page cache, not a Python cache, so host memory does not grow
with workers, and pread needs no shared file position, so one descriptor serves forked workers safely.

Limit: this needs a seekable (local or POSIX network) filesystem. Shards on object storage must be copied
to local disk first (Geo3K's train split is a few hundred MB of shards).
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from shared.manifest import ShardSet
from shared.schema import RecordError, Sample, decode_sample


@dataclass
class SampleTable:
    """The index of a shard set as column arrays, one row per sample, sorted by key.

    Sorting by key makes the training order independent of how the samples were split into shards.
    """

    keys: list[str]
    shards: list[str]
    num_tokens: np.ndarray  # int64 [N]
    num_patches: np.ndarray  # int64 [N]
    num_images: np.ndarray  # int64 [N]
    num_loss_tokens: np.ndarray  # int64 [N]

    def __len__(self) -> int:
        return len(self.keys)

    @classmethod
    def from_shard_set(cls, shard_set: ShardSet) -> "SampleTable":
        t = shard_set.index()
        keys = t.column("key").to_pylist()
        order = sorted(range(len(keys)), key=keys.__getitem__)
        col = lambda name: np.asarray(t.column(name).to_numpy(), dtype=np.int64)[order]  # noqa: E731
        table = cls(
            keys=[keys[i] for i in order],
            shards=[s for s in np.asarray(t.column("shard").to_pylist(), dtype=object)[order]],
            num_tokens=col("num_tokens"),
            num_patches=col("num_patches"),
            num_images=col("num_images"),
            num_loss_tokens=col("num_loss_tokens"),
        )
        if len(set(table.keys)) != len(table.keys):
            raise RecordError(f"{shard_set.root}: the index repeats a key: rerun `geo3k preprocess --force`")
        return table

    @classmethod
    def synthetic(cls, num_tokens, num_patches, num_images=None, num_loss_tokens=None) -> "SampleTable":
        """A table without shards, for planning benchmarks and tests."""
        n = len(num_tokens)
        arr = lambda x, d: np.asarray(d if x is None else x, dtype=np.int64)  # noqa: E731
        return cls(
            keys=[f"{i:08d}" for i in range(n)],
            shards=[""] * n,
            num_tokens=arr(num_tokens, None),
            num_patches=arr(num_patches, None),
            num_images=arr(num_images, np.ones(n)),
            num_loss_tokens=arr(num_loss_tokens, np.ones(n)),
        )


class TarRecordReader:
    """Fetch records of a shard set by (shard, key) with positioned reads into the tar files."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._members: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
        self._fds: dict[str, int] = {}

    def __getstate__(self):
        # Descriptors do not travel to a spawned process; each process opens its own on first use.
        return {"root": self.root, "_members": self._members, "_fds": {}}

    def _scan(self, shard: str) -> dict[str, list[tuple[str, int, int]]]:
        members: dict[str, list[tuple[str, int, int]]] = {}
        with tarfile.open(self.root / shard, "r:") as tf:
            for info in tf:  # headers only: tarfile seeks over the data blocks
                if info.isfile():
                    key, _, fld = info.name.rsplit("/", 1)[-1].partition(".")
                    members.setdefault(key, []).append((fld, info.offset_data, info.size))
        return members

    def read_members(self, shard: str, key: str) -> dict[str, bytes]:
        if shard not in self._members:
            self._members[shard] = self._scan(shard)
        entries = self._members[shard].get(key)
        if entries is None:
            raise RecordError(f"{key} is in the index but not in {self.root / shard}: run `geo3k inspect {self.root} --verify`")
        fd = self._fds.get(shard)
        if fd is None:
            fd = self._fds[shard] = os.open(self.root / shard, os.O_RDONLY)
        return {fld: os.pread(fd, size, offset) for fld, offset, size in entries}

    def read(self, shard: str, key: str) -> Sample:
        return decode_sample(key, self.read_members(shard, key))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
