"""Compare the losses and speed of training runs on the same data (bench/gpu_run.sh's reports).

    python bench/compare_runs.py RUNS_ROOT one dp2:2 tp2sp:2 [...]   # RUNS_ROOT/<name>/metrics.jsonl; name:N ran on N GPUs
    python bench/compare_runs.py --exports INIT REF OTHER [...]     # exported HF folders, tensor by tensor

The first run is the reference. Per step, the losses; per run, the largest relative loss difference from the
reference, and medians after the first two steps: tokens/s, scaling efficiency (tokens/s per GPU over the
reference's), MFU; the peak memory.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def compare_exports(init: str, ref: str, others: list[str]) -> None:
    """Per export, the worst relative L2 difference from REF of a tensor and of a tensor's update (trained - INIT),
    in float64 (the exports may be bf16)."""
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
    gpus = {a.split(":")[0]: int(a.split(":")[1]) if ":" in a else 1 for a in sys.argv[2:]}
    names, runs = list(gpus), {}
    for n in gpus:
        path = Path(sys.argv[1]) / n / "metrics.jsonl"
        recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.exists() else []
        runs[n] = {r["step"]: r for r in recs if r["kind"] == "train"}
    ref = runs[names[0]]
    print(f"| step | {' | '.join(names)} |\n" + "|---" * (len(names) + 1) + "|")
    for s in sorted(set().union(*runs.values())):
        print(f"| {s} | " + " | ".join(f"{runs[n][s]['loss']:.4f}" if s in runs[n] else "" for n in names) + " |")
    print(f"\n| run | GPUs | steps | max rel. loss diff vs {names[0]} | median tokens/s | scaling efficiency | MFU | peak GiB |\n" + "|---" * 8 + "|")

    def median(r: dict, key: str) -> float:
        return statistics.median(x.get(key) or 0 for x in [r[s] for s in sorted(r)[2:]] or r.values())

    for n, r in runs.items():
        if not r:
            print(f"| {n} | {gpus[n]} | 0 | (no metrics) | | | | |")
            continue
        diff = max((abs(r[s]["loss"] - ref[s]["loss"]) / abs(ref[s]["loss"]) for s in r if s in ref), default=float("nan"))
        eff = median(r, "tokens_per_s") / gpus[n] / (median(ref, "tokens_per_s") / gpus[names[0]]) if ref else float("nan")
        print(f"| {n} | {gpus[n]} | {len(r)} | {diff:.2e} | {median(r, 'tokens_per_s'):,.0f} | {eff:.1%} | {100 * median(r, 'mfu'):.1f}% "
              f"| {max(x.get('peak_mem_gib') or 0 for x in r.values()):.1f} |")


if __name__ == "__main__":
    main()
