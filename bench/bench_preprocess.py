"""Preprocess throughput and bytes per sample: geo3k's shards vs the naive way, and scaling with workers.

    .venv/bin/python bench/bench_preprocess.py --samples 3000 --workers 1,2 --out /tmp/geo3k-bench
    .venv/bin/python bench/bench_preprocess.py --samples 12000 --naive-samples 1000 --workers 1,2,4,8,16 --shard-size 64   # 16 cores

The naive way: loop over the rows, `processor.apply_chat_template(..., tokenize=True)` per row, save `input_ids`,
`image_grid_thw` and the float32 `pixel_values` as .npy files. geo3k: `run_preprocess` with each worker count of
--workers (loss mask, one row in 64 checked against the full processor, zstd, tars, manifest). Both read the same
demo parquet with file:// image URLs (no network time); the processor is loaded before either clock starts.
Samples per CPU-second of this process is the fair "per core" figure (the naive way's torch resizes on several
cores, a geo3k worker uses one). `--variant naive|geo3k` runs one side only, to time each as a whole process from
outside; `--data DIR` reuses the demo data of an earlier run.
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


def naive(parquet: Path, out: Path, model: str, limit: int) -> tuple[float, int, int, float]:
    out.mkdir(parents=True, exist_ok=True)
    processor = load_processor(model).processor  # loaded before the clock starts, as for geo3k (see main)
    c0, t0 = time.process_time(), time.perf_counter()
    rows, total = pq.read_table(parquet).slice(0, limit).to_pylist(), 0
    for i, row in enumerate(rows):
        img = to_rgb(Image.open(row["images"][0].removeprefix("file://")))
        user = [{"type": "image", "image": img}, {"type": "text", "text": row["problem"].replace("<image>", "")}]
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": row["answer"]}]}]
        enc = processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="np")
        for name in ("input_ids", "pixel_values", "image_grid_thw"):
            path = out / f"{i:08d}.{name}.npy"
            np.save(path, np.asarray(enc[name], dtype=np.float32 if name == "pixel_values" else np.int64))
            total += path.stat().st_size
    return time.perf_counter() - t0, len(rows), total, time.process_time() - c0


def ours(data: Path, out: Path, workers: int, model: str, limit: int, shard_size: int) -> tuple[float, int, int, float | None]:
    cfg = load_config(None, [f"shards.output_dir={out}", f"shards.samples_per_shard={shard_size}", f"preprocess.workers={workers}",
                             "preprocess.fetch.cache_dir=null", f"model.name_or_path={model}", f"source.max_rows={limit}"])
    cfg.source.files, cfg.source.splits = {"train": str(data / "train.parquet")}, ["train"]
    c0, t0 = time.process_time(), time.perf_counter()
    (s,) = run_preprocess(cfg, progress=False)
    # this process's CPU time covers one worker (run in-line, fetch threads included); workers of a pool
    # are the fork server's children, not ours, so their CPU time is not seen here
    cpu = time.process_time() - c0 if workers == 1 else None
    return time.perf_counter() - t0, s.written, s.bytes, cpu


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=2000)
    ap.add_argument("--out", type=Path, default=Path("/tmp/geo3k-bench"))
    ap.add_argument("--data", type=Path, default=None, help="demo data folder to reuse (default: drawn into OUT/data)")
    ap.add_argument("--model", default="qwen3-vl-2b")
    ap.add_argument("--variant", choices=["all", "naive", "geo3k"], default="all")
    ap.add_argument("--naive-samples", type=int, default=None, help="rows for the naive way (default: --samples; ~4 MB a row)")
    ap.add_argument("--workers", default=None, help="comma list of geo3k worker counts (default: 1 and all cores)")
    ap.add_argument("--shard-size", type=int, default=256, help="shards.samples_per_shard (smaller spreads a split over more workers)")
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    counts = [int(x) for x in args.workers.split(",")] if args.workers else sorted({1, cores})
    os.environ.setdefault("GEO3K_CACHE", str(args.out / "cache"))
    data = args.data or args.out / "data"
    if not (data / "train.parquet").exists() or pq.read_metadata(data / "train.parquet").num_rows < args.samples:
        shutil.rmtree(data, ignore_errors=True)
        write_demo_data(data, num_train=args.samples, num_test=1, seed=0)
    for name in ("naive", *(f"ours{n}" for n in counts)):
        shutil.rmtree(args.out / name, ignore_errors=True)

    # The processor is loaded once per process before any clock starts (~4 s here, the same for both ways):
    # throughput is per sample, and a fixed start-up cost would only dilute the ratio by the sample count.
    # Pool workers (--workers > 1) load their own copy, inside the timed run.
    load_processor(args.model)
    results = {}
    if args.variant in ("all", "naive"):
        results["naive (1 process)"] = (*naive(data / "train.parquet", args.out / "naive", args.model, args.naive_samples or args.samples), 1)
        shutil.rmtree(args.out / "naive", ignore_errors=True)  # ~4 MB a row, only written to be timed
    for n in counts if args.variant in ("all", "geo3k") else []:
        results[f"geo3k, {n} worker{'s' if n > 1 else ''}"] = (*ours(data, args.out / f"ours{n}", n, args.model, args.samples, args.shard_size), n)

    base = results.get("naive (1 process)")  # (seconds, samples, bytes, CPU seconds, processes)
    one = next((v for k, v in results.items() if k.startswith("geo3k")), None)
    print(f"\nmachine: {platform.processor() or platform.machine()}, {cores} cores; model {args.model}; {args.samples} demo samples\n")
    print("| variant | seconds | samples/s | samples/s per core | vs naive (per core) | samples per CPU-second | vs naive (CPU) "
          "| scaling vs first geo3k row | bytes/sample |\n" + "|---" * 9 + "|")
    for name, (sec, n, nbytes, cpu, procs) in results.items():
        rate = n / sec
        vs = f"{rate / procs / (base[1] / base[0]):.2f}x" if base else "-"
        vs_cpu = f"{n / cpu / (base[1] / base[3]):.2f}x" if cpu and base else "-"
        scale = f"{rate / (one[1] / one[0]):.2f}x" if one and not name.startswith("naive") else "-"
        print(f"| {name} | {sec:.1f} | {rate:.1f} | {rate / procs:.1f} | {vs} | {f'{n / cpu:.1f}' if cpu else '-'} | {vs_cpu} | {scale} | {nbytes / n:,.0f} |")
    if base and one:
        print(f"\nbytes per sample: naive {base[2] / base[1]:,.0f}, geo3k {one[2] / one[1]:,.0f} ({base[2] / base[1] / (one[2] / one[1]):.0f}x smaller)")
    (args.out / "results.json").write_text(json.dumps({k: list(v) for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
