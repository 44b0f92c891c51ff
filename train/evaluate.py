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
    answers depend on the diagrams. About 0 for random weights (nothing is read from any input yet); clearly
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


def _dp_group():
    from megatron.core import parallel_state

    return parallel_state.get_data_parallel_group() if parallel_state.model_parallel_is_initialized() else None


def _dp_sum(t: torch.Tensor, world) -> None:
    if dist.is_initialized() and world.dp > 1:
        dist.all_reduce(t, group=_dp_group())


def _anyone(flag: bool, world) -> bool:
    """Whether any data-parallel rank passes True (every rank calls this together)."""
    t = torch.tensor([1.0 if flag else 0.0], device=world.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_dp_group())
    return bool(t.item())


def prompt_of(sample: Sample) -> Sample:
    """The sample cut before its answer: what the model sees at generation time."""
    start = int(np.flatnonzero(sample.loss_mask)[0])
    ids = sample.input_ids[:start]
    return replace(sample, input_ids=ids, loss_mask=np.zeros_like(ids, dtype=np.uint8))


@torch.no_grad()
def generate_greedy(engine, prompts: list[Sample], spec: PackingSpec, *, max_new_tokens: int, stop_id: int, budget: int, world, pixel_dtype) -> list[list[int]]:
    """Greedy continuation of each prompt until `stop_id` or max_new_tokens (`spec.pad_to_multiple_of` pads
    each forward for sequence parallelism)."""
    lockstep = engine.collective_forward and world.dp > 1
    out: list[list[int]] = [[] for _ in prompts]
    steps = _decode_steps(prompts, out, spec, max_new_tokens=max_new_tokens, stop_id=stop_id, budget=budget)
    while True:
        item = next(steps, None)
        if lockstep and not _anyone(item is not None, world):
            break
        if item is None:
            if not lockstep:
                break
            # this rank is done but another still decodes: join its forward with a padding-only one
            engine.logits(pack_samples([], spec).to(world.device, pixel_dtype=pixel_dtype))
            continue
        live, mb = item
        logits = engine.logits(mb.to(world.device, pixel_dtype=pixel_dtype))
        last = mb.cu_seqlens[1 : len(live) + 1].long() - 1
        nxt = logits[last.to(logits.device)].float().argmax(dim=-1).tolist()
        for i, t in zip(live, nxt):
            out[i].append(int(t))
    return out


def _decode_steps(prompts: list[Sample], out: list[list[int]], spec: PackingSpec, *, max_new_tokens: int, stop_id: int, budget: int):
    """Yields (live prompt indices, packed micro-batch) for each forward of greedy decoding; the caller appends
    each live prompt's next token to `out` before asking for the next forward."""
    # groups of prompts that fit the token budget with their answers
    groups, cur, used = [], [], 0
    for i, p in enumerate(prompts):
        need = p.num_tokens + max_new_tokens
        if cur and used + need > budget:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += need
    if cur:
        groups.append(cur)
    for group in groups:
        live = list(group)
        for _ in range(max_new_tokens):
            if not live:
                break
            batch = [replace(prompts[i], input_ids=np.concatenate([prompts[i].input_ids, np.asarray(out[i], np.int32)]).astype(np.int32),
                             loss_mask=np.zeros(prompts[i].num_tokens + len(out[i]), np.uint8)) for i in live]
            yield live, pack_samples(batch, spec)
            live = [i for i in live if out[i][-1] != stop_id and len(out[i]) < max_new_tokens]


def eval_accuracy(engine, shard_dir, spec: PackingSpec, world, *, num_samples: int | None, max_new_tokens: int, budget: int, tokenizer, stop_id: int, pixel_dtype) -> dict[str, Any]:
    """Greedy answers to the first num_samples test problems (None: all of them), scored against the gold answers."""
    ss = ShardSet(shard_dir)
    samples = []
    for i, s in enumerate(ss.iter_samples()):
        if num_samples is not None and i >= num_samples:
            break
        if i % world.dp == world.dp_rank:
            samples.append(s)
    prompts = [prompt_of(s) for s in samples]
    gens = generate_greedy(engine, prompts, spec, max_new_tokens=max_new_tokens, stop_id=stop_id, budget=budget, world=world, pixel_dtype=pixel_dtype)
    correct = 0
    examples = []
    for s, g in zip(samples, gens):
        text = tokenizer.decode(g, skip_special_tokens=True) if tokenizer is not None else ""
        ok = is_correct(text, s.meta["answer"])
        correct += ok
        if len(examples) < 3:
            examples.append({"key": s.key, "answer": s.meta["answer"], "generated": text, "correct": ok})
    t = torch.tensor([correct, len(samples)], dtype=torch.float64, device=world.device)
    _dp_sum(t, world)
    return {"accuracy": float(t[0] / max(t[1], 1)), "answered": int(t[1]), "examples": examples}
