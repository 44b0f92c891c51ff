"""`geo3k preprocess`: source rows -> pre-tokenized WebDataset shards, per split.

    read source -> plan shards (fixed row ranges) -> [workers: fetch images -> encode -> write shard] -> manifest

Shard i always holds source rows [i*S, (i+1)*S) minus rejects, whatever the number of workers, so the output
is byte-identical across reruns and worker counts, and a shard is the unit of work, of resumption and of
splitting a job across machines (`--shards a:b`). Each finished shard leaves a small part file in `.parts/`
(its index rows, rejects and stats); the manifest is assembled from them once every shard is done, and is
written last, so a folder with a manifest is complete and one without is resumable.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from preprocess.images import FetchedImage, Reject, fetch_image
from preprocess.samples import make_sample
from preprocess.sources import Source, open_source, row_fields
from preprocess.writer import ShardWriter
from shared.config import PipelineConfig, to_dict
from shared.errors import UserError
from shared.manifest import INDEX, MANIFEST, REJECTS, atomic_write_bytes, shard_name, write_index
from shared.presets import load_processor
from shared.schema import FORMAT_VERSION

PARTS = ".parts"
GEO3K_VERSION = "0.1.0"


class PreprocessError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- fingerprint


def fingerprint_inputs(cfg: PipelineConfig, src: Source, identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the shards' bytes (and nothing that doesn't, like the worker count)."""
    pre = to_dict(cfg.preprocess)
    pre.pop("workers")
    fetch = pre.pop("fetch")
    return {
        "format_version": FORMAT_VERSION,
        "source": {"origin": src.origin, "sha256": src.sha256, "rows": src.num_rows, "split": src.split},
        "columns": {k: getattr(cfg.source, k) for k in ("input_key", "label_key", "image_key")},
        "processor": identity,
        "options": {
            **pre,
            "max_image_pixels": fetch["max_image_pixels"],
            "max_bytes": fetch["max_bytes"],
            "samples_per_shard": cfg.shards.samples_per_shard,
            "zstd_level": cfg.shards.zstd_level,
        },
    }


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            changes.append(f"{k}: {str(a.get(k))[:60]} -> {str(b.get(k))[:60]}")
    return changes


# ---------------------------------------------------------------- the worker side

_WORKER: dict[str, Any] = {}


def _init_worker(cfg: PipelineConfig) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend
    _WORKER["cfg"] = cfg
    _WORKER["proc"] = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)


def _worker_context():
    """Workers start from a fork server that has imported torch, transformers and the Qwen-VL processor code
    once, so each worker starts in well under a second instead of importing them itself (~5 s each, which
    ate most of the gain of a second worker on small jobs). Unlike a plain fork, the server is a clean process:
    no threads or CUDA state of the parent are inherited."""
    try:
        ctx = get_context("forkserver")
    except ValueError:  # platforms without fork (Windows)
        return get_context("spawn")
    ctx.set_forkserver_preload(
        ["torch", "transformers", "transformers.models.qwen2_vl.image_processing_qwen2_vl", "preprocess.pipeline"]
    )
    return ctx


@dataclass
class ShardTask:
    index: int
    start: int
    stop: int
    rows: list[dict[str, Any]]
    out_dir: str
    base_dir: str


def _fetch_row_images(rows: list[tuple[Any, Any, list[Any]]], cfg: PipelineConfig, base_dir: Path) -> list[list[Any]]:
    """Fetch every image of a shard concurrently; each slot holds a FetchedImage or a Reject."""
    flat = [(r, j, e) for r, (_, _, entries) in enumerate(rows) for j, e in enumerate(entries)]
    results: list[list[Any]] = [[None] * len(entries) for _, _, entries in rows]

    def one(entry: Any) -> Any:
        try:
            return fetch_image(entry, cfg.preprocess.fetch, base_dir)
        except Reject as e:
            return e

    with ThreadPoolExecutor(cfg.preprocess.fetch.concurrency) as pool:
        for (r, j, _), res in zip(flat, pool.map(one, [e for _, _, e in flat])):
            results[r][j] = res
    return results


def process_shard(task: ShardTask) -> dict[str, Any]:
    cfg: PipelineConfig = _WORKER["cfg"]
    proc = _WORKER["proc"]
    out_dir = Path(task.out_dir)
    name = shard_name(task.index)
    fields = [row_fields(r, cfg.source) for r in task.rows]
    fetched = _fetch_row_images(fields, cfg, Path(task.base_dir))
    writer = ShardWriter(out_dir / name, cfg.shards.zstd_level)
    index_rows, rejects = [], []
    stats: Counter[str] = Counter()
    try:
        for offset, ((problem, answer, _), imgs) in enumerate(zip(fields, fetched)):
            row = task.start + offset
            key = f"{row:08d}"
            try:
                bad = next((x for x in imgs if isinstance(x, Reject)), None)
                if bad is not None:
                    raise bad
                ok: list[FetchedImage] = imgs
                info = [{"source": f.source, "sha256": f.sha256, "bytes": f.num_bytes, "width": f.image.width, "height": f.image.height} for f in ok]
                sample = make_sample(key, row, problem, answer, [f.image for f in ok], info, proc, cfg.preprocess)
            except Reject as e:
                rejects.append({"row": row, "reason": e.reason, "detail": e.detail})
                continue
            writer.write(sample)
            m = sample.meta
            index_rows.append(
                {
                    "key": key,
                    "shard": name,
                    "row": row,
                    "num_tokens": m["num_tokens"],
                    "num_image_tokens": m["num_image_tokens"],
                    "num_patches": m["num_patches"],
                    "num_loss_tokens": m["num_loss_tokens"],
                    "num_images": len(info),
                }
            )
            stats["tokens"] += m["num_tokens"]
            stats["image_tokens"] += m["num_image_tokens"]
            stats["loss_tokens"] += m["num_loss_tokens"]
            stats["patches"] += m["num_patches"]
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    part = {
        "index": task.index,
        "rows": [task.start, task.stop],
        "name": name,
        "samples": len(index_rows),
        "bytes": size,
        "sha256": sha,
        "index_rows": index_rows,
        "rejects": rejects,
        "stats": dict(stats),
    }
    # The part file is written after the tar is in place: a part file means its shard is complete.
    atomic_write_bytes(out_dir / PARTS / f"{task.index:06d}.json", json.dumps(part).encode())
    return part


# ---------------------------------------------------------------- the driver


@dataclass
class SplitSummary:
    split: str
    out_dir: Path
    status: str  # "written", "up-to-date", "partial"
    rows: int = 0
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    image_tokens: int = 0
    loss_tokens: int = 0
    bytes: int = 0
    shards: int = 0
    shards_done_now: int = 0
    seconds: float = 0.0

    def lines(self) -> list[str]:
        if self.status == "up-to-date":
            return [f"{self.split}: up to date ({self.out_dir}, {self.written} samples in {self.shards} shards); nothing to do"]
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        head = f"{self.split}: {self.out_dir}" + ("" if self.status == "written" else f" ({self.status})")
        return [
            head,
            f"  rows read {self.rows} = written {self.written} + rejected {sum(self.rejected.values())} ({rej})",
            f"  tokens {self.tokens:,} (image {self.image_tokens:,}, loss {self.loss_tokens:,}); "
            f"shards {self.shards} ({self.shards_done_now} this run), {self.bytes / 1e6:.1f} MB",
            f"  time {self.seconds:.1f}s ({rate:.1f} rows/s)",
        ]


def parse_shard_range(text: str | None, num_shards: int) -> range:
    if not text:
        return range(num_shards)
    try:
        a, _, b = text.partition(":")
        start = int(a) if a else 0
        stop = int(b) if b else num_shards
    except ValueError:
        raise PreprocessError(f"--shards {text!r}: write START:STOP, e.g. 0:8 (shard indices, STOP excluded)") from None
    if not 0 <= start < stop <= num_shards:
        raise PreprocessError(f"--shards {text!r}: this split has shards 0..{num_shards - 1}")
    return range(start, stop)


def _load_parts(parts_dir: Path) -> dict[int, dict[str, Any]]:
    parts = {}
    for p in parts_dir.glob("[0-9]*.json"):
        part = json.loads(p.read_text())
        parts[part["index"]] = part
    return parts


def _check_reuse(out: Path, fp: str, inputs: dict[str, Any], force: bool) -> str | None:
    """Decide what to do with an existing output folder: 'up-to-date', None (proceed), or raise."""
    recorded = None
    if (out / MANIFEST).exists():
        recorded = json.loads((out / MANIFEST).read_text())
    elif (out / PARTS / "fingerprint.json").exists():
        recorded = json.loads((out / PARTS / "fingerprint.json").read_text())
    if recorded is None:
        if any(out.glob("shard-*.tar")) and not force:
            raise PreprocessError(f"{out} holds shards of unknown origin: remove them or pass --force")
        return None
    if recorded["fingerprint"] == fp and not force:
        return "up-to-date" if (out / MANIFEST).exists() else None
    if not force:
        changes = describe_changes(recorded["fingerprint_inputs"], inputs)
        raise PreprocessError(
            f"{out} holds shards made from different inputs, and geo3k will not mix them. Changed:\n  "
            + "\n  ".join(changes[:12])
            + "\nRebuild with `geo3k preprocess --force`, or write elsewhere with --set shards.output_dir=DIR"
        )
    return None


def _clear(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + [out / MANIFEST, out / INDEX, out / REJECTS]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def preprocess_split(
    cfg: PipelineConfig,
    split: str,
    *,
    config_dir: Path | None = None,
    force: bool = False,
    shard_range: str | None = None,
    progress: bool = True,
) -> SplitSummary:
    t0 = time.monotonic()
    src = open_source(cfg.source, split, config_dir)
    proc = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    inputs = fingerprint_inputs(cfg, src, proc.identity)
    fp = fingerprint_of(inputs)
    out = cfg.split_dir(split)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # leftovers of a killed run; never visible as shards
        stale.unlink(missing_ok=True)

    verdict = _check_reuse(out, fp, inputs, force)
    if verdict == "up-to-date":
        m = json.loads((out / MANIFEST).read_text())
        return SplitSummary(split, out, "up-to-date", written=m["counts"]["written"], shards=len(m["shards"]))
    if force:  # rebuild from scratch: nothing of an earlier run is kept
        _clear(out)
    parts_dir = out / PARTS
    parts_dir.mkdir(exist_ok=True)
    atomic_write_bytes(parts_dir / "fingerprint.json", json.dumps({"fingerprint": fp, "fingerprint_inputs": inputs}).encode())

    per = cfg.shards.samples_per_shard
    num_shards = max(1, math.ceil(src.num_rows / per))
    wanted = parse_shard_range(shard_range, num_shards)
    done = _load_parts(parts_dir)
    todo = [i for i in wanted if i not in done]
    tasks = [
        ShardTask(i, i * per, min((i + 1) * per, src.num_rows), src.rows(i * per, min((i + 1) * per, src.num_rows)), str(out), str(src.base_dir))
        for i in todo
    ]
    workers = cfg.preprocess.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    bar = None
    if progress and tasks:
        from tqdm import tqdm

        bar = tqdm(total=sum(t.stop - t.start for t in tasks), unit="row", desc=f"preprocess {split}", dynamic_ncols=True)
    try:
        if workers == 1:
            _init_worker(cfg)
            for t in tasks:
                done[t.index] = process_shard(t)
                if bar:
                    bar.update(t.stop - t.start)
        elif tasks:
            with ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker, initargs=(cfg,)) as pool:
                for part in pool.map(process_shard, tasks):
                    done[part["index"]] = part
                    if bar:
                        bar.update(part["rows"][1] - part["rows"][0])
    finally:
        if bar:
            bar.close()

    summary = _summarize(split, out, done, time.monotonic() - t0, len(tasks))
    missing = [i for i in range(num_shards) if i not in done]
    if missing:
        summary.status = f"partial: {num_shards - len(missing)} of {num_shards} shards done; run the rest, then rerun without --shards to finish"
        return summary
    _write_manifest(cfg, out, src, inputs, fp, [done[i] for i in range(num_shards)], summary)
    return summary


def _summarize(split: str, out: Path, parts: dict[int, dict[str, Any]], seconds: float, done_now: int) -> SplitSummary:
    s = SplitSummary(split, out, "written", seconds=seconds, shards=len(parts), shards_done_now=done_now)
    rejected: Counter[str] = Counter()
    for p in parts.values():
        s.rows += p["rows"][1] - p["rows"][0]
        s.written += p["samples"]
        s.bytes += p["bytes"]
        s.tokens += p["stats"].get("tokens", 0)
        s.image_tokens += p["stats"].get("image_tokens", 0)
        s.loss_tokens += p["stats"].get("loss_tokens", 0)
        rejected.update(r["reason"] for r in p["rejects"])
    s.rejected = dict(rejected)
    return s


def _write_manifest(
    cfg: PipelineConfig, out: Path, src: Source, inputs: dict[str, Any], fp: str, parts: list[dict[str, Any]], s: SplitSummary
) -> None:
    if s.rows != src.num_rows or s.rows != s.written + sum(s.rejected.values()):
        raise PreprocessError(f"counts do not reconcile: {src.num_rows} source rows, {s.rows} planned, {s.written} written, {s.rejected} rejected")
    write_index(out / INDEX, [r for p in parts for r in p["index_rows"]])
    rejects = [r for p in parts for r in p["rejects"]]
    atomic_write_bytes(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"geo3k {GEO3K_VERSION}",
        "dataset": cfg.dataset,
        "split": src.split,
        "fingerprint": fp,
        "fingerprint_inputs": inputs,
        "processor": inputs["processor"],
        "shards": [{k: p[k] for k in ("name", "samples", "bytes", "sha256", "rows")} for p in parts],
        "counts": {
            "rows": s.rows,
            "written": s.written,
            "rejected": s.rejected,
            "tokens": s.tokens,
            "image_tokens": s.image_tokens,
            "loss_tokens": s.loss_tokens,
            "bytes": s.bytes,
        },
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    shutil.rmtree(out / PARTS, ignore_errors=True)


def run_preprocess(
    cfg: PipelineConfig, *, config_dir: Path | None = None, force: bool = False, shard_range: str | None = None, progress: bool = True
) -> list[SplitSummary]:
    return [
        preprocess_split(cfg, split, config_dir=config_dir, force=force, shard_range=shard_range, progress=progress)
        for split in cfg.source.splits
    ]
