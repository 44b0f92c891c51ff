"""Packed attention kernels on a GPU at Qwen3-VL-2B's shapes: FlashAttention-4 (the `fa4` backend) against torch's
varlen_attn (FlashAttention-2), forward + backward time and numerics against an fp32 reference.

    python3 bench/gpu_attention.py [--reps 20]

Shapes (the 2B model on Geo3K-like micro-batches of 4,096 tokens, docs/performance.md): the vision tower's
attention, 16 heads of 64, non-causal, ~10 images of ~1,000 patches; the language model's, 16 query heads over
8 kv heads of 128, causal, ~13 samples of ~300 tokens. Numerics: the bf16 output and gradients of each backend
against the same attention in fp32 (the exact per-segment backend), as a fraction of the reference's largest
magnitude; the two backends should sit at the same bf16 floor. FlashAttention-4 compiles its kernels on first use
(per head size, causality and a few sequence-length classes): the first call's time is printed, and a sweep over
other segment lengths compiles the rest, into its on-disk cache where FLASH_ATTENTION_CUTE_DSL_CACHE_ENABLED=1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.models.attention import available_backends, varlen_attention  # noqa: E402

CASES = {
    "vision (16 x 64, non-causal)": dict(lens=[1024, 1296, 784, 1156, 900, 1024, 1444, 676, 1024, 900], heads=16, kv=16, dim=64, causal=False),
    "language (16/8 x 128, causal)": dict(lens=[312, 280, 350, 301, 298, 330, 260, 342, 315, 305, 290, 320, 293], heads=16, kv=8, dim=128, causal=True),
}


def flops(lens, heads, dim, causal) -> float:
    """Forward + backward matmul FLOPs as FlashAttention counts them: 4 T^2 H D forward (QK^T and PV), the backward
    2.5x that (its recomputed QK^T included), halved when causal."""
    per = sum(4 * n * n * heads * dim for n in lens) * (0.5 if causal else 1.0)
    return 3.5 * per


def run(case, backend, reps, device):
    torch.manual_seed(0)
    lens, H, Hkv, D, causal = case["lens"], case["heads"], case["kv"], case["dim"], case["causal"]
    T = sum(lens)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    base = [torch.randn(T, h, D, device=device) for h in (H, Hkv, Hkv)]
    grad = torch.randn(T, H, D, device=device)

    def step(dtype, name):
        leaves = [t.to(dtype).requires_grad_() for t in base]
        out = varlen_attention(*leaves, cu, max(lens), causal=causal, backend=name)
        grads = torch.autograd.grad(out, leaves, grad.to(dtype))
        return out, grads

    ref_out, ref_grads = step(torch.float32, "sdpa")
    torch.cuda.synchronize()
    first = time.perf_counter()
    out, grads = step(torch.bfloat16, backend)
    torch.cuda.synchronize()
    first = time.perf_counter() - first
    err = max(((a.float() - b).abs().max() / b.abs().max()).item() for a, b in zip((out, *grads), (ref_out, *ref_grads)))
    for _ in range(3):
        step(torch.bfloat16, backend)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        step(torch.bfloat16, backend)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / reps
    return {"case": case_name(case), "backend": backend, "fwd+bwd ms": round(ms, 3),
            "TFLOP/s": round(flops(lens, H, D, causal) / ms / 1e9, 1), "max error vs fp32": float(f"{err:.2e}"),
            "first call s": round(first, 1)}


def case_name(case):
    return next(k for k, v in CASES.items() if v is case)


def compiled_equals_eager(device) -> float:
    """The fa4 op inside a compiled function with dynamic lengths, as the compiled layers call it: the largest
    difference from the eager call over the output and gradients (the same kernels: 0)."""
    case = CASES["language (16/8 x 128, causal)"]
    H, Hkv, D = case["heads"], case["kv"], case["dim"]

    def attend(q, k, v, cu, longest):
        return varlen_attention(q, k, v, cu, longest, causal=True, backend="fa4")

    compiled, worst = torch.compile(attend, dynamic=True, fullgraph=True), 0.0
    for lens in ([300, 280, 350], [512, 100, 90, 700], [64, 128]):
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
        leaves = [torch.randn(sum(lens), h, D, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv)]
        got = []
        for fn in (attend, compiled):
            out = fn(*leaves, cu, max(lens))
            got.append((out, *torch.autograd.grad(out.float().square().sum(), leaves)))
        worst = max(worst, max((a.float() - b.float()).abs().max().item() for a, b in zip(*got)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--verified", type=Path, help="write this file when fa4 matched FlashAttention-2's error and its "
                   "compiled call equalled the eager one (bench/gpu_run.sh uses fa4 in later parts only then)")
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    print(f"backends here: {available_backends(device, torch.bfloat16)}")
    if "fa4" not in available_backends(device, torch.bfloat16):
        try:
            import flash_attn.cute.interface  # noqa: F401
        except Exception as e:  # why it is missing, for the log
            print(f"fa4 unavailable: {type(e).__name__}: {e}")
    names = [b for b in ("torch_varlen", "fa4") if b in available_backends(device, torch.bfloat16)]
    errors = {}
    print("| case | backend | fwd+bwd ms | TFLOP/s | max error vs fp32 | first call s |\n|---|---|---|---|---|---|")
    for case in CASES.values():
        for name in names:
            try:
                r = run(case, name, args.reps, device)
            except Exception as e:  # a kernel this build cannot run: say so and go on with the others
                print(f"| {case_name(case)} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | |")
                continue
            print(f"| {r['case']} | {name} | {r['fwd+bwd ms']} | {r['TFLOP/s']} | {r['max error vs fp32']:.2e} | {r['first call s']} |")
            print(json.dumps(r), file=sys.stderr)
            errors[r["case"], name] = r["max error vs fp32"]
    if "fa4" not in names:
        return
    accurate = all(errors.get((c, "fa4"), 1.0) <= 2 * errors.get((c, "torch_varlen"), 0.0) + 1e-3 for c in CASES)
    diff = compiled_equals_eager(device)
    print(f"fa4 error within 2x FlashAttention-2's in every case: {accurate}; compiled vs eager, largest difference: {diff:.3g}")
    sweep(device)
    if accurate and diff == 0.0 and args.verified:
        args.verified.write_text("fa4 verified against FlashAttention-2 by bench/gpu_attention.py\n")


def sweep(device) -> None:
    """One forward + backward per length class the training steps meet (longest segment 64 to 4,096), so that
    FlashAttention-4 compiles them here, not in a timed step."""
    start = time.perf_counter()
    for case in CASES.values():
        H, Hkv, D, causal = case["heads"], case["kv"], case["dim"], case["causal"]
        for longest in (64, 128, 200, 256, 512, 1024, 2048, 4096):
            lens = [longest] + [max(1, longest // 3)] * 3
            cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
            leaves = [torch.randn(sum(lens), h, D, device=device, dtype=torch.bfloat16, requires_grad=True) for h in (H, Hkv, Hkv)]
            out = varlen_attention(*leaves, cu, longest, causal=causal, backend="fa4")
            torch.autograd.grad(out.float().square().sum(), leaves)
    torch.cuda.synchronize()
    print(f"fa4 sweep over 8 length classes x 2 cases: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
