"""`geo3k inspect DIR`: what is in a shard set, and what training's batching makes of it.

Reads only the manifest, index and rejects file, so it is instant on any size of set. The batching estimate is
no estimate of its own: it is the plan the training loader makes (train/data/packing.py: shuffle, global
batches, balance across data-parallel ranks, first-fit decreasing per rank) for epoch 0 of this set, with the
`train:` settings of pipeline.yaml (global batch, seed, patch cap) and the given token budget.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

import numpy as np

from geo3k.inspect.common import human_bytes, short, stats
from shared.manifest import INDEX, MANIFEST, ShardSet
from train.data.config import DataConfig
from train.data.packing import flops_model_for, plan_epoch
from train.data.reader import SampleTable


# ---------------------------------------------------------------- batching: the training plan


def _fitting(table: SampleTable, cfg: DataConfig) -> tuple[SampleTable, int]:
    """The samples that fit one micro-batch on their own, and how many do not (training refuses a set with any)."""
    fits = table.num_tokens <= cfg.max_tokens_per_gpu
    if cfg.max_patches_per_gpu is not None:
        fits &= table.num_patches <= cfg.max_patches_per_gpu
    keep = np.flatnonzero(fits)
    sub = SampleTable(
        keys=[table.keys[i] for i in keep],
        shards=[table.shards[i] for i in keep],
        num_tokens=table.num_tokens[keep],
        num_patches=table.num_patches[keep],
        num_images=table.num_images[keep],
        num_loss_tokens=table.num_loss_tokens[keep],
    )
    return sub, int(table.num_tokens.size - keep.size)


def batching(ss: ShardSet, cfg: DataConfig, dp_size: int = 1) -> dict[str, Any]:
    """Epoch 0 as the training loader plans it: steps, micro-batches per GPU, fill of the token budget.

    `plan_epoch` itself, on the samples that fit (a sample over the budget or the patch cap makes training
    refuse the set; it is only counted here). Micro-batches are per data-parallel rank, i.e. the forward and
    backward passes each GPU runs in an epoch; fill is real tokens / (micro-batches x ranks x budget).
    """
    table, over = _fitting(SampleTable.from_shard_set(ss), cfg)
    plan = plan_epoch(table, cfg, 0, dp_size, flops_model_for(ss.processor_name))
    bins = [b for s in plan.steps for rank in s.micro_batches for b in rank]
    micro_batches = sum(s.num_micro_batches for s in plan.steps)
    packed = sum(s.num_tokens for s in plan.steps)
    return {
        "algorithm": "the training plan of epoch 0 (train/data/packing.py)",
        "budget": cfg.max_tokens_per_gpu,
        "max_patches": cfg.max_patches_per_gpu,
        "global_batch_size": cfg.global_batch_size,
        "data_parallel": dp_size,
        "seed": cfg.seed,
        "steps": len(plan.steps),
        "micro_batches": micro_batches,
        "packed_tokens": packed,
        "fill_ratio": round(packed / (micro_batches * dp_size * cfg.max_tokens_per_gpu), 4) if micro_batches else 0.0,
        "over_budget": over,
        "dropped": len(table) - sum(s.num_samples for s in plan.steps),
        "max_samples_per_micro_batch": max((len(b) for b in bins), default=0),
    }


def _samples(n: int) -> str:
    return f"{n:,} sample{'s' if n != 1 else ''}"


def _batching_lines(b: dict[str, Any], samples: int) -> list[str]:
    head = f"  batching     {b['budget']:,} tokens/GPU: "
    over = "longer than the budget" if b["max_patches"] is None else f"over the budget or the cap of {b['max_patches']:,} patches"
    fitting = samples - b["over_budget"]
    if b["steps"] == 0 and fitting == 0:
        lines = [head + "0 micro-batches per epoch: no sample fits the budget"]
    elif b["steps"] == 0:
        lines = [
            head + f"0 micro-batches per epoch: {_samples(fitting)}, fewer than one global batch of "
            f"{b['global_batch_size']:,} (training refuses the set): lower train.global_batch_size, e.g. --set "
            f"train.global_batch_size={max(1, min(fitting, b['global_batch_size'] // 2))}"
        ]
    else:
        ranks = f" on each of {b['data_parallel']} data-parallel ranks" if b["data_parallel"] > 1 else ""
        lines = [
            head + f"{b['micro_batches']:,} micro-batch{'es' if b['micro_batches'] != 1 else ''} per epoch{ranks}, "
            f"fill {100 * b['fill_ratio']:.1f}%, up to {b['max_samples_per_micro_batch']} samples each "
            f"(the training plan: {b['steps']:,} step{'s' if b['steps'] != 1 else ''} of {b['global_batch_size']:,} samples)"
        ]
        if b["dropped"]:
            lines.append(f"               {_samples(b['dropped'])} left out of the epoch by drop_last (a different remainder each epoch)")
    if b["over_budget"]:
        lines.append(
            f"               {_samples(b['over_budget'])} {'are' if b['over_budget'] != 1 else 'is'} {over}: training refuses "
            "them; raise --budget (train.max_tokens_per_gpu) to fit them"
        )
    return lines


# ---------------------------------------------------------------- summary


def summarize(root: str | os.PathLike, data: DataConfig | None = None, dp_size: int = 1) -> dict[str, Any]:
    """What is in a shard set, from its manifest, index and rejects file (no shard is read); `data` and
    `dp_size` are what training would plan with (default: DataConfig's defaults on one GPU)."""
    ss = ShardSet(root)
    m = ss.manifest
    index = ss.index()
    tokens = np.asarray(index.column("num_tokens").to_numpy(), dtype=np.int64)
    image_tokens = np.asarray(index.column("num_image_tokens").to_numpy(), dtype=np.int64)
    patches = np.asarray(index.column("num_patches").to_numpy(), dtype=np.int64)
    loss_tokens = np.asarray(index.column("num_loss_tokens").to_numpy(), dtype=np.int64)
    images = np.asarray(index.column("num_images").to_numpy(), dtype=np.int64)

    rejects = ss.rejects()
    by_reason = Counter(r.get("reason", "?") for r in rejects)
    examples = {}
    for r in rejects:
        examples.setdefault(r.get("reason", "?"), {"row": r.get("row"), "detail": r.get("detail")})
    if not rejects:  # an older set may lack the file; the manifest keeps the counts too
        by_reason = Counter(m.get("counts", {}).get("rejected", {}))

    proc = m.get("processor", {})
    ip = proc.get("image_processor", {})
    options = m.get("fingerprint_inputs", {}).get("options", {})
    counts = m.get("counts", {})
    return {
        "path": str(ss.root),
        "dataset": m.get("dataset"),
        "split": m.get("split"),
        "format_version": m.get("format_version"),
        "created_by": m.get("created_by"),
        "fingerprint": ss.fingerprint,
        "shards": len(ss.shards),
        "bytes": int(sum(s.get("bytes", 0) for s in ss.shards)),
        "samples": int(index.num_rows),
        "manifest_samples": ss.num_samples,
        "rows": counts.get("rows"),
        "rejected": int(sum(by_reason.values())),
        "rejects_by_reason": dict(sorted(by_reason.items(), key=lambda kv: (-kv[1], kv[0]))),
        "reject_examples": examples,
        "processor": {
            "name_or_path": proc.get("name_or_path"),
            "preset": proc.get("preset"),
            "processor_class": proc.get("processor_class"),
            "image_processor_class": ip.get("class"),
            "min_pixels": ip.get("size", {}).get("shortest_edge"),
            "max_pixels": ip.get("size", {}).get("longest_edge"),
            "patch_size": ip.get("patch_size"),
            "merge_size": ip.get("merge_size"),
            "tokenizer_class": proc.get("tokenizer_class"),
            "tokenizer_source": proc.get("tokenizer_source"),
            "tokenizer_sha256": proc.get("tokenizer_sha256"),
            "vocab_size": proc.get("vocab_size"),
            "chat_template_sha256": proc.get("chat_template_sha256"),
            "response_template": options.get("response_template"),
            "system_prompt": options.get("system_prompt"),
            "max_tokens": options.get("max_tokens"),
        },
        "tokens": {
            **stats(tokens),
            "total": int(tokens.sum()),
            "image": int(image_tokens.sum()),
            "loss": int(loss_tokens.sum()),
        },
        "per_sample": {
            "images": stats(images),
            "image_tokens": stats(image_tokens),
            "patches": stats(patches),
            "loss_tokens": stats(loss_tokens),
        },
        "batching": batching(ss, data or DataConfig(), dp_size),
    }



def _range(s: dict[str, int]) -> str:
    if s["min"] == s["max"]:
        return f"{s['min']:,}"
    return f"{s['min']:,}–{s['max']:,} (median {s['median']:,})"


def format_summary(d: dict[str, Any]) -> str:
    p, t, ps, b = d["processor"], d["tokens"], d["per_sample"], d["batching"]
    rows = f"{d['rows']:,}" if isinstance(d["rows"], int) else "?"
    rejects = ", ".join(f"{k} {v}" for k, v in d["rejects_by_reason"].items()) or "none"
    proc = p["name_or_path"] or "?"
    if p["preset"]:
        proc += f" (preset {p['preset']})"
    pixels = ""
    if p["min_pixels"] and p["max_pixels"]:
        pixels = f", {p['min_pixels']:,}–{p['max_pixels']:,} pixels"
    system = "no system prompt" if p["system_prompt"] is None else f"system prompt {p['system_prompt']!r:.40}"
    lines = [
        f"{d['dataset']}/{d['split']}  {d['path']}",
        f"  samples      {d['samples']:,} of {rows} source rows; {d['rejected']:,} rejected: {rejects}",
        f"  shards       {d['shards']:,}, {human_bytes(d['bytes'])}, format {d['format_version']}, {d['created_by']}",
        f"  fingerprint  {d['fingerprint']}",
        f"  processor    {proc}, {p['processor_class']}: patch {p['patch_size']}, merge {p['merge_size']}{pixels}",
        f"  tokenizer    {p['tokenizer_class']}, vocab {p['vocab_size']:,}, sha256 {short(p['tokenizer_sha256'])}",
        f"  template     chat template sha256 {short(p['chat_template_sha256'])}, response {p['response_template']!r}, {system}",
        f"  tokens       min {t['min']:,}  median {t['median']:,}  p95 {t['p95']:,}  max {t['max']:,}"
        f"  (total {t['total']:,}: image {t['image']:,}, loss {t['loss']:,})",
        f"  per sample   images {_range(ps['images'])}, image tokens {_range(ps['image_tokens'])}, "
        f"patches {_range(ps['patches'])}, loss tokens {_range(ps['loss_tokens'])}",
    ]
    lines += _batching_lines(b, d["samples"])
    if d["samples"] != d["manifest_samples"]:
        lines.append(
            f"  warning: {INDEX} has {d['samples']:,} rows but {MANIFEST} lists {d['manifest_samples']:,} samples: "
            f"run `geo3k inspect {d['path']} --verify`"
        )
    for reason, ex in d["reject_examples"].items():
        lines.append(f"  e.g. {reason}: row {ex['row']}: {ex['detail']}")
    return "\n".join(lines)

