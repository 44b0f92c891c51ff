"""Packed attention kernels on a GPU at Qwen3-VL-2B's shapes: cuDNN's fused attention against torch's varlen_attn
(flash attention), forward + backward time and numerics against an fp32 reference.

    python3 bench/gpu_attention.py [--reps 20]

Shapes (the 2B model on Geo3K-like micro-batches of 4,096 tokens, docs/performance.md): the vision tower's
attention, 16 heads of 64, non-causal, ~10 images of ~1,000 patches; the language model's, 16 query heads over
8 kv heads of 128, causal, ~13 samples of ~300 tokens. Numerics: the bf16 output and gradients of each backend
against the same attention in fp32 (the exact per-segment backend), as a fraction of the reference's largest
magnitude; the two backends should sit at the same bf16 floor.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train.models.attention import available_backends, varlen_attention  # noqa: E402

CASES = {
    "vision (16 x 64, non-causal)": dict(lens=[1024, 1296, 784, 1156, 900, 1024, 1444, 676, 1024, 900], heads=16, kv=16, dim=64, causal=False),
    "language (16/8 x 128, causal)": dict(lens=[312, 280, 350, 301, 298, 330, 260, 342, 315, 305, 290, 320, 293], heads=16, kv=8, dim=128, causal=True),
}


def flops(lens, heads, dim, causal) -> float:
    """Forward + backward matmul FLOPs: 4 T^2 H D forward (QK^T and PV), 2.5x that in all."""
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
    out, grads = step(torch.bfloat16, backend)
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
            "TFLOP/s": round(flops(lens, H, D, causal) / ms / 1e9, 1), "max error vs fp32": float(f"{err:.2e}")}


def case_name(case):
    return next(k for k, v in CASES.items() if v is case)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    device = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; cuDNN {torch.backends.cudnn.version()}")
    names = [b for b in ("torch_varlen", "cudnn") if b in available_backends(device, torch.bfloat16)]
    print("| case | backend | fwd+bwd ms | TFLOP/s | max error vs fp32 |\n|---|---|---|---|---|")
    for case in CASES.values():
        for name in names:
            try:
                r = run(case, name, args.reps, device)
            except Exception as e:  # a kernel this build cannot run: say so and go on with the others
                print(f"| {case_name(case)} | {name} | failed: {type(e).__name__}: {str(e).splitlines()[0][:160]} | | |")
                continue
            print(f"| {r['case']} | {name} | {r['fwd+bwd ms']} | {r['TFLOP/s']} | {r['max error vs fp32']:.2e} |")
            print(json.dumps(r), file=sys.stderr)


if __name__ == "__main__":
    main()
