"""Packing benchmark: fill ratio and packed micro-batches per second on one CPU core, next to padding.

    .venv/bin/python bench/bench_packing.py                       # demo data + Geo3K-like shards, built once in .cache/bench
    .venv/bin/python bench/bench_packing.py --shards data_shards/geo3k/train   # add a real shard set

Two data sets: the demo data (`geo3k demo-data`, 512 train problems through the real Qwen3-VL-2B processor:
short samples, ~190 tokens) and Geo3K-like shards (2101 samples like Geo3K's train split: 100-600 tokens,
mostly image tokens, synthetic diagram-like patches that compress like the real ones).

Fill ratio = real tokens / (micro-batches x 4096), for
  packed, dp=1 / dp=8   the loader's plan: global batches of 128, FFD per rank, equal micro-batch counts
  packed, one stream    the whole epoch packed at once (no step boundaries): the packing algorithm alone
  padded                fixed micro-batches of b samples padded to their longest, b = floor(4096 / longest
                        sample) so that every batch fits the budget (the usual fixed-batch-size fine-tune)
and "of padded length" = real tokens / tokens actually computed (packed batches are not padded to the budget).

Throughput: one process pinned to one core, one torch thread, `num_workers=0`, page cache warm; a micro-batch
is read (pread), decoded (zstd), packed (ids, shifted labels, M-RoPE, cu_seqlens, uint8 patches) -- everything the
workers do. Pixel normalisation happens on the GPU in training; its host cost is reported separately.
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
from train.data import DataConfig, SampleTable, build_loader, plan_epoch  # noqa: E402
from train.data.packing import FlopsModel  # noqa: E402
from train.data.reader import TarRecordReader  # noqa: E402

BUDGET = 4096
CACHE = REPO / ".cache" / "bench"


# ---------------------------------------------------------------- data sets


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
    cfg.source.files = {"train": str(out / "data" / "train.parquet")}
    cfg.source.splits = ["train"]
    run_preprocess(cfg, progress=False)
    return split


def geo3k_like_lengths(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(image grid h, w in merged tokens, text tokens) per sample: 100-600 tokens, mostly image tokens."""
    rng = np.random.default_rng(seed)
    gh = rng.integers(6, 22, n)
    gw = np.clip(np.rint(gh * rng.uniform(0.7, 1.4, n)), 6, 24).astype(np.int64)
    text = rng.integers(45, 130, n)
    return np.stack([gh, gw], 1), text


def geo3k_like_shard_set(template: Path, n: int = 2101) -> Path:
    """Shards with Geo3K-like lengths; the processor facts are copied from a real (demo) shard set."""
    from preprocess.writer import ShardWriter

    out = CACHE / f"geo3k-like-{n}"
    if (out / "manifest.json").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    tmpl = ShardSet(template)
    ids = tmpl.processor["special_ids"]
    ps = tmpl.pixel_spec
    grids, text = geo3k_like_lengths(n)
    rng = np.random.default_rng(1)
    rows, shards, per_shard = [], [], 256
    for s0 in range(0, n, per_shard):
        name = shard_name(len(shards))
        w = ShardWriter(out / name, zstd_level=10)
        for i in range(s0, min(n, s0 + per_shard)):
            gh, gw = (int(x) for x in grids[i])
            n_img = gh * gw
            prompt = rng.integers(1000, 100000, int(text[i]) - 12)
            answer = rng.integers(1000, 100000, 6)
            input_ids = np.concatenate(
                [[ids["im_start"], 872, 198, ids["vision_start"]], np.full(n_img, ids["image_pad"]), [ids["vision_end"]], prompt,
                 [ids["im_end"], 198, ids["im_start"], 77091, 198], answer, [ids["im_end"]]]
            ).astype(np.int32)
            loss_mask = np.zeros(input_ids.size, np.uint8)
            loss_mask[-7:] = 1
            # diagram-like pixels: white page, sparse dark strokes (compresses like the real diagrams)
            patches = np.full((n_img * 4, 3, ps.patch_size, ps.patch_size), 255, np.uint8)
            ink = rng.random(patches.shape[:1] + patches.shape[2:]) < 0.03
            patches[:, :, :, :][np.broadcast_to(ink[:, None], patches.shape)] = 30
            key = f"{i:08d}"
            w.write(Sample(key, input_ids, loss_mask, np.array([[1, 2 * gh, 2 * gw]], np.int32), patches, {"synthetic": True}))
            rows.append(dict(key=key, shard=name, row=i, num_tokens=int(input_ids.size), num_image_tokens=n_img,
                             num_patches=n_img * 4, num_loss_tokens=7, num_images=1))
        w.close()
        shards.append({"name": name, "samples": w.num_samples})
    write_index(out / "index.parquet", rows)
    manifest = {"format_version": 1, "fingerprint": "geo3k-like-synthetic", "processor": tmpl.processor, "shards": shards}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


# ---------------------------------------------------------------- fill


def packed_fill(table: SampleTable, dp_size: int, gbs: int) -> tuple[float, float]:
    """(fill of the plan, fill at the lower bound: k >= ceil(step tokens / (dp_size x budget)) micro-batches)."""
    cfg = DataConfig(max_tokens_per_gpu=BUDGET, global_batch_size=gbs, drop_last=True)
    plan = plan_epoch(table, cfg, 0, dp_size)
    real = sum(st.num_tokens for st in plan.steps)
    n_mb = sum(st.num_micro_batches * dp_size for st in plan.steps)
    bound = sum(-(-st.num_tokens // (dp_size * BUDGET)) * dp_size for st in plan.steps)
    return real / (n_mb * BUDGET), real / (bound * BUDGET)


def padded_fill(table: SampleTable, seed: int = 0) -> tuple[float, float, int, int]:
    b = BUDGET // int(table.num_tokens.max())
    order = np.random.default_rng([seed, 0]).permutation(len(table))
    lens = table.num_tokens[order[: len(order) // b * b]].reshape(-1, b)
    real, computed = lens.sum(), (lens.max(1) * b).sum()
    return real / (lens.shape[0] * BUDGET), real / computed, lens.shape[0], b


def rank_imbalance(table: SampleTable, dp_size: int) -> float:
    flops = FlopsModel()
    cost = flops.sample_flops(table.num_tokens, table.num_patches, table.num_images)
    worst = []
    for st in plan_epoch(table, DataConfig(), 0, dp_size, flops).steps:
        loads = [sum(cost[i] for mb in r for i in mb) for r in st.micro_batches]
        worst.append(max(loads) / np.mean(loads))
    return float(np.mean(worst))


# ---------------------------------------------------------------- throughput


def packed_rate(shards: Path, seconds: float) -> dict:
    loader = build_loader(shards, DataConfig(max_tokens_per_gpu=BUDGET, num_workers=0, num_epochs=50, drop_last=True))
    n_mb = tokens = patches = 0
    it = iter(loader)
    next(it)  # warm the page cache and the tar offset tables
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for mb in next(it).micro_batches:
            n_mb += 1
            tokens += mb.num_real_tokens
            patches += mb.num_patches
    dt = time.perf_counter() - t0
    # the host cost that normalising on the GPU avoids (uint8 -> float32 [N, C*Tp*P*P]), on a few micro-batches
    sample = next(it).micro_batches[:4]
    t = time.perf_counter()
    for mb in sample:
        mb.pixel_values
    norm = (time.perf_counter() - t) / len(sample)
    return {"mb_s": n_mb / dt, "tok_s": tokens / dt, "ms_mb": 1e3 * dt / n_mb, "norm_ms_mb": 1e3 * norm,
            "patches_mb": patches / n_mb, "tokens_mb": tokens / n_mb}


def padded_rate(shards: Path, seconds: float) -> dict:
    """The same records through a padding collate: [b, L] ids/labels/mask, uint8 patches concatenated."""
    ss = ShardSet(shards)
    table = SampleTable.from_shard_set(ss)
    reader = TarRecordReader(ss.root)
    b = BUDGET // int(table.num_tokens.max())
    order = np.random.default_rng(0).permutation(len(table))
    n_mb = tokens = 0
    t0 = time.perf_counter()
    at = 0
    while time.perf_counter() - t0 < seconds:
        rows = order[at : at + b] if at + b <= len(order) else order[:b]
        at = (at + b) % (len(order) - b)
        samples = [reader.read(table.shards[r], table.keys[r]) for r in rows]
        L = max(s.num_tokens for s in samples)
        ids = torch.full((b, L), 0, dtype=torch.int64)
        labels = torch.full((b, L), -100, dtype=torch.int64)
        mask = torch.zeros((b, L), dtype=torch.bool)
        for j, s in enumerate(samples):
            n = s.num_tokens
            ids[j, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
            labels[j, : n - 1] = torch.from_numpy(np.where(s.loss_mask[1:] == 1, s.input_ids[1:], -100))
            mask[j, :n] = True
        torch.from_numpy(np.concatenate([s.patches for s in samples]))
        n_mb += 1
        tokens += sum(s.num_tokens for s in samples)
    dt = time.perf_counter() - t0
    return {"mb_s": n_mb / dt, "tok_s": tokens / dt, "b": b}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=Path, action="append", default=[], help="extra shard set(s) to measure")
    ap.add_argument("--seconds", type=float, default=8.0, help="time per throughput measurement")
    ap.add_argument("--demo-samples", type=int, default=512)
    args = ap.parse_args()

    demo = demo_shard_set(args.demo_samples)
    like = geo3k_like_shard_set(demo)
    sets = [("demo data", demo), ("Geo3K-like", like)] + [(str(p), p) for p in args.shards]

    os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core
    torch.set_num_threads(1)
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cores, pinned to 1; torch {torch.__version__}; budget {BUDGET}\n")

    print("## Fill ratio: real tokens / (micro-batches x budget)\n")
    print("| data | samples | mean tokens | packed dp=1, GBS 128 (bound) | packed dp=8, GBS 128 (bound) | packed, one stream (bound) | padded (b) | padded, of padded length | packed, of padded length | dp=8 rank FLOPs max/mean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, path in sets:
        t = SampleTable.from_shard_set(ShardSet(path))
        f1, b1 = packed_fill(t, 1, 128)
        f8, b8 = packed_fill(t, 8, 128)
        fs, bs = packed_fill(t, 1, len(t))
        fp, fpl, _, b = padded_fill(t)
        imb = rank_imbalance(t, 8)
        print(f"| {name} | {len(t)} | {t.num_tokens.mean():.0f} | {f1:.1%} ({b1:.1%}) | {f8:.1%} ({b8:.1%}) | {fs:.1%} ({bs:.1%}) | "
              f"{fp:.1%} (b={b}) | {fpl:.1%} | 100% | {imb:.3f} |")

    print("\n## Planning: plan_epoch (index only)\n")
    t = SampleTable.from_shard_set(ShardSet(like))
    for dp in (1, 8):
        t0 = time.perf_counter()
        plan = plan_epoch(t, DataConfig(), 0, dp)
        dt = time.perf_counter() - t0
        n = sum(st.num_micro_batches * dp for st in plan.steps)
        print(f"- Geo3K-like, dp={dp}: {1e3 * dt:.1f} ms per epoch ({n / dt:,.0f} micro-batches planned/s)")

    print("\n## Throughput, one core, num_workers=0\n")
    print("| data | packed micro-batches/s | ms / micro-batch | real tokens / micro-batch | patches / micro-batch | real tokens/s | host pixel normalisation (not done: GPU side) ms / micro-batch | padded micro-batches/s (b) | padded real tokens/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, path in sets:
        p = packed_rate(path, args.seconds)
        q = padded_rate(path, args.seconds)
        print(f"| {name} | {p['mb_s']:.1f} | {p['ms_mb']:.1f} | {p['tokens_mb']:.0f} | {p['patches_mb']:.0f} | {p['tok_s']:,.0f} | "
              f"{p['norm_ms_mb']:.1f} | {q['mb_s']:.1f} (b={q['b']}) | {q['tok_s']:,.0f} |")


if __name__ == "__main__":
    main()
