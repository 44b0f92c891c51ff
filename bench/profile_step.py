"""Where a Megatron training step's time goes, on one GPU.

    python bench/profile_step.py --shards DIR [--preset qwen3-vl-2b] [--micro-batches 6] [--recompute none]

Builds the trainer's engine (random weights, bf16), takes real packed micro-batches from the loader and
times, with CUDA events around each phase (after warm-up): the vision tower's forward, the whole forward
(vision + LLM + loss), backward, gradient sync, and the optimizer step; then a torch.profiler table of the
top CUDA kernels over one full step. Prints Markdown.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.config import TrainConfig  # noqa: E402
from train.data import DataConfig, build_loader  # noqa: E402
from train.distributed import init_distributed  # noqa: E402
from train.engine_megatron import MegatronEngine  # noqa: E402
from train.flops import StepFlops, measure_peak_tflops  # noqa: E402
from train.models import load_hf_config  # noqa: E402


def timed(fn, reps: int = 1):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    out = None
    for _ in range(reps):
        out = fn()
    end.record()
    end.synchronize()
    return out, start.elapsed_time(end) / 1e3 / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shards", required=True)
    ap.add_argument("--preset", default="qwen3-vl-2b")
    ap.add_argument("--micro-batches", type=int, default=6)
    ap.add_argument("--recompute", default="none")
    ap.add_argument("--trace", default=None, help="write a Chrome trace of one step here")
    args = ap.parse_args()

    world = init_distributed()
    hf = load_hf_config(args.preset)
    tc = TrainConfig(random_init=True, recompute=args.recompute, bf16=True)
    engine = MegatronEngine(hf, tc, world, init_from=None)
    loader = build_loader(args.shards, DataConfig(global_batch_size=128, num_workers=2, num_epochs=1), 0, 1)
    step = next(iter(loader))
    mbs = [mb.to(world.device, pixel_dtype=torch.bfloat16) for mb in step.micro_batches[: args.micro_batches]]
    flops = StepFlops.from_hf_config(hf)
    peak = measure_peak_tflops(world.device)
    print(f"{torch.cuda.get_device_name()}; {args.preset}; {len(mbs)} micro-batches of "
          f"{statistics.mean(mb.num_real_tokens for mb in mbs):.0f} tokens, "
          f"{statistics.mean(mb.num_patches for mb in mbs):.0f} patches; peak {peak:.0f} TFLOP/s; recompute {args.recompute}")

    model = engine.model
    inner = engine.inner
    for _ in range(2):  # warm-up: allocator, kernels, autotuning
        engine.train_step(mbs, sum(mb.num_loss_tokens for mb in mbs), 1e-5)

    rows = []
    vis, fwd, bwd = [], [], []
    for mb in mbs:
        with torch.no_grad():
            _, t = timed(lambda: inner.vision(mb.pixel_values, mb.image_grid_thw))
        vis.append(t)
        model.zero_grad_buffer()
        out, t = timed(lambda: engine.forward(mb, labels=True))
        fwd.append(t)
        _, t = timed(lambda: (out.sum() / 1000).backward())
        bwd.append(t)
    _, t_sync = timed(model.finish_grad_sync)
    _, t_opt = timed(engine.optimizer.step)
    _, t_step = timed(lambda: engine.train_step(mbs, sum(mb.num_loss_tokens for mb in mbs), 1e-5))
    f_mb = [flops.micro_batch(mb.cu_seqlens, mb.image_grid_thw, mb.num_real_tokens, mb.num_loss_tokens) for mb in mbs]
    n = len(mbs)
    rows.append(("vision forward (no grad)", sum(vis) / n))
    rows.append(("forward: vision + LLM + loss", sum(fwd) / n))
    rows.append(("backward", sum(bwd) / n))
    rows.append(("grad sync (whole step)", t_sync))
    rows.append(("optimizer step (whole step)", t_opt))
    rows.append(("full train_step (whole step)", t_step))
    print("\n| phase | seconds |\n|---|---|")
    for name, t in rows:
        print(f"| {name} | {t:.4f} |")
    ideal = sum(f_mb) / (peak * 1e12)
    print(f"\nmodel FLOPs of the step {sum(f_mb) / 1e12:.1f} TFLOP: floor {ideal:.3f} s at peak; measured {t_step:.3f} s "
          f"-> MFU {ideal / t_step:.1%}; tokens/s {sum(mb.num_real_tokens for mb in mbs) / t_step:,.0f}; "
          f"peak memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        engine.train_step(mbs, sum(mb.num_loss_tokens for mb in mbs), 1e-5)
        torch.cuda.synchronize()
    print("\ntop CUDA kernels over one step:")
    try:
        table = prof.key_averages().table(sort_by="self_device_time_total", row_limit=25, max_name_column_width=70)
    except (KeyError, AttributeError, ValueError):  # older torch names it cuda
        table = prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70)
    print(table)
    if args.trace:
        prof.export_chrome_trace(args.trace)


if __name__ == "__main__":
    t0 = time.time()
    main()
    print(f"profile_step done in {time.time() - t0:.0f}s")
