"""Packing benchmark: fill ratio and packed micro-batches per second on one CPU core, next to padding.

    .venv/bin/python bench/bench_packing.py                       # demo data + Geo3K-like shards, built once in .cache/bench
    .venv/bin/python bench/bench_packing.py --shards data_shards/geo3k/train   # add a real shard set
    .venv/bin/python bench/bench_packing.py --make-shards 512     # only write .cache/bench/geo3k-like-512 (bench_throughput's)

Data: the demo data (`geo3k demo-data`, 512 train problems through the real Qwen3-VL-2B processor, ~190 tokens) and
Geo3K-like shards (2101 samples shaped like Geo3K's train split: 100-600 tokens, mostly image tokens, diagram-like
patches that compress like the real ones). Fill = real tokens / (micro-batches x 4096) for the loader's plan (global
batches of 128, dp=1 and dp=8), for the whole epoch packed as one stream (the packing algorithm alone), and for padding
(b = floor(4096 / longest sample) samples a batch, padded to their longest); "of padded length" = real tokens / tokens
computed. Throughput: one process on one core, one torch thread, `num_workers=0`, page cache warm: read, zstd-decode and
pack a micro-batch, all that a loader worker does (pixel normalisation runs on the GPU in training).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.manifest import ShardSet, shard_name, write_index  # noqa: E402
from shared.schema import Sample  # noqa: E402
from train.data import DataConfig, SampleTable, TarRecordReader, build_loader, plan_epoch  # noqa: E402

BUDGET = 4096
CACHE = REPO / ".cache" / "bench"


def demo_shard_set(num_train: int) -> Path:
    out = CACHE / f"demo-{num_train}"
    split = out / "shards" / "geo3k" / "train"
    if (split / "manifest.json").exists():
        return split
    os.environ.setdefault("GEO3K_CACHE", str(CACHE / "geo3k-cache"))
    from preprocess.demo import write_demo_data
    from preprocess.pipeline import run_preprocess
    from shared.config import load_config

    write_demo_data(out / "data", num_train=num_train, num_test=8, seed=0)
    cfg = load_config(None, [f"shards.output_dir={out / 'shards'}", "preprocess.fetch.cache_dir=", "shards.samples_per_shard=256"])
    cfg.source.files, cfg.source.splits = {"train": str(out / "data" / "train.parquet")}, ["train"]
    run_preprocess(cfg, progress=False)
    return split


def geo3k_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image grid h, w in merged tokens, text tokens) per sample: 100-600 tokens, mostly image tokens."""
    rng = np.random.default_rng(seed)
    gh = rng.integers(6, 22, n)
    gw = np.clip(np.rint(gh * rng.uniform(0.7, 1.4, n)), 6, 24).astype(np.int64)
    return np.stack([gh, gw], 1), rng.integers(45, 130, n)  # text tokens


def geo3k_like_shard_set(template: Path, n: int = 2101) -> Path:
    """Shards with Geo3K-like lengths; the processor facts are copied from a real (demo) shard set."""
    from preprocess.writer import ShardWriter

    out = CACHE / f"geo3k-like-{n}"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmpl = ShardSet(template)
    ids, ps = tmpl.processor["special_ids"], tmpl.pixel_spec
    grids, text = geo3k_like_lengths(n)
    rng, rows, shards = np.random.default_rng(1), [], []
    for s0 in range(0, n, 256):
        name = shard_name(len(shards))
        w = ShardWriter(out / name, zstd_level=10)
        for i in range(s0, min(n, s0 + 256)):
            n_img = int(grids[i].prod())
            prompt, answer = rng.integers(1000, 100000, int(text[i]) - 12), rng.integers(1000, 100000, 6)
            input_ids = np.concatenate([[ids["im_start"], 872, 198, ids["vision_start"]], np.full(n_img, ids["image_pad"]),
                                        [ids["vision_end"]], prompt, [ids["im_end"], 198, ids["im_start"], 77091, 198], answer,
                                        [ids["im_end"]]]).astype(np.int32)
            loss_mask = (np.arange(input_ids.size) >= input_ids.size - 7).astype(np.uint8)  # the answer and its <|im_end|>
            # diagram-like pixels: white page, sparse dark strokes (compresses like the real diagrams)
            patches = np.full((n_img * 4, 3, ps.patch_size, ps.patch_size), 255, np.uint8)
            ink = rng.random(patches.shape[:1] + patches.shape[2:]) < 0.03
            patches[np.broadcast_to(ink[:, None], patches.shape)] = 30
            w.write(Sample(f"{i:08d}", input_ids, loss_mask, np.array([[1, *(2 * grids[i])]], np.int32), patches, {"synthetic": True}))
            rows.append(dict(key=f"{i:08d}", shard=name, row=i, num_tokens=int(input_ids.size), num_image_tokens=n_img,
                             num_patches=n_img * 4, num_loss_tokens=7, num_images=1))
        w.close()
        shards.append({"name": name, "samples": w.num_samples})
    write_index(out / "index.parquet", rows)
    (out / "manifest.json").write_text(json.dumps({"format_version": 1, "fingerprint": "geo3k-like-synthetic",
                                                   "processor": tmpl.processor, "shards": shards}))
    return out


def packed_fill(table: SampleTable, dp_size: int, gbs: int) -> tuple[float, float]:
    """(fill of the plan, fill at the lower bound: k >= ceil(step tokens / (dp_size x budget)) micro-batches)."""
    plan = plan_epoch(table, DataConfig(max_tokens_per_gpu=BUDGET, global_batch_size=gbs, drop_last=True), 0, dp_size)
    real, n_mb = sum(st.num_tokens for st in plan.steps), sum(st.num_micro_batches * dp_size for st in plan.steps)
    bound = sum(-(-st.num_tokens // (dp_size * BUDGET)) * dp_size for st in plan.steps)
    return real / (n_mb * BUDGET), real / (bound * BUDGET)


def padded_fill(table: SampleTable, seed: int = 0) -> tuple[float, float, int, int]:
    b = BUDGET // int(table.num_tokens.max())
    order = np.random.default_rng([seed, 0]).permutation(len(table))
    lens = table.num_tokens[order[: len(order) // b * b]].reshape(-1, b)
    real, computed = lens.sum(), (lens.max(1) * b).sum()
    return real / (lens.shape[0] * BUDGET), real / computed, lens.shape[0], b


def packed_rate(shards: Path, seconds: float) -> dict:
    it = iter(build_loader(shards, DataConfig(max_tokens_per_gpu=BUDGET, num_workers=0, num_epochs=50, drop_last=True)))
    next(it)  # warm the page cache and the tar offset tables
    n_mb = tokens = patches = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        mbs = next(it).micro_batches
        n_mb, tokens, patches = n_mb + len(mbs), tokens + sum(mb.num_real_tokens for mb in mbs), patches + sum(mb.num_patches for mb in mbs)
    dt = time.perf_counter() - t0
    return {"mb_s": n_mb / dt, "tok_s": tokens / dt, "ms_mb": 1e3 * dt / n_mb, "patches_mb": patches / n_mb, "tokens_mb": tokens / n_mb}


def padded_rate(shards: Path, seconds: float) -> dict:
    """The same records through a padding collate: [b, L] ids, shifted labels and mask; uint8 patches concatenated."""
    table, reader = SampleTable.from_shard_set(ShardSet(shards)), TarRecordReader(shards)
    b = BUDGET // int(table.num_tokens.max())
    order = np.random.default_rng(0).permutation(len(table))
    n_mb = tokens = at = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        samples = [reader.read(table.shards[r], table.keys[r]) for r in order[at : at + b]]
        at = (at + b) % (len(order) - b)
        length = max(s.num_tokens for s in samples)
        ids, labels, mask = torch.zeros((b, length), dtype=torch.int64), torch.full((b, length), -100), torch.zeros((b, length), dtype=torch.bool)
        for j, s in enumerate(samples):
            ids[j, : s.num_tokens], mask[j, : s.num_tokens] = torch.from_numpy(s.input_ids.astype(np.int64)), True
            labels[j, : s.num_tokens - 1] = torch.from_numpy(np.where(s.loss_mask[1:] == 1, s.input_ids[1:], -100))
        torch.from_numpy(np.concatenate([s.patches for s in samples]))
        n_mb, tokens = n_mb + 1, tokens + sum(s.num_tokens for s in samples)
    return {"mb_s": n_mb / (dt := time.perf_counter() - t0), "tok_s": tokens / dt, "b": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shards", type=Path, action="append", default=[], help="extra shard set(s) to measure")
    ap.add_argument("--seconds", type=float, default=8.0, help="time per throughput measurement")
    ap.add_argument("--demo-samples", type=int, default=512)
    ap.add_argument("--make-shards", type=int, metavar="N", help="only write N Geo3K-like samples to .cache/bench/geo3k-like-N")
    args = ap.parse_args()
    demo = demo_shard_set(args.demo_samples)
    if args.make_shards:
        return print(geo3k_like_shard_set(demo, args.make_shards))
    sets = [("demo data", demo), ("Geo3K-like", geo3k_like_shard_set(demo))] + [(str(p), p) for p in args.shards]
    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, pinned to 1; torch {torch.__version__}; budget {BUDGET}")
    print("\n## Fill ratio: real tokens / (micro-batches x budget)\n\n| data | samples | mean tokens | packed dp=1, GBS 128 (bound) "
          "| packed dp=8, GBS 128 (bound) | packed, one stream (bound) | padded (b) | padded, of padded length | packed, of padded length |\n" + "|---" * 9 + "|")
    for name, path in sets:
        t = SampleTable.from_shard_set(ShardSet(path))
        fills = [packed_fill(t, dp, gbs) for dp, gbs in ((1, 128), (8, 128), (1, len(t)))]
        fp, fpl, _, b = padded_fill(t)
        print(f"| {name} | {len(t)} | {t.num_tokens.mean():.0f} | " + " | ".join(f"{f:.1%} ({bound:.1%})" for f, bound in fills)
              + f" | {fp:.1%} (b={b}) | {fpl:.1%} | 100% |")
    print("\n## Throughput, one core, num_workers=0\n\n| data | packed micro-batches/s | ms / micro-batch | real tokens / micro-batch "
          "| patches / micro-batch | real tokens/s | padded micro-batches/s (b) | padded real tokens/s |\n" + "|---" * 8 + "|")
    for name, path in sets:
        p, q = packed_rate(path, args.seconds), padded_rate(path, args.seconds)
        print(f"| {name} | {p['mb_s']:.1f} | {p['ms_mb']:.1f} | {p['tokens_mb']:.0f} | {p['patches_mb']:.0f} | {p['tok_s']:,.0f} "
              f"| {q['mb_s']:.1f} (b={q['b']}) | {q['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
