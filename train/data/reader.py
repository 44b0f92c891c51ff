"""Read a shard set for training: the per-sample index as arrays, and records by key.

Why random access instead of a sequential webdataset stream: the loader plans each epoch from the index
(every sample's token and patch counts are known without decoding), so it knows which records each
micro-batch needs before reading any. A WebDataset tar is uncompressed, so a record is a few byte ranges
of a file: `TarRecordReader` scans each shard's headers once (no data is read), then fetches a record's
members with `os.pread`. Workers share the OS page cache, not a Python cache, so host memory does not grow
with workers, and pread needs no shared file position, so one descriptor serves forked workers safely.

Limit: this needs a seekable (local or POSIX network) filesystem. Shards on object storage must be copied
to local disk first (Geo3K's train split is a few hundred MB of shards).

Integrity. The manifest holds every shard's size and sha256. The first time a process opens a shard, its
size is compared and the whole file is read once, hashed, before any record of it is served: a flipped
byte anywhere (a token id, a mask value, a compressed patch, the JSON) or a truncated tar stops training
with a `ShardError` naming the shard, instead of training on it. The read also fills the page cache, so the
positioned reads that follow are memory copies; the cost is one sequential read and hash per shard per
process, in the loader's background workers (BENCHMARKS.md measures it per epoch). Every decoded record is
then checked on its own: ids within the tokenizer's vocabulary, a 0/1 loss mask of the same length, image
tokens x merge^2 = patches = grid. That second check also covers a shard set whose manifest was rewritten to
match bad records.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from shared.errors import UserError
from shared.manifest import ShardSet
from shared.schema import RecordError, Sample, decode_sample


class ShardError(UserError, RuntimeError):
    """A shard that is missing, truncated, corrupt or holds a bad record; the message names it and the fix."""


def rebuild_hint(root: str | os.PathLike) -> str:
    # preprocess says "up to date" while a manifest exists, so a damaged set needs --force; its output is
    # byte-identical to the original, so the manifest's hashes (and a checkpoint's fingerprint) still hold
    return (
        f"rebuild the shard set with `geo3k preprocess --force` (same config; `geo3k inspect {root} --verify` "
        "lists every bad shard), then train again (--resume continues from the last checkpoint)"
    )


def check_shard_files(shard_set: ShardSet, shards_in_index: set[str]) -> None:
    """Every shard the index uses is in the manifest and on disk with the manifest's size (a stat per shard:
    a deleted or truncated shard is refused before step 1; flipped bytes are found when a shard is opened)."""
    listed = {s["name"]: s for s in shard_set.shards}
    root = shard_set.root
    stray = sorted(shards_in_index - set(listed))
    if stray:
        raise ShardError(f"{root}: the index names {stray[0]}, which the manifest does not list: {rebuild_hint(root)}")
    for name in sorted(shards_in_index):
        path = root / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ShardError(f"{path} is missing (the manifest lists it): {rebuild_hint(root)}") from None
        if "bytes" in listed[name] and size != listed[name]["bytes"]:
            raise ShardError(
                f"{path} has {size:,} bytes, the manifest says {listed[name]['bytes']:,} (truncated or replaced): {rebuild_hint(root)}"
            )


def verify_shards(shard_set: ShardSet) -> None:
    """Hash every shard of a set against its manifest now (ShardError on the first bad one)."""
    reader = TarRecordReader(shard_set.root, expected_shards(shard_set))
    try:
        for s in shard_set.shards:
            reader._open(s["name"])
    finally:
        reader.close()


def expected_shards(shard_set: ShardSet) -> dict[str, tuple[int, str] | None]:
    """{shard name: (bytes, sha256)} from the manifest, what `TarRecordReader` checks each shard against. `geo3k
    preprocess` always records both; a hand-made set without them (the benchmarks' synthetic shards) maps to
    None: such a shard is only checked record by record."""
    return {s["name"]: (int(s["bytes"]), str(s["sha256"])) if "bytes" in s and "sha256" in s else None for s in shard_set.shards}


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
            raise ShardError(f"{shard_set.root}: the index repeats a key: {rebuild_hint(shard_set.root)}")
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
    """Fetch records of a shard set by (shard, key) with positioned reads into the tar files.

    With `expected` ({shard: (bytes, sha256)}, from the manifest) each shard is checked the first time this
    process opens it; with `identity` (the manifest's processor) each record is checked as it is decoded.
    Every problem is a `ShardError` naming the shard."""

    def __init__(self, root: str | os.PathLike, expected: dict[str, tuple[int, str] | None] | None = None, identity: dict[str, Any] | None = None):
        self.root = Path(root)
        self.expected = expected
        self.vocab_size = int(identity["vocab_size"]) if identity else None
        self.image_token_id = int(identity["special_ids"]["image_pad"]) if identity else None
        self.merge_size = int(identity["pixel_spec"]["merge_size"]) if identity else None
        self._members: dict[str, dict[str, list[tuple[str, int, int]]]] = {}
        self._fds: dict[str, int] = {}

    def __getstate__(self):
        # Descriptors do not travel to a spawned process; each process opens (and checks) its own on first use.
        return {**self.__dict__, "_fds": {}}

    def _verify(self, shard: str, fd: int) -> None:
        if self.expected[shard] is None:
            return
        size, sha = self.expected[shard]
        path = self.root / shard
        got = os.fstat(fd).st_size
        if got != size:
            raise ShardError(f"{path} has {got:,} bytes, the manifest says {size:,} (truncated or replaced): {rebuild_hint(self.root)}")
        h = hashlib.sha256()
        while block := os.read(fd, 1 << 20):  # sequential: also brings the file into the page cache
            h.update(block)
        if h.hexdigest() != sha:
            raise ShardError(
                f"{path} is corrupt: its sha256 {h.hexdigest()[:12]}… differs from the manifest's {sha[:12]}…: {rebuild_hint(self.root)}"
            )

    def _open(self, shard: str) -> int:
        fd = self._fds.get(shard)
        if fd is not None:
            return fd
        path = self.root / shard
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise ShardError(f"{path} is missing (the index names it): {rebuild_hint(self.root)}") from None
        try:
            if self.expected is not None:
                if shard not in self.expected:
                    raise ShardError(f"{path} is not listed in the manifest: {rebuild_hint(self.root)}")
                self._verify(shard, fd)
            if shard not in self._members:
                self._members[shard] = self._scan(shard)
        except BaseException:
            os.close(fd)
            raise
        self._fds[shard] = fd
        return fd

    def _scan(self, shard: str) -> dict[str, list[tuple[str, int, int]]]:
        members: dict[str, list[tuple[str, int, int]]] = {}
        try:
            with tarfile.open(self.root / shard, "r:") as tf:
                for info in tf:  # headers only: tarfile seeks over the data blocks
                    if info.isfile():
                        key, _, fld = info.name.rsplit("/", 1)[-1].partition(".")
                        members.setdefault(key, []).append((fld, info.offset_data, info.size))
        except (tarfile.TarError, EOFError, OSError) as e:
            raise ShardError(f"{self.root / shard} is not a readable tar ({e}): {rebuild_hint(self.root)}") from None
        return members

    def read_members(self, shard: str, key: str) -> dict[str, bytes]:
        fd = self._open(shard)
        entries = self._members[shard].get(key)
        if entries is None:
            raise ShardError(f"{key} is in the index but not in {self.root / shard}: {rebuild_hint(self.root)}")
        out = {fld: os.pread(fd, size, offset) for fld, offset, size in entries}
        if any(len(out[fld]) != size for fld, _, size in entries):  # the file shrank after it was opened
            raise ShardError(f"{self.root / shard} ends inside record {key} (truncated): {rebuild_hint(self.root)}")
        return out

    def read(self, shard: str, key: str) -> Sample:
        members = self.read_members(shard, key)
        try:
            sample = decode_sample(key, members)
            if self.vocab_size is not None:
                self._check(sample)
        except RecordError as e:
            raise ShardError(f"{self.root / shard}: bad record {e}: {rebuild_hint(self.root)}") from None
        return sample

    def _check(self, s: Sample) -> None:
        """What the model would silently train on otherwise: ids past the vocabulary, mask bytes other than
        0/1 (a 254 would count as 1), lengths that disagree."""
        ids, mask = s.input_ids, s.loss_mask
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer) or mask.dtype != np.uint8:
            raise RecordError(f"{s.key}: input_ids {ids.dtype}{list(ids.shape)}, loss_mask {mask.dtype}: expected int32 [T] and uint8 [T]")
        if ids.size and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
            bad = int(ids.max()) if int(ids.max()) >= self.vocab_size else int(ids.min())
            raise RecordError(f"{s.key}: token id {bad} is outside the tokenizer's vocabulary of {self.vocab_size:,}")
        if s.patches.ndim != 4:
            raise RecordError(f"{s.key}: patches have shape {list(s.patches.shape)}, expected [N, C, P, P]")
        s.check(self.image_token_id, self.merge_size)  # mask 0/1 and length, grid = patches = image tokens

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass
