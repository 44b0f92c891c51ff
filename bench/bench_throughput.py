"""Training throughput on one GPU (issue 8): a plain transformers fine-tune vs the Megatron (and FSDP) backend.

    # on the GPU machine, one call (docs/perf-notes.md has the carry list and the install line):
    python3 bench/bench_throughput.py --shards .cache/bench/geo3k-like-512 --steps 8 --warmup 3 \\
        --presets qwen3-vl-2b,qwen3-vl-4b,qwen3-vl-8b --variants baseline,megatron,fsdp --out $OUT/throughput.json
    # CPU smoke test of this script (tiny preset, fp32, every variant and the no-optimizer row):
    .venv/bin/python bench/bench_throughput.py --shards .cache/bench/geo3k-like-512 --presets tiny-qwen3-vl \\
        --device cpu --steps 2 --warmup 1 --global-batch-size 16 --variants baseline,megatron,megatron-fwdbwd,fsdp
    # the shard set (dev box: it needs the tokenizer to make the demo template; 512 samples, 11 MB):
    .venv/bin/python bench/bench_throughput.py --make-shards 512

Variants, all on the same shard set (Geo3K-like lengths: 86-636 tokens, ~80% image tokens), random weights:

  baseline         transformers' own model class (SDPA attention, bf16 parameters, torch AdamW, fused on CUDA,
                   grad-norm clip 1.0). Padded batches: samples in shuffled order are added while their real
                   tokens fit --max-tokens, then padded to the longest; attention_mask and standard HF labels/loss.
                   One batch per optimizer step. Pixels travel as uint8 and are normalised on the device, as in
                   the packed path, so the comparison is about the training step, not the collate.
  megatron         MegatronEngine.train_step (train/engine_megatron.py) on packed micro-batches from build_loader:
                   --global-batch-size samples per step, --max-tokens per micro-batch, bf16 with fp32 master
                   weights (Float16Module, Megatron DDP, distributed optimizer). --recompute picks the
                   activation recomputation; a comma list runs one row per value.
  megatron-fwdbwd  the same engine with the optimizer replaced by a no-op: forward + backward + grad buffers
                   only, no fp32 master weights or Adam state (6 instead of 18 bytes per parameter). It runs on
                   its own when a preset's full training state cannot fit the card (8B on any single card, 4B
                   on 80 GB), so those presets still get a compute throughput; not a training speed.
  megatron-eager   the Megatron engine with train.compile_layers=false (layers run op by op; fused norm/RoPE/SwiGLU)
  megatron-unfused the Megatron engine with train.fused_kernels=false and compile_layers=false (all eager)
  fsdp             train/engine_fsdp.py's engine (same interface and data as megatron), when that file exists.

--presets: the first preset gets every variant; the others (4B, 8B) get the Megatron backend only.

Per variant: step time (median of --steps timed steps after --warmup), real tokens/s and model TFLOP/s (totals
over the timed steps / their summed time), MFU (train/flops.py StepFlops model FLOPs / time / the card's bf16
matmul peak measured at the start of this run), peak memory (max_memory_allocated since the variant started
building: weights, optimizer state and activations), and the data wait: time from the step's start until its
batches are on the device (next() on the loader + the host-to-device copy + pixel normalisation, then
torch.cuda.synchronize), as a fraction of step time. The GPU is synchronised at each step's start and end.
Each variant's memory is freed before the next; an OOM is recorded and the run goes on. The JSON is rewritten
after every variant, so a run cut short keeps what it measured. The packed backends run under the trainer's
garbage-collection policy (--gc-interval, train.gc_interval); the plain baseline keeps Python's default; the
"GC ms / step" column is the time spent in the collector.

--profile adds, for the first preset: the profiler's op tables, the GPU's idle gaps blamed on the host op
running then, and the synchronising CUDA calls by Python call site (bench/gpu_gaps.py); with
GEO3K_SAMPLE_HOST=1 also a sampling profile of the Python threads over the timed steps (bench/host_sampler.py).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from shared.config import TrainConfig  # noqa: E402
from train.gc_policy import TrainingGC  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from host_sampler import HostSampler  # noqa: E402

GIB = 2**30
# Megatron bf16 training state per parameter on one GPU: bf16 weight 2 + fp32 grad buffer 4 (grad_reduce_in_fp32)
# + fp32 master weight 4 + Adam moments 8; without the optimizer (megatron-fwdbwd): 2 + 4.
STATE_BYTES = {"megatron": 18, "megatron-eager": 18, "megatron-unfused": 18, "megatron-fwdbwd": 6, "fsdp": 16, "baseline": 8}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, help="a shard set (split folder with manifest.json), e.g. .cache/bench/geo3k-like-512")
    p.add_argument("--presets", default="qwen3-vl-2b", help="comma list; the first gets every variant, the rest Megatron only")
    p.add_argument("--variants", default="baseline,megatron,fsdp", help="comma list of baseline, megatron, megatron-fwdbwd, fsdp")
    p.add_argument("--steps", type=int, default=8, help="timed optimizer steps per variant")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (allocator, kernels, loader workers)")
    p.add_argument("--max-tokens", type=int, default=4096, help="real-token budget of a batch / packed micro-batch")
    p.add_argument("--global-batch-size", type=int, default=64, help="samples per step of the packed backends (several micro-batches)")
    p.add_argument("--recompute", default="none", help="Megatron activation recomputation: none, selective, full, or a comma list")
    p.add_argument("--num-workers", type=int, default=2, help="loader processes (both data paths)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="cpu: fp32 smoke test of this script")
    p.add_argument("--headroom-gib", type=float, default=8.0,
                   help="activation memory assumed on top of the training state when predicting an OOM before building")
    p.add_argument("--no-fallback", action="store_true", help="no megatron-fwdbwd row after a Megatron OOM")
    p.add_argument("--profile", action="store_true",
                   help="after the timed steps of the first preset's variants, profile one more step (torch.profiler): "
                        "top kernels to <out>-<preset>-<variant>-profile.txt and the JSON (not counted in the timings)")
    p.add_argument("--out", type=Path, default=None, help="write the results here as JSON")
    p.add_argument("--time-limit-s", type=float, default=0,
                   help="start no new variant after this many seconds (0: no limit); keeps a device call inside its timeout")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-pin-memory", action="store_true", help="the packed loader without pinned host memory (its pin thread off)")
    p.add_argument("--gc-interval", type=int, default=TrainConfig.gc_interval,
                   help="the trainer's garbage-collection policy (train.gc_interval); 0: Python's automatic collector")
    p.add_argument("--make-shards", type=int, metavar="N", default=None,
                   help="write N Geo3K-like samples to .cache/bench/geo3k-like-N (bench_packing's generator) and exit")
    args = p.parse_args(argv)
    if args.make_shards is None and args.shards is None:
        p.error("--shards is required (make a set with --make-shards 512)")
    return args


# ---------------------------------------------------------------- results


@dataclass
class Result:
    preset: str
    variant: str
    status: str = "ok"
    """ok, OOM, OOM (predicted), skipped, or error: <message>."""
    note: str = ""
    build_s: float | None = None
    step_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    step_ms_median: float | None = None
    micro_batches_per_step: float | None = None
    real_tokens_per_step: float | None = None
    real_tokens_per_s: float | None = None
    real_fraction: float | None = None
    """Real tokens / tokens the model computed (padding included)."""
    model_tflops: float | None = None
    mfu: float | None = None
    peak_mem_gib: float | None = None
    data_wait_fraction: float | None = None
    gc_ms_per_step: float | None = None
    """Time in Python's garbage collector per timed step (a pause of the thread that launches GPU work)."""
    gc_interval: int | None = None
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    """Every step's loss, warm-up included: variants of one engine on the same data must agree step by step."""
    params_b: float | None = None
    profile_top: list[dict[str, Any]] = field(default_factory=list)
    """--profile: the ops with the most self device time in one step (ms), and where the full table went."""


def summarise(r: Result, tokens: list[int], computed: list[int], flops: list[float], n_mb: list[int], peak_tflops: float | None) -> None:
    total = sum(r.step_s)
    r.step_ms_median = 1e3 * statistics.median(r.step_s)
    r.micro_batches_per_step = float(np.mean(n_mb))
    r.real_tokens_per_step = float(np.mean(tokens))
    r.real_tokens_per_s = sum(tokens) / total
    r.real_fraction = sum(tokens) / sum(computed)
    r.model_tflops = sum(flops) / total / 1e12
    r.mfu = r.model_tflops / peak_tflops if peak_tflops else None
    r.data_wait_fraction = sum(r.data_s) / total


# ---------------------------------------------------------------- device helpers


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> float:
    """Collect garbage and return cached blocks; GiB still allocated (a leak between variants shows here)."""
    gc.collect()
    if device.type != "cuda":
        return 0.0
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    return torch.cuda.memory_allocated(device) / GIB


def is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def card_gib(device: torch.device) -> float | None:
    return torch.cuda.get_device_properties(device).total_memory / GIB if device.type == "cuda" else None


def cpu_peak_tflops(size: int = 1024, reps: int = 5) -> float:
    """fp32 matmul rate of this CPU: only so the CPU smoke test exercises the MFU column."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * size**3 / statistics.median(times) / 1e12


def count_params(hf_config) -> int:
    """Parameters of the architecture (tied embeddings once), from a meta-device build: no memory, no time."""
    import transformers

    cls = getattr(transformers, hf_config.architectures[0])
    with torch.device("meta"):
        model = cls._from_config(hf_config)
    return sum(p.numel() for p in model.parameters())


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": str(torch.version.cuda)}
    for pkg in ("transformers", "megatron-core", "flash-attn", "transformer-engine", "apex"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "-"
    return out


# ---------------------------------------------------------------- the timing loop


class GCTime:
    """Seconds spent in Python's garbage collector while inside the block (through gc.callbacks)."""

    def __init__(self):
        self.seconds = 0.0
        self._t0: float | None = None

    def _callback(self, phase: str, info: dict) -> None:  # called at the start and the end of every collection
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self._t0 is not None:
            self.seconds += time.perf_counter() - self._t0
            self._t0 = None

    def __enter__(self) -> "GCTime":
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc) -> None:
        gc.callbacks.remove(self._callback)


def time_steps(
    r: Result,
    device: torch.device,
    warmup: int,
    steps: int,
    next_batch: Callable[[], Any],
    to_device: Callable[[Any], Any],
    train_step: Callable[[Any, Any], float],
    account: Callable[[Any], tuple[int, int, float, int]],
    peak_tflops: float | None,
    profile_to: Path | None = None,
) -> None:
    """Run warmup + steps steps. account(host batch) -> (real tokens, computed tokens, model FLOPs, micro-batches)."""
    tokens, computed, flops, n_mb = [], [], [], []
    sampler = None
    print("  steps (ms, data ms):", end="", flush=True)
    # The stack undoes the GC policy, the GC timer and the host sampler even when a step raises (an OOM is
    # recorded and the next variant runs in the same process).
    with contextlib.ExitStack() as stack:
        collector = stack.enter_context(TrainingGC(r.gc_interval or 0))  # the trainer's policy (train/gc_policy.py)
        gc_time = stack.enter_context(GCTime())
        for i in range(warmup + steps):
            if i == warmup:
                gc_time.seconds = 0.0
                if profile_to is not None and os.environ.get("GEO3K_SAMPLE_HOST") == "1":
                    sampler = stack.enter_context(HostSampler())
            sync(device)
            t0 = time.perf_counter()
            host = next_batch()
            dev = to_device(host)
            sync(device)  # the batch is on the device: data wait ends here
            t1 = time.perf_counter()
            loss = train_step(host, dev)
            sync(device)
            t2 = time.perf_counter()
            del dev
            r.losses.append(loss)
            print(f" {'w' if i < warmup else ''}{1e3 * (t2 - t0):.0f}/{1e3 * (t1 - t0):.0f}", end="", flush=True)
            if i >= warmup:
                r.step_s.append(t2 - t0)
                r.data_s.append(t1 - t0)
                a = account(host)
                tokens.append(a[0]), computed.append(a[1]), flops.append(a[2]), n_mb.append(a[3])
                r.loss = loss
            collector.step_done(i + 1)
    if sampler:  # where the launching threads spend the timed steps (bench/host_sampler.py), next to the profile
        host_to = profile_to.with_name(profile_to.name.replace("-profile.txt", "-host.txt"))
        host_to.write_text(sampler.report() + "\n")
        print(f"\n  host sampler: {host_to}\n    " + "\n    ".join(sampler.report(8).splitlines()[4:12]), end="")
    r.gc_ms_per_step = 1e3 * gc_time.seconds / max(1, steps)
    print("\n  losses: " + " ".join(f"{x:.4f}" for x in r.losses), flush=True)
    if device.type == "cuda":
        r.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB
    summarise(r, tokens, computed, flops, n_mb, peak_tflops)
    if profile_to is not None:
        profile_step(r, device, next_batch, to_device, train_step, profile_to)


def profile_step(r: Result, device: torch.device, next_batch, to_device, train_step, path: Path) -> None:
    """One more step under torch.profiler: where the step's time goes, by op (self time, so nothing twice)."""
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    stacks = os.environ.get("GEO3K_PROFILE_STACKS") == "1"  # where the host syncs come from (slower profile)
    with profile(activities=acts, with_stack=stacks) as prof:
        host = next_batch()
        train_step(host, to_device(host))
        sync(device)
    key = "self_device_time_total" if cuda else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    r.profile_top = [{"op": e.key[:120], "self_ms": getattr(e, key, 0) / 1e3, "share": getattr(e, key, 0) / total, "calls": e.count}
                     for e in events[:15]]
    path.parent.mkdir(parents=True, exist_ok=True)
    # The second table finds host-side cost (launch overhead, syncs such as cudaStreamSynchronize, Python-level
    # autograd and compiled-function wrappers), which the device-time table cannot show.
    path.write_text(f"# {r.preset} / {r.variant}: one step, sorted by {key}\n" + prof.key_averages().table(sort_by=key, row_limit=60)
                    + "\n\n# the same step, sorted by self CPU time\n" + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40))
    if stacks:
        wanted = ("cudaStreamSynchronize", "cudaMemcpyAsync", "cudaHostAlloc", "aten::item", "aten::nonzero", "cudaDeviceSynchronize")
        found = [e for e in prof.key_averages(group_by_stack_n=14) if e.key in wanted]
        found.sort(key=lambda e: e.count, reverse=True)
        with path.open("a") as f:
            f.write("\n\n# host syncs and copies by Python stack (GEO3K_PROFILE_STACKS=1)\n")
            for e in found[:25]:
                f.write(f"\n{e.key} x{e.count} ({e.cpu_time_total / 1e3:.1f} ms)\n" + "".join(f"    {fr}\n" for fr in e.stack))
    if cuda:  # where the GPU waits, and which Python lines synchronise (bench/gpu_gaps.py)
        sys.path.insert(0, str(REPO / "bench"))
        import gpu_gaps

        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/trace.json")
            gaps = gpu_gaps.analyse(json.loads(Path(f"{tmp}/trace.json").read_text()))
        with gpu_gaps.SyncSites() as sites:
            host = next_batch()
            train_step(host, to_device(host))
            sync(device)
        with path.open("a") as f:
            f.write(f"\n\n# GPU idle gaps in the profiled step\n{gaps}\n\n# host syncs, one more step\n{sites.report()}\n")
        print("  " + gaps.splitlines()[0], flush=True)
    print(f"  profile: {path} (top: " + ", ".join(f"{x['op'][:40]} {x['share']:.0%}" for x in r.profile_top[:3]) + ")", flush=True)


# ---------------------------------------------------------------- (a) plain transformers, padded batches


class PaddedBatches(torch.utils.data.Dataset):
    """Item i = one padded batch [B, L] of whole samples (built in the loader's workers)."""

    def __init__(self, shard_dir: Path, batches: list[list[int]]):
        from shared.manifest import ShardSet
        from train.data import PackingSpec, SampleTable
        from train.data.reader import TarRecordReader

        ss = ShardSet(shard_dir)
        self.table = SampleTable.from_shard_set(ss)
        self.reader = TarRecordReader(ss.root)
        self.spec = PackingSpec.from_processor_identity(ss.processor)
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> dict[str, Any]:
        samples = [self.reader.read(self.table.shards[r], self.table.keys[r]) for r in self.batches[i]]
        b, length = len(samples), max(s.num_tokens for s in samples)
        ids = torch.full((b, length), self.spec.pad_token_id, dtype=torch.int64)
        labels = torch.full((b, length), -100, dtype=torch.int64)
        mask = torch.zeros((b, length), dtype=torch.int64)
        for j, s in enumerate(samples):
            n = s.num_tokens
            ids[j, :n] = torch.from_numpy(s.input_ids.astype(np.int64))
            # transformers shifts labels inside the loss: label = the token itself where it is trained on
            labels[j, :n] = torch.from_numpy(np.where(s.loss_mask.astype(bool), s.input_ids, -100).astype(np.int64))
            mask[j, :n] = 1
        lengths = [s.num_tokens for s in samples]
        ps = self.spec.pixel_spec
        offset, scale = ps.affine()
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": labels,
            "patches": torch.from_numpy(np.concatenate([s.patches for s in samples])),
            "image_grid_thw": torch.from_numpy(np.concatenate([np.asarray(s.image_grid_thw, np.int64).reshape(-1, 3) for s in samples])),
            "pixel_offset": torch.from_numpy(offset.copy()),
            "pixel_scale": torch.from_numpy(scale.copy()),
            "cu_seqlens": torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)),
            "temporal_patch_size": ps.temporal_patch_size,
        }


def padded_plan(shard_dir: Path, budget: int, num_batches: int, seed: int) -> list[list[int]]:
    """Shuffled samples, greedily grouped while the real tokens fit the budget (reshuffled each pass)."""
    from shared.manifest import ShardSet
    from train.data import SampleTable

    n = SampleTable.from_shard_set(ShardSet(shard_dir)).num_tokens
    batches: list[list[int]] = []
    epoch = 0
    while len(batches) < num_batches:
        cur: list[int] = []
        for i in np.random.default_rng([seed, epoch]).permutation(len(n)):
            if cur and sum(int(n[j]) for j in cur) + int(n[i]) > budget:
                batches.append(cur)
                cur = []
            cur.append(int(i))
        epoch += 1
    return batches[:num_batches]


def profile_path(args, r: Result) -> Path | None:
    if not args.profile or r.preset != args.presets.split(",")[0]:
        return None
    stem = args.out.with_suffix("") if args.out else REPO / ".cache" / "bench" / "throughput"
    return Path(f"{stem}-{r.preset}-{r.variant.replace('[', '-').replace(']', '').replace('=', '-')}-profile.txt")


def run_baseline(r: Result, hf_config, args, device: torch.device, peak: float | None) -> None:
    import inspect

    import transformers

    from train.data import normalize_patches_torch
    from train.flops import StepFlops

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    t = time.perf_counter()
    with torch.device(device):
        model = getattr(transformers, hf_config.architectures[0])._from_config(hf_config, attn_implementation="sdpa", dtype=dtype)
    model.config.use_cache = False
    model.train()
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=1e-5, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda",
    )
    r.build_s = time.perf_counter() - t
    r.params_b = sum(p.numel() for p in model.parameters()) / 1e9
    takes_mm_types = "mm_token_type_ids" in inspect.signature(model.forward).parameters  # transformers >= 5.2x
    image_token = hf_config.image_token_id

    # + 2: --profile runs one profiled step and one more under torch's sync debug mode (profile_step)
    data = PaddedBatches(args.shards, padded_plan(args.shards, args.max_tokens, args.warmup + args.steps + 2, args.seed))
    loader = torch.utils.data.DataLoader(
        data, batch_size=None, shuffle=False, num_workers=args.num_workers, pin_memory=device.type == "cuda",
        prefetch_factor=4 if args.num_workers else None,
    )
    it = iter(loader)
    flops = StepFlops.from_hf_config(hf_config)

    def to_device(b):
        d = {k: b[k].to(device, non_blocking=True) for k in ("input_ids", "attention_mask", "labels", "image_grid_thw")}
        pix = normalize_patches_torch(b["patches"].to(device, non_blocking=True), b["pixel_offset"].to(device),
                                      b["pixel_scale"].to(device), b["temporal_patch_size"])
        d["pixel_values"] = pix.to(dtype)
        if takes_mm_types:
            d["mm_token_type_ids"] = (d["input_ids"] == image_token).int()
        return d

    def step(host, d):
        out = model(**d)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def account(b):
        real = int(b["attention_mask"].sum())
        return real, b["input_ids"].numel(), flops.micro_batch(b["cu_seqlens"], b["image_grid_thw"], real, real), 1

    try:
        time_steps(r, device, args.warmup, args.steps, lambda: next(it), to_device, step, account, peak, profile_path(args, r))
    finally:
        del it, loader


# ---------------------------------------------------------------- (b, c) engines on packed micro-batches


class _NoOptimizer:
    """Megatron optimizer stand-in for megatron-fwdbwd: no fp32 master weights, no Adam state, no update."""

    def __init__(self, *args, **kwargs):
        self.param_groups = [{"lr": 0.0}]

    def zero_grad(self) -> None:
        pass

    def step(self):
        return True, 0.0, None


@contextlib.contextmanager
def no_optimizer(enabled: bool):
    """Make MegatronEngine build its model and DDP wrapper as usual but no optimizer (it imports the factory
    at construction time, so patching the module attribute is enough)."""
    if not enabled:
        yield
        return
    import megatron.core.optimizer as mopt

    import train.engine_megatron as em

    saved = mopt.get_megatron_optimizer, em._TorchOptimizer
    mopt.get_megatron_optimizer = lambda *a, **k: _NoOptimizer()
    em._TorchOptimizer = _NoOptimizer
    try:
        yield
    finally:
        mopt.get_megatron_optimizer, em._TorchOptimizer = saved


def engine_class(variant: str):
    if variant.startswith("megatron"):
        from train.engine_megatron import MegatronEngine

        return MegatronEngine
    import train.engine_fsdp as m  # ImportError when it does not exist yet: the caller records "skipped"

    cls = getattr(m, "FSDPEngine", None)
    if cls is None:
        found = [v for k, v in vars(m).items() if isinstance(v, type) and k.endswith("Engine") and hasattr(v, "train_step")]
        if not found:
            raise ImportError("train/engine_fsdp.py defines no *Engine class with train_step")
        cls = found[0]
    return cls


def run_engine(r: Result, variant: str, hf_config, args, device: torch.device, world, recompute: str, peak: float | None) -> None:
    from shared.config import TrainConfig
    from train.data import DataConfig, build_loader
    from train.flops import StepFlops

    cls = engine_class(variant)
    tc = TrainConfig(
        backend="fsdp" if variant == "fsdp" else "megatron",
        random_init=True, global_batch_size=args.global_batch_size, max_tokens_per_gpu=args.max_tokens,
        bf16=device.type == "cuda", recompute=recompute, num_workers=args.num_workers, seed=args.seed,
        fused_kernels=variant != "megatron-unfused", compile_layers=variant not in ("megatron-eager", "megatron-unfused"),
    )
    t = time.perf_counter()
    with no_optimizer(variant == "megatron-fwdbwd"):
        engine = cls(hf_config, tc, world, init_from=None)
    r.build_s = time.perf_counter() - t
    if any(getattr(engine, "compiled_layers", ())):
        print("  compiled layers (decoder, vision): %d, %d; their compile lands in the warm-up steps" % engine.compiled_layers)
    model = getattr(engine, "inner", None) or getattr(engine, "model", None)
    if model is not None:
        r.params_b = sum(p.numel() for p in model.parameters()) / 1e9  # this rank's share under sharding
    pixel_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    cfg = DataConfig(max_tokens_per_gpu=args.max_tokens, global_batch_size=args.global_batch_size,
                     num_epochs=10_000, seed=args.seed, num_workers=args.num_workers,
                     pin_memory=False if args.no_pin_memory else None)
    loader = build_loader(args.shards, cfg, world.dp_rank, world.dp)
    it = iter(loader)
    flops = StepFlops.from_hf_config(hf_config)

    def to_device(gstep):
        return [mb.to(device, non_blocking=True, pixel_dtype=pixel_dtype) for mb in gstep.micro_batches]

    def step(gstep, mbs):
        out = engine.train_step(mbs, gstep.num_loss_tokens, 1e-5)
        return float(out["loss_sum"]) / max(1, gstep.num_loss_tokens)

    def account(gstep):
        mbs = gstep.micro_batches
        fl = sum(flops.micro_batch(mb.cu_seqlens, mb.image_grid_thw, mb.num_real_tokens, mb.num_loss_tokens) for mb in mbs)
        return sum(mb.num_real_tokens for mb in mbs), sum(mb.num_tokens for mb in mbs), fl, len(mbs)

    try:
        time_steps(r, device, args.warmup, args.steps, lambda: next(it), to_device, step, account, peak, profile_path(args, r))
    finally:
        it.close()  # stops the loader's workers
        del it, loader, engine, model


# ---------------------------------------------------------------- the run


def predicted_oom(variant: str, n_params: int, device: torch.device, headroom_gib: float) -> str | None:
    total = card_gib(device)
    if total is None:
        return None
    need = STATE_BYTES[variant] * n_params / GIB
    if need + headroom_gib > total:
        return (f"{STATE_BYTES[variant]} B/param x {n_params / 1e9:.2f}B = {need:.0f} GiB of training state "
                f"+ {headroom_gib:.0f} GiB activations > {total:.0f} GiB card")
    return None


def markdown_table(results: list[Result], device_name: str) -> str:
    base = {r.preset: r.real_tokens_per_s for r in results if r.variant == "baseline" and r.status == "ok"}
    rows = [
        f"Device: {device_name}",
        "",
        "| preset | variant | status | step ms (median) | micro-batches / step | real tokens / step | real tokens/s | vs baseline "
        "| real / computed tokens | model TFLOP/s | MFU | peak mem GiB | data wait | GC ms / step | build s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    for r in results:
        ratio = f"{r.real_tokens_per_s / base[r.preset]:.2f}x" if r.real_tokens_per_s and base.get(r.preset) else "-"
        status = r.status if len(r.status) < 40 else r.status[:37] + "..."
        rows.append(
            f"| {r.preset} | {r.variant} | {status} | {f(r.step_ms_median, '.0f')} | {f(r.micro_batches_per_step, '.1f')} "
            f"| {f(r.real_tokens_per_step, ',.0f')} | {f(r.real_tokens_per_s, ',.0f')} | {ratio} | {f(r.real_fraction, '.1%')} "
            f"| {f(r.model_tflops, '.3g')} | {f(r.mfu, '.1%')} | {f(r.peak_mem_gib, '.1f')} | {f(r.data_wait_fraction, '.2%')} "
            f"| {f(r.gc_ms_per_step, '.1f')} | {f(r.build_s, '.0f')} |"
        )
    notes = [f"- {r.preset} {r.variant}: {r.note}" for r in results if r.note]
    return "\n".join(rows + ([""] + notes if notes else []))


def plan_runs(args) -> list[tuple[str, str, str]]:
    """(preset, variant, recompute) in run order: the comparison preset's variants, then the bigger presets."""
    presets = [p for p in args.presets.split(",") if p]
    variants = [v for v in args.variants.split(",") if v]
    recomputes = [x for x in args.recompute.split(",") if x]
    for v in variants:
        if v not in STATE_BYTES:
            raise SystemExit(f"unknown variant {v!r}: use one of {', '.join(STATE_BYTES)}")
    for x in recomputes:
        if x not in ("none", "selective", "full"):
            raise SystemExit(f"--recompute {x!r}: use none, selective or full (or a comma list)")
    runs = []
    for i, preset in enumerate(presets):
        for v in variants:
            if i > 0 and v not in ("megatron", "megatron-fwdbwd"):
                continue  # issue 8: the 4B and 8B presets through the Megatron backend only (A/B variants: first preset)
            for x in recomputes if v.startswith("megatron") else ["none"]:
                runs.append((preset, v, x))
    return runs


def run_variant(r: Result, variant: str, recompute: str, args, device: torch.device, world, peak: float | None) -> None:
    """Predict an OOM, else build and time the variant; any failure lands in r.status (the run goes on)."""
    from train.models import load_hf_config

    hf_config = load_hf_config(r.preset)
    why = predicted_oom(variant, count_params(hf_config), device, args.headroom_gib)
    if why:
        r.status, r.note = "OOM (predicted)", why
        return
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        if variant == "baseline":
            run_baseline(r, hf_config, args, device, peak)
        else:
            run_engine(r, variant, hf_config, args, device, world, recompute, peak)
        return
    except ImportError as e:
        if variant != "fsdp":
            raise
        r.status, r.note = "skipped", f"train/engine_fsdp.py not available ({e})"
        return
    except Exception as e:  # one variant failing must not cost the others their numbers
        oom = is_oom(e)
        r.status = "OOM" if oom else f"error: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
        if not oom:
            traceback.print_exc(limit=-8)
    # only here, out of the except block, is the traceback (and the model its frames hold) released
    r.step_s, r.data_s = [], []
    if device.type == "cuda":
        r.peak_mem_gib = torch.cuda.max_memory_allocated(device) / GIB


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.make_shards is not None:
        sys.path.insert(0, str(REPO / "bench"))
        import bench_packing

        print(bench_packing.geo3k_like_shard_set(bench_packing.demo_shard_set(512), args.make_shards))
        return
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # the engines pick their device from torch.cuda.is_available()
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --device cpu for the smoke test")
    missing = [m for m in ("megatron.core", "zstandard", "pyarrow") if importlib.util.find_spec(m) is None]
    if missing:
        raise SystemExit(f"missing {', '.join(missing)}: install the carried wheels first (docs/perf-notes.md, 'The command'), e.g. "
                         "python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")
    from train.distributed import destroy, init_distributed
    from train.flops import datasheet_peak_tflops, measure_peak_tflops
    from train.models.attention import select_backend

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    world = init_distributed(1, 1)
    device = world.device
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    vers = versions()
    print(f"# bench_throughput on {device_name}" + (f", {card_gib(device):.0f} GiB" if device.type == "cuda" else ""))
    print("# " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(f"# host: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, torch intra-op threads {torch.get_num_threads()}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    print(f"# varlen attention backend (Megatron path, {str(dtype).split('.')[-1]}): {select_backend(device, dtype)}")
    measured = measure_peak_tflops(device) if device.type == "cuda" else cpu_peak_tflops()
    datasheet, _ = datasheet_peak_tflops(device)
    peak = datasheet or measured  # MFU against the datasheet dense bf16 peak where the card is known
    print(f"# MFU against {'the datasheet bf16 peak' if datasheet else 'the measured matmul peak'} {peak:.4g} TFLOP/s; "
          f"measured matmul peak ({'bf16' if device.type == 'cuda' else 'fp32, CPU'}): {measured:.3g} TFLOP/s")
    print(f"# shards {args.shards}; budget {args.max_tokens} tokens; GBS {args.global_batch_size}; warmup {args.warmup}, steps {args.steps}")

    results: list[Result] = []
    report: dict[str, Any] = {"device": device_name, "versions": vers, "peak_tflops": peak, "measured_peak_tflops": measured, "args": {k: str(v) for k, v in vars(args).items()},
                              "command": " ".join(sys.argv), "results": results}
    runs = plan_runs(args)
    t_all = time.perf_counter()
    fallen_back: set[tuple[str, str]] = set()
    queue = list(runs)
    while queue:
        preset, variant, recompute = queue.pop(0)
        label = variant if recompute == "none" else f"{variant}[recompute={recompute}]"
        # The plain baseline keeps Python's automatic collector: managing it is one of our levers.
        r = Result(preset=preset, variant=label, gc_interval=0 if variant == "baseline" else args.gc_interval)
        results.append(r)
        print(f"\n## {preset} / {label}  (t = {time.perf_counter() - t_all:.0f} s)", flush=True)
        if args.time_limit_s and time.perf_counter() - t_all > args.time_limit_s:
            r.status, r.note = "skipped", f"--time-limit-s {args.time_limit_s:.0f} reached"
        else:
            run_variant(r, variant, recompute, args, device, world, peak)
        left = free_memory(device)
        if r.status.startswith("OOM") and variant == "megatron" and not args.no_fallback and (preset, recompute) not in fallen_back:
            fallen_back.add((preset, recompute))
            queue.insert(0, (preset, "megatron-fwdbwd", recompute))
        if r.status == "ok":
            print(f"  {r.step_ms_median:.0f} ms/step, {r.real_tokens_per_s:,.0f} real tokens/s, {r.model_tflops:.3g} TFLOP/s"
                  + (f" (MFU {r.mfu:.1%})" if r.mfu else "") + f", data wait {r.data_wait_fraction:.2%}"
                  + (f", peak {r.peak_mem_gib:.1f} GiB" if r.peak_mem_gib else "") + f", loss {r.loss:.3f}", flush=True)
        else:
            print(f"  {r.status}" + (f": {r.note}" if r.note else ""), flush=True)
        if left > 0.5:
            print(f"  note: {left:.1f} GiB still allocated after freeing this variant", flush=True)
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({**report, "results": [asdict(x) for x in results]}, indent=1))
    destroy()
    print(f"\n# total {time.perf_counter() - t_all:.0f} s\n")
    print(markdown_table(results, device_name))
    if args.out:
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
