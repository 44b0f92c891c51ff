"""`geo3k inspect`: look inside a shard set without writing code.

    geo3k inspect data_shards/geo3k/train                        # summary
    geo3k inspect data_shards/geo3k/train --sample 3 --save-image diagram.png
    geo3k inspect data_shards/geo3k/train --verify               # exit 1 names every bad shard and record
    geo3k inspect data_shards/geo3k/train --plot lengths.png --json

Every mode builds a plain JSON-able dict first (`summarize`, `view_sample`, `verify`); the text views
(`format_*`) only render those dicts, so `--json` and the human output never disagree. The summary reads
only the manifest, index and rejects file, so it is instant on any size of set; `--sample` reads one shard
and loads the tokenizer named in the manifest; `--verify` reads every byte.

This module depends on shared/ only: the batching estimate uses its own packer (`pack_ffd`), not the
training loader, so that inspecting shards never imports training code.
"""

from __future__ import annotations

import os
import re
import sys
import tarfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np

from shared.manifest import INDEX, MANIFEST, ShardSet, ShardSetError, iter_tar_records, sha256_file
from shared.schema import RecordError, Sample, decode_sample

DEFAULT_BUDGET = 4096
MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # the loss-masked-in span when colour is off


class InspectError(ShardSetError):
    """A request `geo3k inspect` cannot serve; the message says what to do (printed as one line, exit 2)."""


# ---------------------------------------------------------------- small helpers


def use_color(stream: TextIO = sys.stdout) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def _stats(values: np.ndarray) -> dict[str, int]:
    """min/median/p95/max as nearest-rank values, i.e. lengths that some sample really has."""
    if values.size == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    v = np.sort(values)

    def rank(q: float) -> int:
        return int(v[max(0, int(np.ceil(q * v.size)) - 1)])

    return {"min": int(v[0]), "median": rank(0.5), "p95": rank(0.95), "max": int(v[-1])}


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def _short(h: str | None, n: int = 12) -> str:
    return f"{h[:n]}…" if h else "-"


# ---------------------------------------------------------------- dynamic batching estimate


@dataclass
class Packing:
    budget: int
    num_microbatches: int
    num_packed_tokens: int
    fill_ratio: float  # packed tokens / (micro-batches * budget)
    num_over_budget: int  # samples longer than the budget, left out of the packing
    max_samples_per_microbatch: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "algorithm": "first-fit decreasing",
            "budget": self.budget,
            "micro_batches": self.num_microbatches,
            "packed_tokens": self.num_packed_tokens,
            "fill_ratio": round(self.fill_ratio, 4),
            "over_budget": self.num_over_budget,
            "max_samples_per_micro_batch": self.max_samples_per_microbatch,
        }


def pack_ffd(lengths: list[int] | np.ndarray, budget: int) -> Packing:
    """Pack sample lengths into micro-batches of at most `budget` tokens, first-fit decreasing.

    Sort the lengths longest first and put each into the first micro-batch that still has room, opening a
    new one when none has. FFD is within 11/9 of the optimal number of bins, so its count is close to the
    best any packer can do over a whole epoch; a loader that shuffles and packs within a window fills
    its micro-batches less well, so read the result as a lower bound on micro-batches and an upper bound on
    fill. Samples longer than the budget cannot be packed at all and are only counted.

    "First micro-batch with room" is a leftmost-leaf query on a max segment tree over the remaining room of
    n micro-batches (all start with the full budget, so an untouched one is a new micro-batch): O(n log n),
    a second for a million samples.
    """
    arr = np.asarray(lengths, dtype=np.int64)
    fits = np.sort(arr[arr <= budget])[::-1]
    n = int(fits.size)
    if n == 0:
        return Packing(budget, 0, 0, 0.0, int((arr > budget).sum()), 0)
    size = 1
    while size < n:
        size *= 2
    room = [0] * (2 * size)
    for i in range(n):
        room[size + i] = budget
    for i in range(size - 1, 0, -1):
        room[i] = max(room[2 * i], room[2 * i + 1])
    count = [0] * n
    used = 0
    for length in fits.tolist():
        i = 1
        while i < size:  # descend to the leftmost leaf with enough room
            i = 2 * i if room[2 * i] >= length else 2 * i + 1
        leaf = i - size
        used = max(used, leaf + 1)
        count[leaf] += 1
        room[i] -= length
        i //= 2
        while i:
            room[i] = max(room[2 * i], room[2 * i + 1])
            i //= 2
    packed = int(fits.sum())
    return Packing(budget, used, packed, packed / (used * budget), int((arr > budget).sum()), max(count))


# ---------------------------------------------------------------- summary


def summarize(root: str | os.PathLike, budget: int = DEFAULT_BUDGET) -> dict[str, Any]:
    """What is in a shard set, from its manifest, index and rejects file (no shard is read)."""
    if budget < 1:
        raise InspectError(f"--budget {budget}: give a positive number of tokens per GPU micro-batch, e.g. 4096")
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
            **_stats(tokens),
            "total": int(tokens.sum()),
            "image": int(image_tokens.sum()),
            "loss": int(loss_tokens.sum()),
        },
        "per_sample": {
            "images": _stats(images),
            "image_tokens": _stats(image_tokens),
            "patches": _stats(patches),
            "loss_tokens": _stats(loss_tokens),
        },
        "batching": pack_ffd(tokens, budget).to_dict(),
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
        f"  shards       {d['shards']:,}, {_human_bytes(d['bytes'])}, format {d['format_version']}, {d['created_by']}",
        f"  fingerprint  {d['fingerprint']}",
        f"  processor    {proc}, {p['processor_class']}: patch {p['patch_size']}, merge {p['merge_size']}{pixels}",
        f"  tokenizer    {p['tokenizer_class']}, vocab {p['vocab_size']:,}, sha256 {_short(p['tokenizer_sha256'])}",
        f"  template     chat template sha256 {_short(p['chat_template_sha256'])}, response {p['response_template']!r}, {system}",
        f"  tokens       min {t['min']:,}  median {t['median']:,}  p95 {t['p95']:,}  max {t['max']:,}"
        f"  (total {t['total']:,}: image {t['image']:,}, loss {t['loss']:,})",
        f"  per sample   images {_range(ps['images'])}, image tokens {_range(ps['image_tokens'])}, "
        f"patches {_range(ps['patches'])}, loss tokens {_range(ps['loss_tokens'])}",
    ]
    batching = (
        f"  batching     {b['budget']:,} tokens/GPU: {b['micro_batches']:,} micro-batch{'es' if b['micro_batches'] != 1 else ''} per epoch, "
        f"fill {100 * b['fill_ratio']:.1f}%, up to {b['max_samples_per_micro_batch']} samples each (first-fit decreasing)"
    )
    lines.append(batching)
    if b["over_budget"]:
        lines.append(f"               {b['over_budget']:,} samples are longer than the budget: raise --budget to fit them")
    if d["samples"] != d["manifest_samples"]:
        lines.append(
            f"  warning: {INDEX} has {d['samples']:,} rows but {MANIFEST} lists {d['manifest_samples']:,} samples: "
            f"run `geo3k inspect {d['path']} --verify`"
        )
    for reason, ex in d["reject_examples"].items():
        lines.append(f"  e.g. {reason}: row {ex['row']}: {ex['detail']}")
    return "\n".join(lines)


# ---------------------------------------------------------------- one sample


def load_tokenizer(ss: ShardSet, processor: str | None = None) -> tuple[Any, list[str]]:
    """The tokenizer that made the set (or `processor`), and warnings if it is not the recorded one."""
    from shared.presets import PresetError, load_processor

    rec = ss.processor
    name = processor or ss.processor_name
    if not name:
        raise InspectError(f"{ss.root}/{MANIFEST} names no processor: pass --processor NAME_OR_PATH to decode tokens")
    try:
        loaded = load_processor(name)
    except PresetError as e:
        raise InspectError(f"{e}; to decode tokens, pass --processor with a preset or a local model folder") from None
    warnings = []
    for k, what in (("tokenizer_sha256", "tokenizer files"), ("chat_template_sha256", "chat template")):
        want, got = rec.get(k), loaded.identity.get(k)
        if want and got and want != got:
            warnings.append(f"the {what} of {name!r} differ from the ones that made these shards: decoded text may be wrong")
    return loaded.tokenizer, warnings


def _segments(sample: Sample, tokenizer: Any, special: dict[str, int], merge_size: int) -> list[dict[str, Any]]:
    """Runs of tokens: text (decoded, with its loss flag) or one image's placeholder pads, in order."""
    ids, mask = sample.input_ids, sample.loss_mask.astype(bool)
    pad = special.get("image_pad")
    grids = [tuple(int(x) for x in g) for g in sample.image_grid_thw]
    per_image = [t * h * w // merge_size**2 for t, h, w in grids]
    segs: list[dict[str, Any]] = []
    image, left_in_image = 0, per_image[0] if per_image else 0
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == pad:
            j = i
            while j < n and ids[j] == pad and (image >= len(grids) or j - i < left_in_image):
                j += 1
            seg: dict[str, Any] = {"kind": "image", "num_tokens": j - i, "loss": bool(mask[i:j].any())}
            if image < len(grids):
                t, h, w = grids[image]
                seg.update(image=image + 1, grid=[t, h, w], num_patches=t * h * w, pixels=[h * sample.patches.shape[-1], w * sample.patches.shape[-1]])
                left_in_image -= j - i
                if left_in_image == 0:
                    image += 1
                    left_in_image = per_image[image] if image < len(per_image) else 0
            segs.append(seg)
        else:
            j = i
            while j < n and ids[j] != pad and mask[j] == mask[i]:
                j += 1
            segs.append(
                {
                    "kind": "text",
                    "text": tokenizer.decode([int(x) for x in ids[i:j]], skip_special_tokens=False),
                    "num_tokens": j - i,
                    "loss": bool(mask[i]),
                }
            )
        i = j
    return segs


def view_sample(root: str | os.PathLike, key_or_index: str | int, processor: str | None = None) -> tuple[dict[str, Any], Sample]:
    """One sample decoded: its counts, images and the conversation as text/image segments with loss flags."""
    ss = ShardSet(root)
    sample = ss.get(key_or_index)
    index = ss.index()
    position = index.column("key").to_pylist().index(sample.key)
    rec = ss.processor
    special = rec.get("special_ids", {})
    merge = int(ss.pixel_spec.merge_size)
    tokenizer, warnings = load_tokenizer(ss, processor)
    segs = _segments(sample, tokenizer, special, merge)
    loss_ids = [int(x) for x in sample.input_ids[sample.loss_mask.astype(bool)]]
    p = sample.patches.shape[-1] if sample.patches.ndim == 4 else 0
    meta = sample.meta
    sources = meta.get("images") or []
    images = [
        {
            "image": i + 1,
            "grid": [int(t), int(h), int(w)],
            "num_patches": int(t * h * w),
            "num_tokens": int(t * h * w) // merge**2,
            "pixels": [int(h) * p, int(w) * p],  # [height, width] of the resized image
            "source": sources[i] if i < len(sources) else None,
        }
        for i, (t, h, w) in enumerate(sample.image_grid_thw)
    ]
    d = {
        "path": str(ss.root),
        "key": sample.key,
        "index": position,
        "shard": index.column("shard")[position].as_py(),
        "row": meta.get("row"),
        "num_tokens": sample.num_tokens,
        "num_image_tokens": int((sample.input_ids == special.get("image_pad")).sum()),
        "num_loss_tokens": int(sample.loss_mask.sum()),
        "num_patches": sample.num_patches,
        "images": images,
        "problem": meta.get("problem"),
        "answer": meta.get("answer"),
        "loss_text": tokenizer.decode(loss_ids, skip_special_tokens=False),
        "segments": segs,
        "warnings": warnings,
    }
    return d, sample


_GREEN, _CYAN, _DIM, _RESET = "\x1b[1;32m", "\x1b[36m", "\x1b[2m", "\x1b[0m"


def format_sample(d: dict[str, Any], color: bool = False) -> str:
    def image_text(s: dict[str, Any]) -> str:
        if "image" not in s:
            return f"<{s['num_tokens']} unmatched image tokens>"
        t, h, w = s["grid"]
        return f"<image {s['image']}: grid {t}x{h}x{w}, {s['num_tokens']} tokens>"

    body = []
    for s in d["segments"]:
        text = image_text(s) if s["kind"] == "image" else s["text"]
        if color:
            style = _GREEN if s["loss"] else (_CYAN if s["kind"] == "image" else "")
            body.append(f"{style}{text}{_RESET}" if style else text)
        else:
            body.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if s["loss"] else text)
    images = "; ".join(
        f"{im['image']}: grid {'x'.join(map(str, im['grid']))}, {im['num_patches']} patches, {im['num_tokens']} tokens, "
        f"{im['pixels'][1]}x{im['pixels'][0]} px" + (f" from {im['source']['source']}" if (im["source"] or {}).get("source") else "")
        for im in d["images"]
    ) or "none"
    legend = f"{_GREEN}green{_RESET}" if color else f"{MARK_OPEN}…{MARK_CLOSE}"
    lines = [
        f"sample {d['key']}  (index {d['index']}, {d['shard']}, source row {d['row']})",
        f"  tokens {d['num_tokens']:,}: image {d['num_image_tokens']:,}, loss {d['num_loss_tokens']:,}; patches {d['num_patches']:,}",
        f"  images {images}",
        f"  answer {d['answer']}",
        f"--- conversation; {legend} = in the loss (the tokens the model learns to produce) ---",
        "".join(body).rstrip("\n"),
    ]
    return "\n".join(lines)


# ---------------------------------------------------------------- images


def unpatchify(patches: np.ndarray, grid_thw: tuple[int, int, int] | np.ndarray, merge_size: int) -> np.ndarray:
    """uint8 [N, C, P, P] patch rows of one image -> uint8 [H, W, C], the processor's resized image.

    The processor orders rows by (t, h/merge, w/merge, merge_h, merge_w) so that each merge x merge block of
    patches sits together (see Qwen2VLImageProcessor.patchify); this undoes that permutation. Only the first
    temporal frame is returned (a still image has one).
    """
    t, gh, gw = (int(x) for x in grid_thw)
    n, c, p, _ = patches.shape
    m = merge_size
    if n != t * gh * gw or gh % m or gw % m:
        raise RecordError(f"{n} patches do not fill a grid of {t}x{gh}x{gw} with merge size {m}")
    x = patches.reshape(t, gh // m, gw // m, m, m, c, p, p)[0]
    x = x.transpose(0, 2, 5, 1, 3, 6, 4)  # (gh/m, m, P, gw/m, m, P, C)
    return np.ascontiguousarray(x).reshape(gh * p, gw * p, c)


def sample_images(sample: Sample, merge_size: int) -> list[np.ndarray]:
    """Every image of a sample as uint8 [H, W, C], in conversation order."""
    out, start = [], 0
    for g in sample.image_grid_thw:
        n = int(np.prod(g))
        out.append(unpatchify(sample.patches[start : start + n], g, merge_size))
        start += n
    return out


def save_images(sample: Sample, merge_size: int, path: str | os.PathLike) -> list[dict[str, Any]]:
    """Write a sample's image(s) as PNG: PATH for one image, PATH-1.png, PATH-2.png, ... for several."""
    from PIL import Image

    images = sample_images(sample, merge_size)
    if not images:
        raise InspectError(f"sample {sample.key} has no image to save: pick another with --sample")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InspectError(f"--save-image {path}: the picture is written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images):
        out = path if len(images) == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
        Image.fromarray(img[..., :3] if img.shape[-1] >= 3 else img[..., 0]).save(out)
        written.append({"image": i + 1, "path": str(out), "width": img.shape[1], "height": img.shape[0]})
    return written


# ---------------------------------------------------------------- verify


@dataclass
class _Report:
    problems: list[dict[str, Any]] = field(default_factory=list)

    def add(self, shard: str | None, key: str | None, problem: str) -> None:
        self.problems.append({"shard": shard, "key": key, "problem": problem})


def _check_shard(ss: ShardSet, entry: dict[str, Any], rows: list[dict[str, Any]], report: _Report, image_token: int, merge: int) -> int:
    """Check one shard against its manifest entry and index rows; returns how many records it decoded."""
    name = entry["name"]
    path = ss.root / name
    if not path.is_file():
        report.add(name, None, "file is missing: rerun `geo3k preprocess` to rebuild it")
        return 0
    size = path.stat().st_size
    if size != entry.get("bytes"):
        report.add(name, None, f"size {size:,} bytes, the manifest says {entry.get('bytes'):,}")
    digest = sha256_file(path)
    if digest != entry.get("sha256"):
        report.add(name, None, f"sha256 {digest[:16]}… differs from the manifest's {str(entry.get('sha256'))[:16]}…: the file changed after it was written")

    expected = {r["key"]: r for r in rows}
    seen: list[str] = []
    try:
        for key, members in iter_tar_records(path):
            seen.append(key)
            try:
                sample = decode_sample(key, members)
                sample.check(image_token, merge)
            except RecordError as e:
                report.add(name, key, str(e).removeprefix(f"{key}: "))
                continue
            row = expected.get(key)
            if row is None:
                report.add(name, key, f"record is not in {INDEX} for this shard")
                continue
            actual = {
                "num_tokens": sample.num_tokens,
                "num_image_tokens": int((sample.input_ids == image_token).sum()),
                "num_patches": sample.num_patches,
                "num_loss_tokens": int(sample.loss_mask.sum()),
                "num_images": int(sample.image_grid_thw.shape[0]),
            }
            wrong = [f"{k} {v} (index says {row[k]})" for k, v in actual.items() if row.get(k) != v]
            wrong += [f"meta {k} {sample.meta.get(k)} (record has {actual[k]})" for k in ("num_tokens", "num_patches") if k in sample.meta and sample.meta[k] != actual[k]]
            if wrong:
                report.add(name, key, "disagrees with the index: " + ", ".join(wrong))
    except (tarfile.TarError, OSError, EOFError) as e:
        report.add(name, None, f"unreadable tar after {len(seen)} records: {e}")
    if len(seen) != entry.get("samples"):
        report.add(name, None, f"holds {len(seen)} records, the manifest says {entry.get('samples')}")
    missing = [k for k in expected if k not in set(seen)]
    if missing:
        report.add(name, None, f"{len(missing)} record(s) listed in {INDEX} are absent: {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
    if len(set(seen)) != len(seen):
        report.add(name, None, "holds duplicate keys")
    return len(seen)


def verify(root: str | os.PathLike, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Recompute every shard's sha256, decode and check every record, and reconcile the counts.

    Checks, each reported with the shard (and record) it concerns: file present with the manifest's size and
    sha256; every record decodes and its members agree (Sample.check: ids and mask lengths, image pads =
    patches / merge_size², pixel data = grid); the index row of each record matches it; each shard holds
    the manifest's number of records; the totals of manifest, index and rejects agree; no stray shards.
    """
    ss = ShardSet(root)
    report = _Report()
    special = ss.processor.get("special_ids", {})
    image_token = special.get("image_pad")
    merge = int(ss.pixel_spec.merge_size)
    try:
        index_rows = ss.index().to_pylist()
    except (ShardSetError, OSError, ValueError) as e:
        report.add(None, None, f"{INDEX} unreadable: {e}")
        index_rows = []
    by_shard: dict[str, list[dict[str, Any]]] = {}
    for r in index_rows:
        by_shard.setdefault(r["shard"], []).append(r)

    records = 0
    names = [s["name"] for s in ss.shards]
    for entry in ss.shards:
        if progress:
            progress(entry["name"])
        records += _check_shard(ss, entry, by_shard.get(entry["name"], []), report, image_token, merge)

    for name in sorted(set(by_shard) - set(names)):
        report.add(name, None, f"{INDEX} lists {len(by_shard[name])} record(s) in a shard the manifest does not have")
    for p in sorted(ss.root.glob("shard-*.tar")):
        if p.name not in names:
            report.add(p.name, None, "stray shard: not in the manifest (left from another run? remove it)")
    counts = ss.manifest.get("counts", {})
    if counts.get("written") is not None and counts["written"] != ss.num_samples:
        report.add(None, None, f"manifest counts {counts['written']} written samples but its shards add up to {ss.num_samples}")
    if len(index_rows) != ss.num_samples:
        report.add(None, None, f"{INDEX} has {len(index_rows)} rows, the manifest's shards hold {ss.num_samples} samples")
    num_rejects = len(ss.rejects())
    want_rejects = sum(counts.get("rejected", {}).values())
    if num_rejects != want_rejects:
        report.add(None, None, f"rejects.jsonl has {num_rejects} lines, the manifest counts {want_rejects} rejects")

    bad_shards = sorted({p["shard"] for p in report.problems if p["shard"]})
    bad_records = [f"{p['shard']}:{p['key']}" for p in report.problems if p["key"]]
    return {
        "path": str(ss.root),
        "ok": not report.problems,
        "shards": len(names),
        "records": records,
        "manifest_samples": ss.num_samples,
        "bad_shards": bad_shards,
        "bad_records": bad_records,
        "problems": report.problems,
    }


def format_verify(d: dict[str, Any]) -> str:
    if d["ok"]:
        return f"ok: {d['path']}: {d['shards']} shards, {d['records']:,} records; sha256, records, index and counts all agree"
    lines = [
        f"FAILED: {d['path']}: {len(d['problems'])} problem(s) in {len(d['bad_shards'])} of {d['shards']} shards "
        f"({len(d['bad_records'])} bad records)"
    ]
    for p in d["problems"]:
        where = ":".join(x for x in (p["shard"], p["key"]) if x) or "set"
        lines.append(f"  {where}: {p['problem']}")
    if d["bad_shards"]:
        lines.append("rebuild the bad shards with `geo3k preprocess --force`, or restore them from a good copy")
    return "\n".join(lines)


# ---------------------------------------------------------------- plot


def plot_lengths(root: str | os.PathLike, path: str | os.PathLike, budget: int = DEFAULT_BUDGET) -> dict[str, Any]:
    """A PNG histogram of token lengths (text + image tokens per sample), with the budget marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InspectError(f"--plot {path}: the plot is written as PNG; give a path ending in .png")
    ss = ShardSet(root)
    tokens = np.asarray(ss.index().column("num_tokens").to_numpy(), dtype=np.int64)
    st = _stats(tokens)
    title = f"{ss.manifest.get('dataset')}/{ss.manifest.get('split')}: token lengths of {tokens.size:,} samples"

    # When every sample is far below the budget, one axis spanning 0..budget squeezes the data into a
    # bar or two; then a second, zoomed panel shows the distribution itself.
    off_scale = tokens.size > 0 and budget > 1.5 * st["max"]
    fig = Figure(figsize=(9, 6.5 if off_scale else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [("full", fig.add_subplot(2, 1, 1) if off_scale else fig.add_subplot())]
    if off_scale:
        panels.append(("zoom", fig.add_subplot(2, 1, 2)))
    for kind, ax in panels:
        if kind == "full":
            lo, hi = 0.0, max(budget, st["max"]) * 1.04
        else:
            pad = max(1.0, 0.05 * (st["max"] - st["min"]))
            lo, hi = max(0.0, st["min"] - pad), st["max"] + pad
        ax.hist(tokens, bins=np.linspace(lo, hi, 61), color="#4c72b0", label="samples")
        if budget <= hi:
            ax.axvline(budget, color="#c44e52", lw=2, ls="--", label=f"budget {budget:,} tokens/GPU")
        for q, ls in (("median", ":"), ("p95", "-.")):
            ax.axvline(st[q], color="k", lw=1, ls=ls, label=f"{q} {st[q]:,}")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("tokens per sample (text + image)")
        ax.set_ylabel("samples")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title if kind == "full" else f"zoomed in: min {st['min']:,}, max {st['max']:,}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return {"path": str(path), "budget": budget, "samples": int(tokens.size), **st}


# ---------------------------------------------------------------- the command


@dataclass
class Result:
    """What `geo3k inspect` prints: text for people, data for --json, and whether all was well."""

    text: str
    data: dict[str, Any]
    ok: bool = True
    warnings: list[str] = field(default_factory=list)


_KEYLIKE = re.compile(r"^\S+$")


def run(
    root: str | os.PathLike,
    *,
    sample: str | None = None,
    save_image: str | os.PathLike | None = None,
    verify_: bool = False,
    plot: str | os.PathLike | None = None,
    budget: int = DEFAULT_BUDGET,
    processor: str | None = None,
    color: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Result:
    """Dispatch the modes of `geo3k inspect`: summary (default), --sample [--save-image], --verify; --plot with any."""
    if sample is not None and verify_:
        raise InspectError("--sample and --verify are separate modes: run them one at a time")
    if save_image is not None and sample is None:
        raise InspectError("--save-image needs a sample: add --sample KEY|INDEX, e.g. --sample 0")
    if sample is not None and not _KEYLIKE.match(sample):
        raise InspectError(f"--sample {sample!r}: give a key such as 00000042 or a position such as 42")
    if budget < 1:
        raise InspectError(f"--budget {budget}: give a positive number of tokens per GPU micro-batch, e.g. 4096")

    ok, warnings = True, []
    if sample is not None:
        data, s = view_sample(root, sample, processor)
        warnings += data.pop("warnings")
        text = format_sample(data, color)
        if save_image is not None:
            data["saved_images"] = save_images(s, int(ShardSet(root).pixel_spec.merge_size), save_image)
            text += "\n" + "\n".join(
                f"wrote {w['path']} ({w['width']}x{w['height']} px, image {w['image']}: the processor's resized view)"
                for w in data["saved_images"]
            )
    elif verify_:
        data = verify(root, progress)
        text, ok = format_verify(data), data["ok"]
    else:
        data = summarize(root, budget)
        text = format_summary(data)
    if plot is not None:
        data["plot"] = plot_lengths(root, plot, budget)
        text += f"\nwrote {plot} (histogram of {data['plot']['samples']:,} token lengths, budget {budget:,} marked)"
    return Result(text, data, ok, warnings)
