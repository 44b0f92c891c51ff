"""The Megatron engine's checkpoint state, keyed by parameter name, so a run can resume on another layout.

A checkpoint holds, per tensor-parallel rank t, `model_tpTT.pt` (its model state dict, experts excluded) and
`optim_tpTT.pt`:

    {"format": 2, "step": Adam's step count,
     "params": {name: {"exp_avg": T, "exp_avg_sq": T[, "master": T]}}}

and for a MoE model, per TP rank t and expert-parallel rank e, `experts_tpTT_epEE.pt` and
`optim_experts_tpTT_epEE.pt`, the same for the expert weights (the local experts of that EP rank). Each tensor
has the shape of that rank's model parameter `name` (its TP / EP shard, whole over data-parallel ranks);
"master" is the fp32 master weight of a bf16 run (on CPU the model weights are the fp32 weights).

- Another data-parallel size is free: Megatron's distributed optimizer shards each parameter's state over DP
  ranks, and `optimizer_state` gathers those slices into whole tensors (to DP rank 0, which writes them);
  `load_optimizer_state` hands each rank its slice again.
- Another tensor- or expert-parallel size: the model state, and every optimizer-state tensor (same names,
  same shapes), are merged over the saved ranks and split for the new layout with the converter's rules
  (train/models/convert.py, which knows how each weight is split): `resharded`.

The distributed optimizer is read through the attributes megatron-core 0.16.1 keeps per model parameter
(`model_param_group_index_map`, `_get_model_param_range_map`); that version is pinned in pyproject.toml.
"""

from __future__ import annotations

import re
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
            target, shard, fused = p, {k: v for k, v in saved[name].items() if k != "master"}, False
            st = optimizer.state[target]
        else:
            owner = _owner(_distributed_optimizers(optimizer), p)
            if owner is None:
                continue
            opt, target, r = owner
            shard = {k: v.reshape(-1)[r.start : r.end] for k, v in saved[name].items()}
            target.data.copy_(shard.pop("master").to(target.device))
            st = opt.optimizer.state[target]
            fused = any(g.get("fused") for g in opt.optimizer.param_groups)
        for k, v in shard.items():
            if tuple(v.shape) != tuple(target.shape):
                raise CheckpointLayoutError(f"{name}: saved {k} of shape {tuple(v.shape)} != {tuple(target.shape)}")
            st[k] = v.to(device=target.device, dtype=target.dtype).clone()
        # one step tensor per parameter (torch AdamW increments each in place); fused AdamW keeps it on the device
        st["step"] = torch.tensor(step, dtype=torch.float32, device=target.device if distributed and fused else "cpu")


# ---------------------------------------------------------------- files and resharding

_FILE = re.compile(r"^(model|optim|experts|optim_experts)_tp(\d+)(?:_ep(\d+))?\.pt$")


def _grid(ckpt: Path, kind: str) -> dict[tuple[int, int], Path]:
    """{(tp_rank, ep_rank): file} of one kind of rank file in a checkpoint folder."""
    out = {}
    for f in Path(ckpt).glob("*.pt"):
        m = _FILE.match(f.name)
        if m and m.group(1) == kind:
            out[(int(m.group(2)), int(m.group(3) or 0))] = f
    return out


def file_name(kind: str, tp_rank: int, ep_rank: int | None = None) -> str:
    return f"{kind}_tp{tp_rank:02d}" + (f"_ep{ep_rank:02d}" if ep_rank is not None else "") + ".pt"


def _load(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def _layout(grid: dict[tuple[int, int], Path], ckpt: Path, kind: str) -> tuple[int, int]:
    tp = 1 + max(t for t, _ in grid)
    ep = 1 + max(e for _, e in grid)
    if len(grid) != tp * ep:
        raise CheckpointLayoutError(f"{ckpt}: the {kind} files do not form a full tp x ep grid ({sorted(grid)}): the checkpoint is incomplete")
    return tp, ep


def _merge(parts: dict[tuple[int, int], dict[str, torch.Tensor]], tp: int, ep: int) -> dict[str, torch.Tensor]:
    """The grid of (tp, ep) rank states -> the full state: experts concatenated over EP, then TP merged."""
    from train.models.convert import merge_expert_parallel, merge_tensor_parallel

    per_tp = [parts[(t, 0)] if ep == 1 else merge_expert_parallel([parts[(t, e)] for e in range(ep)]) for t in range(tp)]
    return per_tp[0] if tp == 1 else merge_tensor_parallel(per_tp)


def full_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full (TP 1, EP 1) model state of a checkpoint (for export), whatever layout saved it."""
    dense = _grid(ckpt, "model")
    if not dense:
        raise CheckpointLayoutError(f"{ckpt} holds no model_tp*.pt: is it a geo3k Megatron checkpoint?")
    state = _merge({k: _load(f) for k, f in dense.items()}, *_layout(dense, ckpt, "model"))
    experts = _grid(ckpt, "experts")
    if experts:
        state.update(_merge({k: _load(f) for k, f in experts.items()}, *_layout(experts, ckpt, "experts")))
    return state


def _optimizer_parts(grid, ckpt) -> dict[tuple[int, int], dict[str, Any]]:
    parts = {k: _load(f) for k, f in grid.items()}
    if any(o.get("format") != FORMAT for o in parts.values()):
        raise CheckpointLayoutError(
            f"{ckpt} was written in an older checkpoint format: export it (`geo3k export {ckpt} --out DIR "
            "--dtype float32`) and start a new run from DIR (model.name_or_path=DIR)"
        )
    return parts


def resharded(ckpt: Path, hf_config, *, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1) -> tuple[dict[str, torch.Tensor], dict[str, Any], tuple[int, int]]:
    """(model state, optimizer state) of rank (tp_rank, ep_rank) of a (tp_size, ep_size) layout, from a
    checkpoint of any layout, and the (TP, EP) sizes it was saved with. The same layout reads only this rank's
    files; another one merges all of them and splits for this rank (convert.shard_for_rank)."""
    from train.models.convert import shard_for_rank

    model_state: dict[str, torch.Tensor] = {}
    params: dict[str, dict[str, torch.Tensor]] = {}
    step, saved = None, (1, 1)
    for model_kind, optim_kind in (("model", "optim"), ("experts", "optim_experts")):
        model_grid, optim_grid = _grid(ckpt, model_kind), _grid(ckpt, optim_kind)
        if not model_grid:
            if model_kind == "model":
                raise CheckpointLayoutError(f"{ckpt} holds no model_tp*.pt: is it a geo3k Megatron checkpoint?")
            continue
        if sorted(model_grid) != sorted(optim_grid):
            raise CheckpointLayoutError(f"{ckpt}: {model_kind} and {optim_kind} files do not match: the checkpoint is incomplete")
        tp, ep = _layout(model_grid, ckpt, model_kind)
        saved = (tp, max(ep, saved[1]))
        # dense weights are saved once per TP rank (as ep 0): they are the same on every EP rank
        want = (tp_rank, ep_rank if model_kind == "experts" else 0)
        if (tp, ep) == (tp_size, ep_size if model_kind == "experts" else 1):
            model_part = _load(model_grid[want])
            optim = _optimizer_parts({want: optim_grid[want]}, ckpt)[want]
            optim_part = optim["params"]
        else:
            model_part = shard_for_rank(_merge({k: _load(f) for k, f in model_grid.items()}, tp, ep), hf_config,
                                        tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size)
            optims = _optimizer_parts(optim_grid, ckpt)
            optim = next(iter(optims.values()))
            names = optim["params"].keys()
            per_key = {}
            for key in STATE_KEYS:
                if not any(key in o["params"][n] for o in optims.values() for n in names):
                    continue
                full = _merge({k: {n: o["params"][n][key] for n in names} for k, o in optims.items()}, tp, ep)
                per_key[key] = shard_for_rank(full, hf_config, tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size)
            optim_part = {n: {k: per_key[k][n] for k in per_key} for n in names}
        model_state.update(model_part)
        params.update(optim_part)
        step = optim["step"] if step is None else step
    return model_state, {"format": FORMAT, "step": step, "params": params}, saved
