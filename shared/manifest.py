"""The files beside a shard set, and reading a shard set back without any training code.

    data_shards/<dataset>/<split>/
        shard-000000.tar ...   WebDataset tars (shared/schema.py says what a record holds)
        manifest.json          every shard (samples, bytes, sha256), counts, the fingerprint and what made it
        index.parquet          one row per sample: key, shard, token/image-token/patch/loss-token counts
        rejects.jsonl          one line per rejected source row: row, reason class, detail

The manifest is written last, so its presence means the set is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tarfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from shared.errors import UserError
from shared.schema import FORMAT_VERSION, PixelSpec, Sample, decode_sample

MANIFEST = "manifest.json"
INDEX = "index.parquet"
REJECTS = "rejects.jsonl"

INDEX_SCHEMA = pa.schema(
    [
        ("key", pa.string()),
        ("shard", pa.string()),
        ("row", pa.int64()),
        ("num_tokens", pa.int32()),
        ("num_image_tokens", pa.int32()),
        ("num_patches", pa.int32()),
        ("num_loss_tokens", pa.int32()),
        ("num_images", pa.int16()),
        # sha256 of each image file as read: a rerun compares local and cached images against it
        ("image_sha256", pa.list_(pa.string())),
    ]
)


class ShardSetError(UserError, RuntimeError):
    """A folder that is not a (complete, readable) shard set; the message says what to do."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write under a temporary name, flush to disk, then rename: readers never see a partial file."""
    # the temporary name is private to this process and thread: two writers of one file never share it
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_index(path: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=INDEX_SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    atomic_write_bytes(path, sink.getvalue().to_pybytes())


class ShardSet:
    """A complete shard set on disk: its manifest, index and records."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        if not self.root.is_dir():
            raise ShardSetError(f"{self.root} is not a folder: pass a split folder such as data_shards/geo3k/train")
        mpath = self.root / MANIFEST
        if not mpath.exists():
            tars = sorted(self.root.glob("shard-*.tar"))
            hint = (
                "it holds shards but no manifest: the preprocess run did not finish; rerun `geo3k preprocess` to complete it"
                if tars
                else "it is not a shard set; pass a split folder such as data_shards/geo3k/train"
            )
            subdirs = sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).exists())
            if subdirs:
                hint = f"it holds split folders: pass one of {', '.join(str(self.root / s) for s in subdirs)}"
            raise ShardSetError(f"{self.root} has no {MANIFEST}: {hint}")
        try:
            self.manifest: dict[str, Any] = json.loads(mpath.read_text())
        except json.JSONDecodeError as e:
            raise ShardSetError(f"{mpath} is not valid JSON ({e}): rerun `geo3k preprocess --force`") from None
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise ShardSetError(
                f"{self.root} has shard format version {version}, this geo3k reads up to {FORMAT_VERSION}: "
                "upgrade geo3k (pip install -U geo3k) or preprocess again with this version"
            )

    # -- facts from the manifest
    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def processor(self) -> dict[str, Any]:
        return self.manifest["processor"]

    @property
    def processor_name(self) -> str | None:
        """What `load_processor` loads the set's processor (and tokenizer) from: its preset, else the recorded hub id
        or model folder; None when the manifest names neither."""
        return self.processor.get("preset") or self.processor.get("name_or_path")

    @property
    def pixel_spec(self) -> PixelSpec:
        return PixelSpec.from_dict(self.processor["pixel_spec"])

    @property
    def shards(self) -> list[dict[str, Any]]:
        return self.manifest["shards"]

    @property
    def shard_paths(self) -> list[Path]:
        return [self.root / s["name"] for s in self.shards]

    @property
    def num_samples(self) -> int:
        return sum(s["samples"] for s in self.shards)

    def index(self) -> pa.Table:
        path = self.root / INDEX
        if not path.exists():
            raise ShardSetError(f"{path} is missing: rerun `geo3k preprocess --force` to rebuild the shard set")
        try:
            return pq.read_table(path)
        except (pa.ArrowException, OSError) as e:  # truncated or overwritten: arrow's own message, then the fix
            raise ShardSetError(f"{path} cannot be read ({e}): rerun `geo3k preprocess --force` to rebuild the shard set") from None

    def rejects(self) -> list[dict[str, Any]]:
        path = self.root / REJECTS
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    # -- records
    def iter_samples(self, shard: str | Path | None = None) -> Iterator[Sample]:
        paths = [self.root / Path(shard).name] if shard is not None else self.shard_paths
        for p in paths:
            for key, members in iter_tar_records(p):
                yield decode_sample(key, members)

    def get(self, key_or_index: str | int) -> Sample:
        """One sample by key, or by its position (0-based) in manifest order."""
        index = self.index()
        keys = index.column("key").to_pylist()
        if isinstance(key_or_index, int) or (isinstance(key_or_index, str) and key_or_index.isdigit() and key_or_index not in keys):
            i = int(key_or_index)
            if not 0 <= i < len(keys):
                raise ShardSetError(f"sample index {i} is out of range: this set has {len(keys)} samples (0..{len(keys) - 1})")
            key = keys[i]
        else:
            key = str(key_or_index)
        if key not in keys:
            raise ShardSetError(f"no sample with key {key!r}; keys look like {keys[0]!r}" if keys else "the set is empty")
        shard = index.column("shard")[keys.index(key)].as_py()
        for k, members in iter_tar_records(self.root / shard):
            if k == key:
                return decode_sample(k, members)
        raise ShardSetError(f"{key} is in {INDEX} but not in {shard}: run `geo3k inspect {self.root} --verify`")


def iter_tar_records(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Group a WebDataset tar's members by key, in file order: (key, {field: bytes})."""
    key: str | None = None
    members: dict[str, bytes] = {}
    with tarfile.open(path, "r:") as tf:
        for info in tf:
            if not info.isfile():
                continue
            base = info.name.rsplit("/", 1)[-1]
            k, _, fld = base.partition(".")
            if k != key:
                if key is not None:
                    yield key, members
                key, members = k, {}
            f = tf.extractfile(info)
            assert f is not None
            members[fld] = f.read()
    if key is not None:
        yield key, members
