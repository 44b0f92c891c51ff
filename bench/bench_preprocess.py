"""Preprocess throughput and bytes per sample: geo3k's shards vs the naive way.

    .venv/bin/python bench/bench_preprocess.py --samples 2000 --out /tmp/geo3k-bench

The naive way: load the processor, loop over the rows, call `processor.apply_chat_template(..., tokenize=True)`
per row and save `input_ids` and the float32 `pixel_values` as .npy files. geo3k: `run_preprocess` with 1
worker and with one worker per core (it also computes the loss mask, checks the pixel round trip, compresses
and writes tars and the manifest). Both read the same demo parquet with file:// image URLs, so no network
time is measured. Prints a Markdown table for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from preprocess.demo import write_demo_data  # noqa: E402
from preprocess.images import to_rgb  # noqa: E402
from preprocess.pipeline import run_preprocess  # noqa: E402
from shared.config import load_config  # noqa: E402
from shared.presets import load_processor  # noqa: E402


def naive(parquet: Path, out: Path, model: str) -> tuple[float, int, int]:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    processor = load_processor(model).processor
    rows = pq.read_table(parquet).to_pylist()
    total = 0
    for i, row in enumerate(rows):
        img = to_rgb(Image.open(row["images"][0].removeprefix("file://")))
        text = row["problem"].replace("<image>", "")
        messages = [
            {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]},
            {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]},
        ]
        enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="np")
        for name in ("input_ids", "pixel_values", "image_grid_thw"):
            path = out / f"{i:08d}.{name}.npy"
            np.save(path, np.asarray(enc[name], dtype=np.float32 if name == "pixel_values" else np.int64))
            total += path.stat().st_size
    return time.perf_counter() - t0, len(rows), total


def ours(data: Path, out: Path, workers: int, model: str) -> tuple[float, int, int]:
    cfg = load_config(
        None,
        [
            f"shards.output_dir={out}",
            f"preprocess.workers={workers}",
            "preprocess.fetch.cache_dir=null",
            f"model.name_or_path={model}",
        ],
    )
    cfg.source.files = {"train": str(data / "train.parquet")}
    cfg.source.splits = ["train"]
    t0 = time.perf_counter()
    (s,) = run_preprocess(cfg, progress=False)
    return time.perf_counter() - t0, s.written, s.bytes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo3k-bench"))
    ap.add_argument("--model", default="qwen3-vl-2b")
    args = ap.parse_args()
    os.environ.setdefault("GEO3K_CACHE", str(args.out / "cache"))
    shutil.rmtree(args.out, ignore_errors=True)
    data = args.out / "data"
    write_demo_data(data, num_train=args.samples, num_test=1, seed=0)
    cores = os.cpu_count() or 1

    results = {}
    results["naive (1 process)"] = (*naive(data / "train.parquet", args.out / "naive", args.model), 1)
    results["geo3k, 1 worker"] = (*ours(data, args.out / "ours1", 1, args.model), 1)
    results[f"geo3k, {cores} workers"] = (*ours(data, args.out / "oursN", cores, args.model), cores)

    base_rate = results["naive (1 process)"][1] / results["naive (1 process)"][0]
    base_bytes = results["naive (1 process)"][2] / results["naive (1 process)"][1]
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores; model {args.model}; {args.samples} demo samples\n")
    print("| variant | seconds | samples/s | samples/s per core | vs naive | bytes/sample | bytes vs naive |")
    print("|---|---|---|---|---|---|---|")
    for name, (sec, n, nbytes, procs) in results.items():
        rate = n / sec
        print(
            f"| {name} | {sec:.1f} | {rate:.1f} | {rate / procs:.1f} | {rate / base_rate:.2f}x | "
            f"{nbytes / n:,.0f} | {base_bytes / (nbytes / n):.0f}x smaller |"
            if not name.startswith("naive")
            else f"| {name} | {sec:.1f} | {rate:.1f} | {rate:.1f} | 1.00x | {nbytes / n:,.0f} | 1x |"
        )
    (args.out / "results.json").write_text(json.dumps({k: list(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
