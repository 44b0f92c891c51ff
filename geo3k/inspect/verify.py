"""`geo3k inspect DIR --verify`: read every byte of a shard set and name each bad shard and record (exit 1)."""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from typing import Any, Callable

from shared.manifest import INDEX, ShardSet, ShardSetError, iter_tar_records, sha256_file
from shared.schema import RecordError, decode_sample


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

