"""The Megatron engine's checkpoint state, keyed by parameter name, so a run can resume on another layout.

A checkpoint holds, per tensor-parallel rank r, `model_tpRR.pt` (its model state dict) and `optim_tpRR.pt`:

    {"format": 2, "step": Adam's step count,
     "params": {name: {"exp_avg": T, "exp_avg_sq": T[, "master": T]}}}

Each tensor has the shape of that rank's model parameter `name` (the TP shard, whole over data-parallel
ranks); "master" is the fp32 master weight of a bf16 run (on CPU the model weights are the fp32 weights).

- Another data-parallel size is free: Megatron's distributed optimizer shards each parameter's state over DP
  ranks, and `optimizer_state` gathers those slices into whole tensors (to DP rank 0, which writes them);
  `load_optimizer_state` hands each rank its slice again.
- Another tensor-parallel size: the model state, and every optimizer-state tensor (same names, same shapes),
  are merged over the saved TP ranks and split for the new size with the converter's rules
  (train/models/convert.py, which knows how each weight is split): `resharded`.

The distributed optimizer is read through the attributes megatron-core 0.16.1 keeps per model parameter
(`model_param_group_index_map`, `_get_model_param_range_map`); that version is pinned in pyproject.toml.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

FORMAT = 2
STATE_KEYS = ("exp_avg", "exp_avg_sq", "master")


class CheckpointLayoutError(RuntimeError):
    pass


# ---------------------------------------------------------------- gather / scatter the optimizer state


def _distributed_optimizers(optimizer) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _owner(optimizers, param):
    """(Megatron DistributedOptimizer, torch main param, flat range of `param` it holds) on this rank, or None."""
    for opt in optimizers:
        if param in opt.model_param_group_index_map:
            group_index, group_order = opt.model_param_group_index_map[param]
            main = opt.optimizer.param_groups[group_index]["params"][group_order]
            return opt, main, opt._get_model_param_range_map(param)["param"]
    return None


def _dp_group(param):
    from megatron.core import parallel_state

    # expert weights (allreduce=False) are sharded over the expert-data-parallel ranks
    if getattr(param, "allreduce", True):
        return parallel_state.get_data_parallel_group(with_context_parallel=True)
    return parallel_state.get_expert_data_parallel_group()


def _step_of(states) -> int:
    for st in states:
        if "step" in st:
            return int(st["step"])
    return 0


def optimizer_state(optimizer, named_params: list[tuple[str, torch.nn.Parameter]], *, distributed: bool) -> dict[str, Any]:
    """This TP rank's optimizer state by parameter name (collective over DP when `distributed`); complete on
    DP rank 0 (others get partial tensors, which they do not write)."""
    params: dict[str, dict[str, torch.Tensor]] = {}
    if not distributed:  # torch AdamW straight over the model's parameters (the CPU path)
        state = optimizer.state
        for name, p in named_params:
            if p in state and "exp_avg" in state[p]:
                params[name] = {k: state[p][k].detach().clone() for k in ("exp_avg", "exp_avg_sq")}
        return {"format": FORMAT, "step": _step_of(state.values()), "params": params}
    optimizers = _distributed_optimizers(optimizer)
    steps = []
    for name, p in named_params:
        owner = _owner(optimizers, p)
        full = {k: torch.zeros(p.numel(), dtype=torch.float32, device=p.device) for k in STATE_KEYS}
        if owner is not None:
            opt, main, r = owner
            st = opt.optimizer.state.get(main, {})
            steps.append(st)
            full["master"][r.start : r.end] = main.detach().float()
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    full[k][r.start : r.end] = st[k].float()
        group = _dp_group(p)
        if dist.get_world_size(group) > 1:
            for t in full.values():  # every DP rank holds a disjoint slice (or none): the sum is the whole
                dist.reduce(t, dst=dist.get_global_rank(group, 0), group=group)
        params[name] = {k: t.view(p.shape).cpu() for k, t in full.items()}
    step = torch.tensor(_step_of(steps), dtype=torch.float64, device=named_params[0][1].device)
    dist.all_reduce(step, op=dist.ReduceOp.MAX)  # a rank may own no slice at all
    return {"format": FORMAT, "step": int(step.item()), "params": params}


def load_optimizer_state(optimizer, named_params: list[tuple[str, torch.nn.Parameter]], state: dict[str, Any], *, distributed: bool) -> None:
    """Put a (possibly resharded) `optimizer_state` back: each rank takes its slice of every parameter."""
    step = float(state["step"])
    saved = state["params"]
    missing = [n for n, _ in named_params if n not in saved]
    if missing and state["step"] > 0:
        raise CheckpointLayoutError(f"the checkpoint's optimizer state lacks {len(missing)} parameters, e.g. {missing[:3]}")
    for name, p in named_params:
        if name not in saved:
            continue
        if not distributed:
            target, shard = p, {k: v for k, v in saved[name].items() if k != "master"}
            st = optimizer.state[target]
        else:
            owner = _owner(_distributed_optimizers(optimizer), p)
            if owner is None:
                continue
            opt, target, r = owner
            shard = {k: v.reshape(-1)[r.start : r.end] for k, v in saved[name].items()}
            target.data.copy_(shard.pop("master").to(target.device))
            st = opt.optimizer.state[target]
        for k, v in shard.items():
            if tuple(v.shape) != tuple(target.shape):
                raise CheckpointLayoutError(f"{name}: saved {k} of shape {tuple(v.shape)} != {tuple(target.shape)}")
            st[k] = v.to(device=target.device, dtype=target.dtype).clone()
        # one step tensor per parameter (torch AdamW increments each in place)
        st["step"] = torch.tensor(step, dtype=torch.float32)


# ---------------------------------------------------------------- files and resharding


def rank_files(ckpt: Path, kind: str) -> list[Path]:
    files = sorted(Path(ckpt).glob(f"{kind}_tp*.pt"))
    if not files:
        raise CheckpointLayoutError(f"{ckpt} holds no {kind}_tp*.pt: is it a geo3k Megatron checkpoint?")
    return files


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def resharded(ckpt: Path, tp_rank: int, tp_size: int, hf_config) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(model state, optimizer state) of TP rank `tp_rank` of `tp_size`, from a checkpoint of any TP size."""
    from train.models.convert import merge_tensor_parallel, split_tensor_parallel

    model_files, optim_files = rank_files(ckpt, "model"), rank_files(ckpt, "optim")
    if len(model_files) != len(optim_files):
        raise CheckpointLayoutError(f"{ckpt}: {len(model_files)} model files but {len(optim_files)} optimizer files")
    same_layout = len(model_files) == tp_size
    optims = [_load(f) for f in (optim_files[tp_rank : tp_rank + 1] if same_layout else optim_files)]
    if any(o.get("format") != FORMAT for o in optims):
        raise CheckpointLayoutError(
            f"{ckpt} was written in an older checkpoint format: export it (`geo3k export {ckpt} --out DIR "
            "--dtype float32`) and start a new run from DIR (model.name_or_path=DIR)"
        )
    if same_layout:
        return _load(model_files[tp_rank]), optims[0]

    def reshard(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        full = parts[0] if len(parts) == 1 else merge_tensor_parallel(parts)
        return full if tp_size == 1 else split_tensor_parallel(full, tp_size, hf_config)[tp_rank]

    model = reshard([_load(f) for f in model_files])
    names = optims[0]["params"].keys()
    per_key = {
        k: reshard([{n: o["params"][n][k] for n in names if k in o["params"][n]} for o in optims])
        for k in STATE_KEYS
        if any(k in o["params"][n] for o in optims for n in names)
    }
    params = {n: {k: per_key[k][n] for k in per_key if n in per_key[k]} for n in names}
    return model, {"format": FORMAT, "step": optims[0]["step"], "params": params}
