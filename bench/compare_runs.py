"""Compare the losses and speed of training runs on the same data (the multi-GPU session's report).

    python bench/compare_runs.py RUNS_ROOT one dp2:2 tp2sp:2 [...]
    python bench/compare_runs.py --exports INIT REF OTHER [...]     # exported HF folders, tensor by tensor

Reads RUNS_ROOT/<name>/metrics.jsonl; the first run is the reference. `name:N` says the run used N GPUs
(default 1). Prints per-step losses, the largest relative difference of each run from the reference, median
tokens/s after the first two steps, and the scaling efficiency against the reference: tokens/s per GPU
divided by the reference's tokens/s per GPU.
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


def compare_exports(init: str, ref: str, others: list[str]) -> None:
    """Per export, the worst relative L2 difference from REF of a tensor and of a tensor's update (trained -
    INIT), in float64 (the exports may be bf16)."""
    from train.models.convert import max_relative_differences, read_safetensors_dir

    def weights(folder: str) -> dict:
        return {k: v.double() for k, v in read_safetensors_dir(folder).items()}

    w0, wr = weights(init), weights(ref)
    print(f"| export vs {ref} | worst tensor | worst update |\n|---|---|---|")
    for o in others:
        (t, tk), (u, uk) = max_relative_differences(weights(o), wr, w0)
        print(f"| {o} | {t:.2e} ({tk}) | {u:.2e} ({uk}) |")


def main() -> None:
    if sys.argv[1] == "--exports":
        return compare_exports(sys.argv[2], sys.argv[3], sys.argv[4:])
    root = Path(sys.argv[1])
    gpus = {a.split(":")[0]: int(a.split(":")[1]) if ":" in a else 1 for a in sys.argv[2:]}
    names = list(gpus)
    runs = {n: load(root / n / "metrics.jsonl") for n in names}
    ref = runs[names[0]]
    steps = sorted(set().union(*[set(r) for r in runs.values()]))
    print("| step | " + " | ".join(names) + " |")
    print("|---" * (len(names) + 1) + "|")
    for s in steps:
        print(f"| {s} | " + " | ".join(f"{runs[n][s]['loss']:.4f}" if s in runs[n] else "" for n in names) + " |")
    print("\n| run | GPUs | steps | max rel. loss diff vs " + names[0] + " | median tokens/s | scaling efficiency | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|")
    ref_later = [ref[s] for s in sorted(ref)[2:]] or list(ref.values())
    ref_tps = statistics.median(x["tokens_per_s"] for x in ref_later) / gpus[names[0]] if ref else float("nan")
    for n in names:
        r = runs[n]
        if not r:
            print(f"| {n} | {gpus[n]} | 0 | (no metrics) | | | | |")
            continue
        common = [s for s in r if s in ref]
        diff = max((abs(r[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in common), default=float("nan"))
        later = [r[s] for s in sorted(r)[2:]] or list(r.values())
        tps = statistics.median(x["tokens_per_s"] for x in later)
        mfu = statistics.median(x.get("mfu") or 0 for x in later)
        mem = max(x.get("peak_mem_gib") or 0 for x in r.values())
        eff = tps / gpus[n] / ref_tps
        print(f"| {n} | {gpus[n]} | {len(r)} | {diff:.2e} | {tps:,.0f} | {eff:.1%} | {100 * mfu:.1f}% | {mem:.1f} |")


if __name__ == "__main__":
    main()
