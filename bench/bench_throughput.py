"""Training throughput on one GPU: the trainer's engines on packed micro-batches of Geo3K-like samples, transformers on padded ones.

    python3 bench/bench_throughput.py --shards .cache/gpu/geo3k-like-512 --steps 8 --warmup 4 --presets qwen3-vl-2b,qwen3-vl-4b \\
        --variants megatron megatron:compile_layers=false fsdp transformers      # on the GPU machine: bash bench/gpu_run.sh throughput
    .venv/bin/python bench/bench_throughput.py --shards .cache/bench/geo3k-like-512 --presets tiny-qwen3-vl --device cpu \\
        --steps 2 --warmup 1 --global-batch-size 16 --variants megatron fsdp transformers --profile      # CPU smoke test of this script

Shards: `bench/bench_packing.py --make-shards 512` (86-636 tokens a sample, ~75% image tokens). Variants, random weights, the
loader's steps of --global-batch-size samples: `megatron`, `fsdp` and `ENGINE:key=value,...` with train.* fields set
(megatron:compile_layers=false) on packed micro-batches of at most --max-tokens (bf16, fp32 master weights, the trainer's
garbage-collection policy); `transformers`, a plain padded fine-tune of the same samples: AutoModelForImageTextToText (seeded
random init, SDPA, bf16 parameters, fused torch AdamW, clip 1.0, Python's collector), batches of whole samples in the loader's
order while B x longest fits --max-tokens, padded to the longest (attention_mask; labels -100 on padding and off the loss
mask), gradients accumulated over the step, transformers' loss with num_items_in_batch = the step's loss tokens (the engines'
per-token mean: CE summed / loss tokens), the same uint8 patches normalised on the device. The first preset gets every
variant, the others the first variant only.

Per variant: step time (median of --steps after --warmup), real (non-padding) tokens/s, x baseline (over the preset's
`transformers` row), model TFLOP/s (totals / time) and MFU (train/flops.py: the LM head at the loss positions as the engines
run it on one GPU, on every real token for transformers, which computes it everywhere; over the datasheet dense bf16 peak, and
over the measured matmul rate), peak memory, and the data wait (step start until the batches are on the device; the GPU is
synchronised at each step's start and end). A failing variant is recorded and the run goes on; the JSON is rewritten after
each. --profile: one more step of the first preset's variants under torch.profiler, tables and Chrome trace beside --out.
"""

from __future__ import annotations

import argparse
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import transformers

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import load_config  # noqa: E402
from train.data import DataConfig, PackedLoader, build_loader  # noqa: E402
from train.data.packing import EpochPlan, epoch_order  # noqa: E402
from train.distributed import destroy, init_distributed  # noqa: E402
from train.engine import build_engine  # noqa: E402
from train.flops import Peaks, StepFlops  # noqa: E402
from train.gc_policy import TrainingGC  # noqa: E402
from train.models import load_hf_config  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="a split folder with manifest.json")
    p.add_argument("--presets", default="qwen3-vl-2b", help="comma list; the first gets every variant, the rest the first variant only")
    p.add_argument("--variants", nargs="+", default=["megatron", "fsdp"], help="megatron, fsdp or ENGINE:key=value,key=value")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, compiles, loader workers)")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of a packed micro-batch")
    p.add_argument("--global-batch-size", type=int, default=64, help="samples per step of the packed backends")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: fp32 smoke test of this script")
    p.add_argument("--profile", action="store_true", help="profile one more step of the first preset's variants")
    p.add_argument("--profile-stacks", action="store_true", help="with --profile: host syncs and copies by Python stack (slower)")
    p.add_argument("--time-limit-s", type=float, default=0, help="start no new variant after this many seconds (0: none)")
    p.add_argument("--out", type=Path, default=REPO / ".cache" / "bench" / "throughput.json", help="the results as JSON")
    return p.parse_args(argv)


@dataclass
class Result:
    preset: str
    variant: str
    status: str = "ok"  # ok, OOM, skipped: ..., error: ...
    losses: list[float] = field(default_factory=list)  # warm-up included: one engine's runs agree step by step
    step_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    counts: list[tuple] = field(default_factory=list)  # per timed step: real tokens, computed tokens, FLOPs, micro-batches
    peak_mem_gib: float | None = None

    def summary(self, peaks: Peaks, base: float | None = None) -> dict:
        if not self.step_s:
            return {}
        total, (real, computed, flops, mbs) = sum(self.step_s), np.array(self.counts).sum(0)
        return {"step_ms": 1e3 * statistics.median(self.step_s), "micro_batches": mbs / len(self.counts),
                "tokens_per_step": real / len(self.counts), "tokens_per_s": real / total, "x_baseline": real / total / base if base else None,
                "real_fraction": real / computed, "tflops": flops / total / 1e12, **peaks.mfu(flops / total / 1e12), "data_wait": sum(self.data_s) / total}


def run_variant(r: Result, variant: str, hf_config, args, world, profile_to: Path | None) -> None:
    """Build the engine with the variant's train.* settings (or the padded baseline), then time --warmup + --steps steps on fresh data."""
    name, _, settings = variant.partition(":")
    device, padded, sync = world.device, name == "transformers", torch.cuda.synchronize if world.device.type == "cuda" else lambda: None
    sets = dict(backend=name, random_init="true", global_batch_size=args.global_batch_size, max_tokens_per_gpu=args.max_tokens,
                bf16=device.type == "cuda", num_workers=2)
    tc = None if padded else load_config(None, [f"train.{k}={v}" for k, v in sets.items()] + [f"train.{kv}" for kv in settings.split(",") if kv]).train
    cfg = DataConfig(max_tokens_per_gpu=args.max_tokens, global_batch_size=args.global_batch_size, num_epochs=1000, num_workers=2)
    loader = (PaddedLoader if padded else build_loader)(args.shards, cfg, world.dp_rank, world.dp)
    engine = PaddedTransformers(hf_config, device, loader.spec.pad_token_id) if padded else build_engine(hf_config, tc, world, init_from=None)
    it = iter(loader)
    flops = StepFlops.from_hf_config(hf_config, head_on_every_token=padded)  # the LM head at the loss positions; transformers': every real token

    def step():
        t0 = time.perf_counter()
        g = next(it)
        mbs = [mb.to(device, non_blocking=True, pixel_dtype=torch.bfloat16 if device.type == "cuda" else None) for mb in g.micro_batches]
        sync()  # the batch is on the device: the data wait ends here
        t1 = time.perf_counter()
        loss = float(engine.train_step(mbs, g.num_loss_tokens, 1e-5)["loss_sum"]) / max(1, g.num_loss_tokens)
        sync()
        return g.micro_batches, loss, time.perf_counter() - t0, t1 - t0

    from train.models.cudnn_attention import BUILDS  # cuDNN graphs built per step: a timed step should build none

    try:
        with TrainingGC(tc.gc_interval if tc else 0) as collector:  # the baseline keeps Python's own collector
            for i in range(args.warmup + args.steps):
                sync()
                built = dict(BUILDS)
                mbs, loss, step_s, data_s = step()
                if BUILDS["count"] > built["count"]:
                    print(f"  step {i + 1}{' (timed)' if i >= args.warmup else ''}: {BUILDS['count'] - built['count']} "
                          f"cuDNN attention graphs built, {BUILDS['seconds'] - built['seconds']:.2f} s", flush=True)
                r.losses.append(loss)
                if i >= args.warmup:
                    r.step_s.append(step_s)
                    r.data_s.append(data_s)
                    computed = sum(len(mb.keys) * mb.max_seqlen if padded else mb.num_tokens for mb in mbs)
                    r.counts.append((sum(mb.num_real_tokens for mb in mbs), computed, flops.step(mbs), len(mbs)))
                collector.step_done(i + 1)
        print(f"  steps (ms): {' '.join(f'{1e3 * t:.0f}' for t in r.step_s)}; losses: {' '.join(f'{x:.4f}' for x in r.losses)}", flush=True)
        if profile_to is not None:
            profile_step(r, device, step, profile_to, args.profile_stacks)
    finally:
        it.close()  # stops the loader's workers


class PaddedLoader(PackedLoader):
    """build_loader's steps cut into `transformers`' batches; one comes as the loader's PackedBatch of its samples."""

    def plan(self, epoch: int) -> EpochPlan:
        order, n, gbs, steps = epoch_order(len(self.table), self.cfg.seed, epoch).tolist(), self.table.num_tokens, self.cfg.global_batch_size, []
        for sp in super().plan(epoch).steps:
            batches = [[]]
            for i in order[sp.step * gbs : (sp.step + 1) * gbs]:
                if batches[-1] and (len(batches[-1]) + 1) * max(n[batches[-1] + [i]]) > self.cfg.max_tokens_per_gpu:
                    batches.append([])
                batches[-1].append(i)
            steps.append(replace(sp, micro_batches=[batches]))
        return EpochPlan(epoch, steps)


class PaddedTransformers:
    """`transformers` behind the engines' train_step; it pads the PaddedLoader's micro-batches on the device, after .to()."""

    def __init__(self, hf_config, device: torch.device, pad_id: int):
        torch.manual_seed(0)
        with device:
            self.model = transformers.AutoModelForImageTextToText.from_config(
                hf_config, attn_implementation="sdpa", dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-5, betas=(0.9, 0.95), weight_decay=0.1, fused=device.type == "cuda")
        self.pad_id, self.mm_types = pad_id, "mm_token_type_ids" in inspect.signature(self.model.forward).parameters  # >= 5.2x: M-RoPE

    def inputs(self, mb) -> dict:
        pos = torch.arange(mb.max_seqlen, device=mb.input_ids.device)  # [B, longest]; labels: the loader's at i - 1 (token i's)
        at, real = (mb.cu_seqlens[:-1, None] + pos).clamp(max=mb.num_tokens - 1), pos < (mb.cu_seqlens[1:] - mb.cu_seqlens[:-1])[:, None]
        d = {"input_ids": torch.where(real, mb.input_ids[at], self.pad_id), "attention_mask": real.long(),
             "labels": torch.where(real & (pos > 0), mb.labels[(at - 1).clamp(min=0)], -100)}  # transformers shifts them back
        if mb.num_images:
            d.update(pixel_values=mb.pixel_values, image_grid_thw=mb.image_grid_thw.to(pos.device))
        return d | ({"mm_token_type_ids": (d["input_ids"] == self.model.config.image_token_id).int()} if self.mm_types else {})

    def train_step(self, mbs, num_loss_tokens: int, lr: float) -> dict:
        loss_sum, self.opt.param_groups[0]["lr"] = 0.0, lr
        for mb in mbs:  # CE summed over a batch / the step's loss tokens: the step's per-token mean, accumulated
            (loss := self.model(**self.inputs(mb), num_items_in_batch=num_loss_tokens).loss).backward()
            loss_sum += loss.detach() * num_loss_tokens
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return {"loss_sum": loss_sum}


def profile_step(r: Result, device, one_step, path: Path, stacks: bool) -> None:
    """One more step under torch.profiler: op tables by self device time and by self CPU time (host cost: launches,
    syncs, Python-level autograd), a Chrome trace, and with `stacks` the Python stacks of host syncs and copies."""
    from torch.profiler import ProfilerActivity, _ExperimentalConfig, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, with_stack=stacks, experimental_config=_ExperimentalConfig(verbose=stacks)) as prof:  # verbose: the stacks
        one_step()
    ops, syncs = prof.key_averages(), ("cudaStreamSynchronize", "cudaMemcpyAsync", "aten::item", "aten::nonzero", "cudaDeviceSynchronize")
    text = f"# {r.preset} / {r.variant}: one step\n" + "\n\n".join(ops.table(sort_by=k, row_limit=50) for k in ("self_device_time_total", "self_cpu_time_total"))
    for e in sorted((e for e in prof.key_averages(group_by_stack_n=14) if e.key in syncs), key=lambda e: -e.count)[:25] if stacks else []:
        text += f"\n\n{e.key} x{e.count} ({e.cpu_time_total / 1e3:.1f} ms), called from\n    " + "\n    ".join(e.stack)
    prof.export_chrome_trace(str(path.with_suffix(".json")))
    from gpu_gaps import analyse  # where the GPU sat idle, from the trace

    text += "\n\n# GPU idle gaps\n" + analyse(json.loads(path.with_suffix(".json").read_text()))
    path.write_text(text)
    print(f"  profile: {path}", flush=True)


def markdown_table(results: list[Result], peaks: Peaks) -> str:
    base = {r.preset: r.summary(peaks)["tokens_per_s"] for r in results if r.variant == "transformers" and r.step_s}
    rows = [f"{peaks.describe()}\n", "| preset | variant | status | step ms | micro-batches / step | real tokens / step | real tokens/s "
            "| x baseline | real / computed tokens | model TFLOP/s | MFU | MFU of measured peak | data wait | peak GiB |", "|---" * 14 + "|"]
    keys = ("step_ms", ".0f"), ("micro_batches", ".1f"), ("tokens_per_step", ",.0f"), ("tokens_per_s", ",.0f"), ("x_baseline", ".2f"), \
        ("real_fraction", ".1%"), ("tflops", ".3g"), ("mfu", ".1%"), ("mfu_measured_peak", ".1%"), ("data_wait", ".2%")
    for r in results:
        cols = [(r.summary(peaks, base.get(r.preset)).get(k), fmt) for k, fmt in keys] + [(r.peak_mem_gib, ".1f")]
        rows.append(f"| {r.preset} | {r.variant} | {r.status[:40]} | " + " | ".join("-" if v is None else format(v, f) for v, f in cols) + " |")
    return "\n".join(rows)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engines pick their device from torch.cuda.is_available()
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the smoke test")
    world = init_distributed()
    device, peaks = world.device, Peaks.of(world.device)
    print(f"# bench_throughput: {peaks.describe()}; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"{os.cpu_count()} CPUs\n# {' '.join(sys.argv)}")
    presets, results, t_all = args.presets.split(","), [], time.perf_counter()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for preset, variant in [(p, v) for i, p in enumerate(presets) for v in args.variants if i == 0 or v == args.variants[0]]:
        results.append(r := Result(preset, variant))
        print(f"\n## {preset} / {variant}  (t = {time.perf_counter() - t_all:.0f} s)", flush=True)
        label = "".join(c if c.isalnum() or c in "-_." else "-" for c in f"{preset}-{variant}")
        profile_to = args.out.with_name(f"{args.out.stem}-{label}-profile.txt") if args.profile and preset == presets[0] else None
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            if args.time_limit_s and time.perf_counter() - t_all > args.time_limit_s:
                r.status = f"skipped: --time-limit-s {args.time_limit_s:.0f} reached"
            else:
                run_variant(r, variant, load_hf_config(preset), args, world, profile_to)
        except Exception as e:  # one variant failing must not cost the others their numbers
            oom = isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()
            r.status, r.step_s = "OOM" if oom else f"error: {type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}", []
            traceback.print_exc(limit=-8)
        gc.collect()  # the variant's model and optimizer go before the next is built
        if device.type == "cuda":
            r.peak_mem_gib = torch.cuda.max_memory_allocated(device) / 2**30
            torch.cuda.empty_cache()
        s = r.summary(peaks)
        print(f"  {s['step_ms']:.0f} ms/step, {s['tokens_per_s']:,.0f} real tokens/s, {s['tflops']:.3g} TFLOP/s" if s else f"  {r.status}", flush=True)
        args.out.write_text(json.dumps({"device": asdict(peaks), "command": " ".join(sys.argv),
                                        "results": [{**asdict(x), **x.summary(peaks)} for x in results]}, indent=1))
    destroy()
    print(f"\n# total {time.perf_counter() - t_all:.0f} s\n\n{markdown_table(results, peaks)}")


if __name__ == "__main__":
    main()
