"""Eval speed: the test split's loss (with the blank-image loss) and greedy answers of a fixed length, KV-cached
beside the uncached path (every new token re-runs the packed prompts), through the Megatron engine as
`geo3k train`'s eval and `geo3k eval` run them. The stop token is ignored, so every answer is --new-tokens long.

    python bench/bench_eval.py --shards .cache/gpu/realshards/geo3k/test --preset qwen3-vl-2b --new-tokens 64
    python bench/bench_eval.py ... --uncached      # also the uncached path on the same prompts
    python bench/bench_eval.py --make-shards .cache/gpu/real601   # the split: ten real Geo3K problems x 60 + 1

The split is Geo3K's test size (601 problems) made of the ten real problems of the sample folder
(GEO3K_SAMPLE_DIR, default ../shared/geo3k_sample), repeated: real diagrams, so real prompt lengths.

Prints one JSON object: seconds of each part, answers/s, and how many answers the two paths agree on token for
token (bf16: the cached decode's attention is another kernel than the packed forward's, so a near-tie can flip).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def make_shards(out: Path, num: int = 601) -> Path:
    from preprocess.pipeline import run_preprocess
    from shared.config import load_config

    src = Path(os.environ.get("GEO3K_SAMPLE_DIR", Path(__file__).resolve().parents[2] / "shared" / "geo3k_sample"))
    rows = [json.loads(x) for x in (src / "problems.jsonl").read_text().splitlines()]
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(src / "images", out / "images")
    (out / "test.jsonl").write_text("".join(json.dumps({**rows[i % len(rows)], "id": 100_000 + i, "split": "test"}) + "\n" for i in range(num)))
    cfg = load_config(None, [f"shards.output_dir={out / 'shards'}", "preprocess.fetch.cache_dir=", "source.image_key=image",
                             f"source.image_root={out / 'images'}"])
    cfg.source.files, cfg.source.splits = {"test": str(out / "test.jsonl")}, ["test"]
    run_preprocess(cfg, progress=False)
    shutil.rmtree(out / "images")
    return out / "shards" / "geo3k" / "test"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", help="a test split folder")
    ap.add_argument("--make-shards", type=Path, help="write the 601-problem split under this folder, and stop")
    ap.add_argument("--preset", default="qwen3-vl-2b", help="random init from this preset")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--kv-cache-positions", type=int, default=None, help="default: train.eval_kv_cache_positions")
    ap.add_argument("--uncached", action="store_true", help="also time the uncached path")
    args = ap.parse_args()
    if args.make_shards:
        return print(make_shards(args.make_shards))

    from shared.config import TrainConfig
    from shared.manifest import ShardSet
    from train.data import DataConfig, PackingSpec
    from train.distributed import init_distributed
    from train.engine_megatron import MegatronEngine
    from train.evaluate import eval_loss, generate_greedy, prompt_of
    from train.models import load_hf_config

    tc = TrainConfig(random_init=True, compile_layers=False)
    positions = args.kv_cache_positions or tc.eval_kv_cache_positions
    world = init_distributed()
    engine = MegatronEngine(load_hf_config(args.preset), tc, world, init_from=None)
    cuda, dtype = world.device.type == "cuda", torch.bfloat16 if world.device.type == "cuda" else torch.float32
    ss = ShardSet(args.shards)
    spec, prompts = PackingSpec.from_processor_identity(ss.processor), [prompt_of(s) for s in ss.iter_samples()]
    data = DataConfig(max_tokens_per_gpu=tc.max_tokens_per_gpu, global_batch_size=tc.global_batch_size)

    sync = torch.cuda.synchronize if cuda else lambda: None

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t0

    def generate(use_cache: bool, some=None):
        return generate_greedy(engine, some or prompts, spec, max_new_tokens=args.new_tokens, stop_id=None, budget=tc.max_tokens_per_gpu,
                               world=world, pixel_dtype=dtype, use_cache=use_cache, kv_cache_positions=positions)

    phases = {"prefill": 0.0, "decode": 0.0}
    for name in phases:  # the cached path's time by phase (synchronised: the decode loop syncs each step anyway)
        def timed_phase(*a, _name=name, _fn=getattr(engine, name), **k):
            out, seconds = timed(lambda: _fn(*a, **k))
            phases[_name] += seconds
            return out
        setattr(engine, name, timed_phase)

    with engine.evaluating():
        generate(True, prompts[:4])  # warm-up: CUDA context, kernels, allocator
        generate(False, prompts[:2])
        loss, loss_s = timed(lambda: eval_loss(engine, args.shards, data, world, dtype, image_gain=True))
        phases.update(prefill=0.0, decode=0.0)
        cached, cached_s = timed(lambda: generate(True))
        res = {"card": torch.cuda.get_device_name() if cuda else "cpu", "preset": args.preset, "problems": len(prompts),
               "prompt_tokens": sum(p.num_tokens for p in prompts), "new_tokens": args.new_tokens, "kv_cache_positions": positions,
               "loss_s": round(loss_s, 2), "loss": loss["loss"], "image_gain": loss["image_gain"], "cached_generate_s": round(cached_s, 2),
               "cached_eval_s": round(loss_s + cached_s, 2), "prefill_s": round(phases["prefill"], 2), "decode_s": round(phases["decode"], 2),
               "answers_per_s": round(len(prompts) / cached_s, 1), "all_answers_full_length": all(len(g) == args.new_tokens for g in cached),
               **({"peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 1)} if cuda else {})}
        if args.uncached:
            uncached, uncached_s = timed(lambda: generate(False))
            res.update(uncached_generate_s=round(uncached_s, 2), uncached_eval_s=round(loss_s + uncached_s, 2),
                       speedup=round(uncached_s / cached_s, 1), same_answers=sum(a == b for a, b in zip(cached, uncached)),
                       same_tokens_fraction=round(sum(x == y for a, b in zip(cached, uncached) for x, y in zip(a, b))
                                                  / (len(prompts) * args.new_tokens), 4))
    print(json.dumps(res), flush=True)


if __name__ == "__main__":
    main()
