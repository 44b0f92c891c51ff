"""Weight gradients into Megatron's fp32 main_grad on a GPU, at Qwen3-VL-2B's linear shapes: the unfused path (a bf16
GEMM, then the fp32 += bf16 accumulation kernel) against the fused one (`grad_accum.add_weight_grad_`: one GEMM with
main_grad as its fp32 output, beta = 1), time per micro-batch and error against an fp32 reference.

    python3 bench/gpu_wgrad.py [--tokens 4096] [--reps 20]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from train import grad_accum  # noqa: E402

# (out, in) of the 2B model's linears: language model qkv, o, fc1 (gate+up), fc2; vision qkv, proj, fc1, fc2.
SHAPES = {"llm qkv": (4096, 2048), "llm o": (2048, 2048), "llm fc1": (12288, 2048), "llm fc2": (2048, 6144),
          "vit qkv": (3072, 1024), "vit proj": (1024, 1024), "vit fc1": (4096, 1024), "vit fc2": (1024, 4096)}


def timed(fn, reps) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}; torch {torch.__version__}; addmm with an fp32 C: {grad_accum._fp32_out_addmm(dev)}")
    print("| linear | unfused ms | fused ms | fused / unfused | unfused error | fused error |\n|---|---|---|---|---|---|")
    total = [0.0, 0.0]
    for name, (n_out, n_in) in SHAPES.items():
        g = torch.Generator(device=dev).manual_seed(n_out + n_in)
        go = torch.randn(args.tokens, n_out, device=dev, generator=g).bfloat16()
        x = torch.randn(args.tokens, n_in, device=dev, generator=g).bfloat16()
        start = torch.randn(n_out, n_in, device=dev, generator=g)
        want = start + go.float().t() @ x.float()
        main_u, main_f = start.clone(), start.clone()
        grad_accum.accumulate_(main_u, go.t() @ x)
        grad_accum.add_weight_grad_(main_f, go, x)
        scale = want.abs().max().item()
        err = [((m - want).abs().max().item() / scale) for m in (main_u, main_f)]
        ms_u = timed(lambda: grad_accum.accumulate_(main_u, go.t() @ x), args.reps)
        ms_f = timed(lambda: grad_accum.add_weight_grad_(main_f, go, x), args.reps)
        total[0] += ms_u
        total[1] += ms_f
        print(f"| {name} [{n_out} x {n_in}] | {ms_u:.3f} | {ms_f:.3f} | {ms_f / ms_u:.2f} | {err[0]:.2e} | {err[1]:.2e} |")
    print(f"| all eight | {total[0]:.3f} | {total[1]:.3f} | {total[1] / total[0]:.2f} | | |")


if __name__ == "__main__":
    main()
