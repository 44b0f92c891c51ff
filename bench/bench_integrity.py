"""What the loader's integrity checks cost per epoch: shard sha256 on open plus per-record checks.

    .venv/bin/python bench/bench_integrity.py                  # 2,200 demo rows, built once in .cache/bench/integrity
    .venv/bin/python bench/bench_integrity.py --shards data_shards/geo3k/train --epochs 3

The demo set is `geo3k demo-data --train 2200` through `geo3k preprocess` (Qwen3-VL-2B processor, 256 rows a
shard). One process, one torch thread, `num_workers=0` (so every shard is opened, and hashed, by this process),
page cache warm. Three loader passes over the same epochs, each timed per epoch:

  unchecked     the loader with the checks switched off (the reader of before)
  checked       the loader as it trains: each shard's size and sha256 against the manifest when it is first
                opened, every record checked (ids < vocabulary, 0/1 mask, lengths, grid = patches = image tokens)

and, apart, the two parts alone: sha256 over every shard file, and the record check over every sample.
A shard is hashed once per process that opens it, so the hash is paid in the first epoch of a run (per loader
worker), and later epochs pay only the record checks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train.data.loader as loader_mod  # noqa: E402
from shared.manifest import ShardSet  # noqa: E402
from train.data import DataConfig, build_loader  # noqa: E402
from train.data.reader import TarRecordReader  # noqa: E402


def demo_shards(root: Path, rows: int) -> Path:
    split = root / "shards" / "geo3k-demo" / "train"
    if (split / "manifest.json").exists():
        return split
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cli = [sys.executable, "-m", "shared.cli"]
    subprocess.run([*cli, "demo-data", "--out", str(root / "demo"), "--train", str(rows), "--test", "8"], check=True, env=env)
    subprocess.run([*cli, "preprocess", "-c", str(root / "demo" / "pipeline.yaml"), "--split", "train", "-q",
                    "--set", f"shards.output_dir={root / 'shards'}", "--set", "preprocess.fetch.cache_dir="], check=True, env=env)
    return split


class _Unchecked(TarRecordReader):
    """The reader without the manifest hashes and the record checks."""

    def __init__(self, root, expected=None, identity=None):
        super().__init__(root)


def epoch_seconds(split: Path, cfg: DataConfig, checked: bool) -> list[float]:
    loader_mod.TarRecordReader = TarRecordReader if checked else _Unchecked
    try:
        times, t0, epoch = [], time.perf_counter(), 0
        for step in build_loader(split, cfg):
            if step.epoch != epoch:
                times.append(time.perf_counter() - t0)
                t0, epoch = time.perf_counter(), step.epoch
        times.append(time.perf_counter() - t0)
        return times
    finally:
        loader_mod.TarRecordReader = TarRecordReader


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, help="A split folder (default: 2,200 demo rows, built once).")
    ap.add_argument("--rows", type=int, default=2200)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3, help="Passes of each variant; the fastest is reported.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    split = args.shards or demo_shards(REPO / ".cache" / "bench" / "integrity", args.rows)
    ss = ShardSet(split)
    paths = ss.shard_paths
    total_bytes = sum(p.stat().st_size for p in paths)
    cfg = DataConfig(max_tokens_per_gpu=4096, global_batch_size=128, num_epochs=args.epochs, num_workers=0, drop_last=False)

    epoch_seconds(split, cfg, checked=False)  # warm the page cache and the imports
    runs = {"unchecked": [], "checked": []}
    for _ in range(args.repeats):  # interleaved, so a burst of other work on the box hits both alike
        for name in runs:
            runs[name].append(epoch_seconds(split, cfg, checked=name == "checked"))
    best = {name: [min(r[e] for r in rs) for e in range(args.epochs)] for name, rs in runs.items()}

    hash_s = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for p in paths:
            h = hashlib.sha256()
            with open(p, "rb") as f:
                while block := f.read(1 << 20):
                    h.update(block)
        hash_s.append(time.perf_counter() - t0)
    index = ss.index()
    rows = list(zip(index.column("shard").to_pylist(), index.column("key").to_pylist()))
    plain, checker = _Unchecked(split), TarRecordReader(split, None, ss.processor)
    samples = [plain.read(shard, key) for shard, key in rows]  # decoded once, checked alone below
    t0 = time.perf_counter()
    for s in samples:
        checker._check(s)
    check_s = time.perf_counter() - t0

    result = {
        "shards": str(split),
        "num_shards": len(paths),
        "num_samples": ss.num_samples,
        "bytes": total_bytes,
        "epochs": args.epochs,
        "epoch_s_unchecked": best["unchecked"],
        "epoch_s_checked": best["checked"],
        "sha256_all_shards_s": min(hash_s),
        "sha256_gb_per_s": total_bytes / min(hash_s) / 1e9,
        "record_checks_s": check_s,
        "record_check_us_per_sample": 1e6 * check_s / len(samples),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}",
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"{split}: {len(paths)} shards, {ss.num_samples:,} samples, {total_bytes / 1e6:.1f} MB; {result['machine']}")
    print("| epoch | unchecked s | checked s | overhead |")
    print("|---|---|---|---|")
    for e in range(args.epochs):
        u, c = best["unchecked"][e], best["checked"][e]
        print(f"| {e + 1} | {u:.3f} | {c:.3f} | {c - u:+.3f} s ({100 * (c - u) / u:+.1f}%) |")
    print(f"sha256 of every shard: {min(hash_s):.3f} s ({result['sha256_gb_per_s']:.2f} GB/s); "
          f"record checks: {check_s:.3f} s ({result['record_check_us_per_sample']:.0f} us/sample)")


if __name__ == "__main__":
    main()
