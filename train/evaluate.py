"""Evaluation on the test shards: mean per-token loss, and answer accuracy by greedy generation.

Generation needs no KV cache to be correct, only to be fast: each new token re-runs the packed prompts
(several problems per forward, within the token budget), which for Geo3K's ~300-token prompts and short
answers costs a few seconds per eval. Problems are split over data-parallel ranks; tensor-parallel ranks
run the same problems together.

Every layout runs eval, whatever the split leaves a rank:
- micro-batches are padded to what sequence parallelism needs (`DataConfig.pad_to_multiple_of`, generation too);
- where a forward is a collective across data-parallel ranks (`engine.collective_forward`: expert parallelism's
  all-to-all), every rank runs the same number of forwards: a rank with nothing left runs a padding-only one,
  and the ranks agree (one all-reduce per forward) on whether anyone still has work;
- the engine is told when eval starts and ends on every rank (`engine.evaluating()`), so a backend that must
  prepare collectively (FSDP gathers its parameters) does it on all ranks, also those without eval samples.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from shared.manifest import ShardSet
from shared.schema import Sample
from train.answers import is_correct
from train.data import DataConfig, PackingSpec, build_loader, pack_samples


def eval_loss(engine, shard_dir, spec_cfg: DataConfig, world, pixel_dtype, *, image_gain: bool = False) -> dict[str, float]:
    """Per-token loss over every sample of the eval set, once.

    With image_gain, the same loss again with every image blanked (the same grid, every pixel the processor's
    mean colour, which normalises to exactly 0), and `image_gain = loss_blank - loss`: how much the model's
    answers depend on the diagrams. Noise of either sign for random weights (any input change moves their loss); clearly
    positive for a model that reads the images; 0 exactly when pixels never reach the model."""
    ss = ShardSet(shard_dir)
    cfg = replace(spec_cfg, global_batch_size=ss.num_samples, drop_last=False, num_epochs=1, num_workers=0)
    loader = build_loader(shard_dir, cfg, world.dp_rank, world.dp)
    total = torch.zeros(3, dtype=torch.float64, device=world.device)  # loss sum, loss tokens, blank loss sum
    for step in loader:
        # the plan gives every rank the same number of micro-batches (padding-only ones where a rank has too
        # few samples); they are skipped unless the forward is a collective
        for mb in step.micro_batches:
            if mb.num_real_tokens == 0 and not engine.collective_forward:
                continue
            mb = mb.to(world.device, pixel_dtype=pixel_dtype)
            total[0] += engine.eval_loss(mb).double()
            if image_gain:
                total[2] += engine.eval_loss(blank_images(mb)).double()
        total[1] += step.num_loss_tokens / world.dp  # every rank knows the global count
    _dp_sum(total, world)
    tokens = max(float(total[1]), 1.0)
    out = {"loss": float(total[0]) / tokens, "samples": ss.num_samples}
    if image_gain:
        out["loss_blank_images"] = float(total[2]) / tokens
        out["image_gain"] = out["loss_blank_images"] - out["loss"]
    return out


def blank_images(mb):
    """The micro-batch with every image's pixels at the processor's mean colour (normalised: 0), same grids."""
    if not mb.num_patches:
        return mb
    return replace(mb, keys=list(mb.keys), _pixel_values=torch.zeros_like(mb.pixel_values))


def _dp_sum(t: torch.Tensor, world) -> None:
    if dist.is_initialized() and world.dp > 1:
        dist.all_reduce(t, group=world.dp_group)


def _anyone(flag: bool, world) -> bool:
    """Whether any data-parallel rank passes True (every rank calls this together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=world.dp_group)
    return bool(t.item())


def prompt_of(sample: Sample) -> Sample:
    """The sample cut before its answer: what the model sees at generation time."""
    start = int(np.flatnonzero(sample.loss_mask)[0])
    ids = sample.input_ids[:start]
    return replace(sample, input_ids=ids, loss_mask=np.zeros_like(ids, dtype=np.uint8))


@torch.no_grad()
def generate_greedy(engine, prompts: list[Sample], spec: PackingSpec, *, max_new_tokens: int, stop_id: int | None, budget: int,
                    world, pixel_dtype, use_cache: bool = True, kv_cache_positions: int = 131072) -> list[list[int]]:
    """Greedy continuation of each prompt until `stop_id` (None: never) or max_new_tokens.

    With a KV cache where the engine has one (`engine.kv_cache`; the Megatron engine): prompts sorted by length
    go in decode batches of at most `kv_cache_positions` cached positions (rows x (longest prompt + new
    tokens)); each batch prefills in packed chunks of at most `budget` tokens (the vision tower once per
    prompt), then decodes all its rows together, one token per row and forward. Without: every new token
    re-runs the packed prompts and what they generated so far. `spec.pad_to_multiple_of` pads each forward
    (and the decode rows) for sequence parallelism."""
    lockstep = engine.collective_forward and world.dp > 1
    out: list[list[int]] = [[] for _ in prompts]
    kw = dict(max_new_tokens=max_new_tokens, stop_id=stop_id, budget=budget, device=world.device, pixel_dtype=pixel_dtype)
    if use_cache and engine.kv_cache:
        forwards = _cached_forwards(engine, prompts, out, spec, kv_cache_positions=kv_cache_positions, **kw)
    else:
        forwards = _uncached_forwards(engine, prompts, out, spec, **kw)
    while True:
        run = next(forwards, None)
        if lockstep and not _anyone(run is not None, world):
            break
        if run is None:
            if not lockstep:
                break
            # this rank is done but another still decodes: join its forward with a padding-only one
            engine.logits(pack_samples([], spec).to(world.device, pixel_dtype=pixel_dtype))
            continue
        run()
    return out


def _groups(items: list[int], size, budget: int) -> list[list[int]]:
    """Consecutive groups of items whose sizes add up to at most budget (an oversized item alone)."""
    groups, cur, used = [], [], 0
    for i in items:
        if cur and used + size(i) > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += size(i)
    return groups + [cur] if cur else groups


def _done(tokens: list[int], stop_id: int | None, max_new_tokens: int) -> bool:
    return len(tokens) >= max_new_tokens or (bool(tokens) and tokens[-1] == stop_id)


def _uncached_forwards(engine, prompts, out, spec, *, max_new_tokens, stop_id, budget, device, pixel_dtype):
    """Yields one forward (a callable) per new token of each packed group of prompts; each appends to `out`."""
    for group in _groups(list(range(len(prompts))), lambda i: prompts[i].num_tokens + max_new_tokens, budget):
        live = list(group)
        while live:
            batch = [replace(prompts[i], input_ids=np.concatenate([prompts[i].input_ids, np.asarray(out[i], np.int32)]).astype(np.int32),
                             loss_mask=np.zeros(prompts[i].num_tokens + len(out[i]), np.uint8)) for i in live]
            mb = pack_samples(batch, spec)

            def run(mb=mb, live=live):
                logits = engine.logits(mb.to(device, pixel_dtype=pixel_dtype))
                last = mb.cu_seqlens[1 : len(live) + 1].long() - 1
                for i, t in zip(live, logits[last.to(logits.device)].float().argmax(dim=-1).tolist()):
                    out[i].append(int(t))

            yield run
            live = [i for i in live if not _done(out[i], stop_id, max_new_tokens)]


def _cached_forwards(engine, prompts, out, spec, *, max_new_tokens, stop_id, budget, device, pixel_dtype, kv_cache_positions):
    """Yields the forwards of KV-cached greedy decoding (generate_greedy); each appends to `out`."""
    from train.models.kv_cache import KVCache

    multiple = max(1, spec.pad_to_multiple_of)
    order = sorted(range(len(prompts)), key=lambda i: -prompts[i].num_tokens)  # longest first: little cache padding
    batches, cur = [], []
    for i in order:  # each batch's first prompt is its longest
        if cur and (len(cur) + 1) * (prompts[cur[0]].num_tokens + max_new_tokens) > kv_cache_positions:
            batches.append(cur)
            cur = []
        cur.append(i)
    batches += [cur] if cur else []
    for batch in batches:
        num_rows = -(-len(batch) // multiple) * multiple  # sequence parallelism splits the rows over TP ranks
        cache = KVCache(num_rows, prompts[batch[0]].num_tokens + max_new_tokens, device)
        next_position = [0] * num_rows  # M-RoPE: text after the prompt continues from its largest position
        row = 0
        for chunk in _groups(batch, lambda i: prompts[i].num_tokens, budget):
            mb = pack_samples([prompts[i] for i in chunk], spec)
            cu = mb.cu_seqlens.tolist()
            for j in range(len(chunk)):
                next_position[row + j] = int(mb.position_ids[:, cu[j] : cu[j + 1]].max()) + 1

            def prefill(mb=mb, chunk=chunk, row=row):
                cache.prefill(list(range(row, row + len(chunk))), [prompts[i].num_tokens for i in chunk])
                last = (mb.cu_seqlens[1 : len(chunk) + 1].long() - 1).to(device)
                logits = engine.prefill(mb.to(device, pixel_dtype=pixel_dtype), cache, last)
                for i, t in zip(chunk, logits.float().argmax(dim=-1).tolist()):
                    out[i].append(int(t))

            yield prefill
            row += len(chunk)
        cache.decode()
        step = 0
        while any(not _done(out[i], stop_id, max_new_tokens) for i in batch):
            ids = [out[i][-1] for i in batch] + [spec.pad_token_id] * (num_rows - len(batch))
            positions = [p + step for p in next_position]

            def decode(ids=ids, positions=positions):
                logits = engine.decode(torch.tensor(ids, device=device), torch.tensor(positions, device=device).expand(3, -1), cache)
                cache.advance()
                for i, t in zip(batch, logits[: len(batch)].float().argmax(dim=-1).tolist()):
                    if not _done(out[i], stop_id, max_new_tokens):
                        out[i].append(int(t))

            yield decode
            step += 1


def eval_accuracy(engine, shard_dir, spec: PackingSpec, world, *, num_samples: int | None, max_new_tokens: int, budget: int,
                  tokenizer, stop_id: int | None, pixel_dtype, **generate) -> dict[str, Any]:
    """Greedy answers to the first num_samples test problems (None: all of them), scored against the gold answers.

    Returns accuracy, answered and `records`: one dict per problem (key, gold answer, generated text, correct,
    number of generated tokens), from every data-parallel rank, in shard order. `generate`: generate_greedy's
    use_cache and kv_cache_positions."""
    ss = ShardSet(shard_dir)
    samples, index = [], []
    for i, s in enumerate(ss.iter_samples()):
        if num_samples is not None and i >= num_samples:
            break
        if i % world.dp == world.dp_rank:
            samples.append(s)
            index.append(i)
    prompts = [prompt_of(s) for s in samples]
    gens = generate_greedy(engine, prompts, spec, max_new_tokens=max_new_tokens, stop_id=stop_id, budget=budget, world=world,
                           pixel_dtype=pixel_dtype, **generate)
    records = []
    for i, s, g in zip(index, samples, gens):
        text = tokenizer.decode(g, skip_special_tokens=True) if tokenizer is not None else ""
        records.append({"index": i, "key": s.key, "answer": s.meta["answer"], "generated": text,
                        "correct": bool(is_correct(text, s.meta["answer"])), "new_tokens": len(g)})
    if dist.is_initialized() and world.dp > 1:
        gathered: list[Any] = [None] * world.dp
        dist.all_gather_object(gathered, records, group=world.dp_group)
        records = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / max(len(records), 1), "answered": len(records), "records": records, "examples": records[:3]}


def shard_tokenizer(ss: ShardSet):
    """The tokenizer the shards were made with (to read generated answers)."""
    from shared.presets import load_processor

    return load_processor(ss.processor_name).tokenizer


# ---------------------------------------------------------------- geo3k eval


def run_eval(cfg, model: str, shards, *, samples: int | None, out_jsonl, say=print) -> dict[str, Any]:
    """`geo3k eval`: the per-token loss (and image gain), then greedy answers and their accuracy, of any model
    (an HF folder or hub id, a preset's hub id, a geo3k run folder or checkpoint) on a test shard set, through the
    Megatron engine with the layout of cfg.train. Writes one JSON line per answered problem to out_jsonl (rank 0)."""
    import json
    import os
    import time
    from dataclasses import replace as dc_replace
    from pathlib import Path

    from train.distributed import init_distributed
    from train.engine_megatron import MegatronEngine
    from train.models.source import resolve_source
    from train.trainer import check_layout, check_shards_fit_model

    shards = Path(shards)
    ss = ShardSet(shards)  # a clear error for a folder that is not a complete shard set
    source = resolve_source(model, pretrained=True)
    check_shards_fit_model(ss.processor, source.hf_config, shards)  # before any weight is read
    # eval runs each layer once per forward: compiling layers would cost more than it saves
    tc = dc_replace(cfg.train, random_init=False, compile_layers=False)
    check_layout(tc, source.hf_config, int(os.environ.get("WORLD_SIZE", 1)))
    tokenizer = shard_tokenizer(ss)
    world = init_distributed(tc.tensor_parallel, 1, tc.expert_parallel)
    data_cfg = DataConfig.from_train_config(tc)  # eval_loss reads every sample once, in the foreground
    pad = data_cfg.pad_to_multiple_of
    t0 = time.perf_counter()
    engine = MegatronEngine(source.hf_config, tc, world, init_from=source)
    pixel_dtype = torch.bfloat16 if (tc.bf16 and engine.cuda) else torch.float32
    res: dict[str, Any] = {"model": model, "weights": str(source.weights), "shards": str(shards), "load_seconds": time.perf_counter() - t0}
    with engine.evaluating():
        t0 = time.perf_counter()
        res.update(eval_loss(engine, shards, data_cfg, world, pixel_dtype, image_gain=tc.eval_image_gain))
        res["loss_seconds"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = eval_accuracy(engine, shards, PackingSpec.from_processor_identity(ss.processor, pad), world,
                            num_samples=samples, max_new_tokens=tc.eval_max_new_tokens, budget=tc.max_tokens_per_gpu,
                            tokenizer=tokenizer, stop_id=ss.processor["special_ids"]["im_end"], pixel_dtype=pixel_dtype,
                            kv_cache_positions=tc.eval_kv_cache_positions)
        res["generate_seconds"] = time.perf_counter() - t0
    records = acc.pop("records")
    acc.pop("examples")
    res.update(acc, correct=sum(r["correct"] for r in records), max_new_tokens=tc.eval_max_new_tokens)
    if world.is_main:
        out_jsonl = Path(out_jsonl)
        out_jsonl.parent.mkdir(parents=True, exist_ok=True)
        with open(out_jsonl, "w") as f:
            for r in records:
                f.write(json.dumps({k: r[k] for k in ("key", "answer", "generated", "correct", "new_tokens")}, ensure_ascii=False) + "\n")
        res["answers_file"] = str(out_jsonl)
    return res


def eval_summary(res: dict[str, Any]) -> str:
    """geo3k eval's table."""
    rows = [
        ("model", f"{res['model']} (weights {res['weights']})"),
        ("shards", f"{res['shards']} ({res['samples']} problems)"),
        ("loss", f"{res['loss']:.4f} per answer token"),
    ]
    if "image_gain" in res:
        rows.append(("image gain", f"{res['image_gain']:+.4f} (loss {res['loss_blank_images']:.4f} with every image blanked)"))
    rows += [
        ("accuracy", f"{100 * res['accuracy']:.1f}% ({res['correct']} of {res['answered']} answered correctly)"),
        ("time", f"loss {res['loss_seconds']:.1f} s, answers {res['generate_seconds']:.1f} s (greedy, at most "
                 f"{res['max_new_tokens']} new tokens), weights {res['load_seconds']:.1f} s"),
        ("answers", res.get("answers_file", "")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
