"""Where the GPU waits: idle gaps between kernels in a profiled step, blamed on what the host was doing.

A step is host-bound when the GPU runs dry: the next kernel has not been launched yet, or the host is
blocked in a synchronisation and only starts launching again once the queue is empty. The op tables of
torch.profiler cannot show this (they sum time per op), so this reads the step's Chrome trace instead:

- device busy time = the union of kernel, memcpy and memset intervals;
- every gap of at least `min_gap_us` between them is blamed on the innermost host op running when the gap
  began (on any thread: the autograd engine runs backward on its own), and on the CUDA runtime call running
  then, if any (a `cudaStreamSynchronize` or a pageable `cudaMemcpyAsync` there means a sync drained the queue).

    python bench/gpu_gaps.py trace.json        # bench_throughput.py --profile appends this report to its tables
"""

from __future__ import annotations

import bisect
import json
import sys
from collections import defaultdict
from pathlib import Path

DEVICE_CATS = ("kernel", "gpu_memcpy", "gpu_memset")


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    return [(s, e) for s, e in merged]


def _innermost(events: list[dict], starts: list[float], long: list[dict], t: float) -> dict | None:
    """The shortest event that covers time t (events sorted by start; `starts` their start times). Looks at the
    last few thousand events before t, and at every long event (> 0.5 ms), which may have started far earlier."""
    best = None
    i = bisect.bisect_right(starts, t)
    for ev in [*events[max(0, i - 4000):i], *long]:
        if ev["ts"] <= t <= ev["ts"] + ev.get("dur", 0) and (best is None or ev.get("dur", 0) < best.get("dur", 0)):
            best = ev
    return best


def analyse(trace: dict, min_gap_us: float = 5.0, top: int = 25) -> str:
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    dev = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events if e.get("ph") == "X" and e.get("cat") in DEVICE_CATS]
    if not dev:
        return "no device events in the trace (CPU run?)"
    busy = _merge(dev)
    span = busy[-1][1] - busy[0][0]
    busy_us = sum(e - s for s, e in busy)
    cpu = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "user_annotation")), key=lambda e: e["ts"])
    rt = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cuda_runtime"), key=lambda e: e["ts"])
    cpu_starts, rt_starts = [e["ts"] for e in cpu], [e["ts"] for e in rt]
    cpu_long, rt_long = ([e for e in evs if e.get("dur", 0) > 500] for evs in (cpu, rt))
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    by_rt: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    gaps = [(a[1], b[0]) for a, b in zip(busy, busy[1:]) if b[0] - a[1] >= min_gap_us]
    for g0, g1 in gaps:
        op = _innermost(cpu, cpu_starts, cpu_long, g0)
        call = _innermost(rt, rt_starts, rt_long, g0)
        key = op["name"][:70] if op else "(no host op: Python between ops)"
        by_op[key][0] += g1 - g0
        by_op[key][1] += 1
        rkey = call["name"] if call else "(none)"
        by_rt[rkey][0] += g1 - g0
        by_rt[rkey][1] += 1
    gap_us = sum(g1 - g0 for g0, g1 in gaps)
    lines = [
        f"device busy {busy_us / 1e3:.1f} ms of a {span / 1e3:.1f} ms span ({busy_us / span:.1%}); "
        f"{len(gaps)} gaps >= {min_gap_us:g} us total {gap_us / 1e3:.1f} ms",
        "",
        "| host op running when the GPU went idle | idle ms | gaps |",
        "|---|---|---|",
    ]
    for k, (us, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {k} | {us / 1e3:.1f} | {n} |")
    lines += ["", "| CUDA runtime call in progress then | idle ms | gaps |", "|---|---|---|"]
    for k, (us, n) in sorted(by_rt.items(), key=lambda kv: -kv[1][0])[:10]:
        lines.append(f"| {k} | {us / 1e3:.1f} | {n} |")
    return "\n".join(lines)


def main() -> None:
    print(analyse(json.loads(Path(sys.argv[1]).read_text())))


if __name__ == "__main__":
    main()
