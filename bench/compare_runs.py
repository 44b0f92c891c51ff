"""Compare the losses and speed of training runs on the same data (the multi-GPU session's report).

    python bench/compare_runs.py RUNS_ROOT one dp2 tp2sp [...]

Reads RUNS_ROOT/<name>/metrics.jsonl; the first run is the reference. Prints per-step losses, the largest
relative difference of each run from the reference, median tokens/s after the first two steps, and the
scaling efficiency of each run against the reference (tokens/s ratio divided by its GPU count, which is
read from the run's config: tensor_parallel x data-parallel processes as logged).
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def load(path: Path) -> dict[int, dict]:
    if not path.exists():
        return {}
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    return {r["step"]: r for r in recs if r["kind"] == "train"}


def main() -> None:
    root, names = Path(sys.argv[1]), sys.argv[2:]
    runs = {n: load(root / n / "metrics.jsonl") for n in names}
    ref = runs[names[0]]
    steps = sorted(set().union(*[set(r) for r in runs.values()]))
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{runs[n][s]['loss']:.4f}" if s in runs[n] else "" for n in names) + " |")
    print("\n| run | steps | max rel. loss diff vs " + names[0] + " | median tokens/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|")
    for n in names:
        r = runs[n]
        if not r:
            print(f"| {n} | 0 | (no metrics) | | | |")
            continue
        common = [s for s in r if s in ref]
        diff = max((abs(r[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in common), default=float("nan"))
        later = [r[s] for s in sorted(r)[2:]] or list(r.values())
        tps = statistics.median(x["tokens_per_s"] for x in later)
        mfu = statistics.median(x.get("mfu") or 0 for x in later)
        mem = max(x.get("peak_mem_gib") or 0 for x in r.values())
        print(f"| {n} | {len(r)} | {diff:.2e} | {tps:,.0f} | {100 * mfu:.1f}% | {mem:.1f} |")


if __name__ == "__main__":
    main()
