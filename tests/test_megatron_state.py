"""The GPU path of train/megatron_state.py, on CPU: Megatron's distributed optimizer holds each parameter's Adam
state as slices spread over the data-parallel ranks; saving gathers whole tensors by name, loading hands every
rank its slice back, on any number of ranks.

Megatron's DistributedOptimizer needs CUDA, so a stand-in with the attributes the module reads
(`model_param_group_index_map`, `_get_model_param_range_map`, the torch `optimizer` over the flat slices) runs in
two gloo processes; the slices are uneven (one parameter lies wholly on one rank), as Megatron's buckets make them.
"""

from __future__ import annotations

import io
import os
import socket
from types import SimpleNamespace

import torch

SHAPES = {"a.weight": (4, 6), "b.weight": (5,), "c.bias": (3, 2)}
# [start, end) of each parameter's flat elements held by rank 0; rank 1 holds the rest
SPLIT = {"a.weight": 10, "b.weight": 5, "c.bias": 0}


class StandIn:
    def __init__(self, named_params, rank: int):
        self.model_param_group_index_map, self.ranges, mains = {}, {}, []
        for name, p in named_params:
            cut = SPLIT[name]
            start, end = (0, cut) if rank == 0 else (cut, p.numel())
            if start == end:
                continue  # no slice on this rank: Megatron leaves the parameter out of its maps
            self.model_param_group_index_map[p] = (0, len(mains))
            self.ranges[p] = SimpleNamespace(start=start, end=end)
            mains.append(torch.nn.Parameter(p.detach().reshape(-1)[start:end].clone()))
        self.optimizer = torch.optim.AdamW(mains, lr=1e-2)

    def _get_model_param_range_map(self, param):
        return {"param": self.ranges[param]}


def _params(seed: int):
    g = torch.Generator().manual_seed(seed)
    return [(n, torch.nn.Parameter(torch.randn(s, generator=g))) for n, s in SHAPES.items()]


def _worker(rank: int, port: int, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
        from megatron.core import parallel_state

        from train.megatron_state import load_optimizer_state, optimizer_state

        parallel_state.initialize_model_parallel(1, 1)
        named = _params(0)
        opt = StandIn(named, rank)
        g = torch.Generator().manual_seed(10 + rank)
        for _ in range(3):
            for main in opt.optimizer.param_groups[0]["params"]:
                main.grad = torch.randn(main.shape, generator=g)
            opt.optimizer.step()
        state = optimizer_state(opt, named, distributed=True)
        mine = {p: (opt.ranges[p], opt.optimizer.state[opt.optimizer.param_groups[0]["params"][i]])
                for p, (_, i) in opt.model_param_group_index_map.items()}
        slices = {n: {"range": (mine[p][0].start, mine[p][0].end), "exp_avg": mine[p][1]["exp_avg"].clone(),
                      "master": opt.optimizer.param_groups[0]["params"][opt.model_param_group_index_map[p][1]].detach().clone()}
                  for n, p in named if p in mine}
        # load the gathered state into a fresh optimizer (rank 0's complete copy, as the checkpoint file holds it)
        box = [state if rank == 0 else None]
        torch.distributed.broadcast_object_list(box, src=0)
        named2 = _params(1)
        fresh = StandIn(named2, rank)
        load_optimizer_state(fresh, named2, box[0], distributed=True)
        loaded = {}
        for n, p in named2:
            if p in fresh.model_param_group_index_map:
                main = fresh.optimizer.param_groups[0]["params"][fresh.model_param_group_index_map[p][1]]
                st = fresh.optimizer.state[main]
                loaded[n] = {"exp_avg": st["exp_avg"].clone(), "master": main.detach().clone(), "step": float(st["step"])}
        buf = io.BytesIO()  # as bytes: tensors sent through the queue would live in this (ending) process
        torch.save((rank, state if rank == 0 else None, slices, loaded), buf)
        queue.put(buf.getvalue())
        torch.distributed.destroy_process_group()
    except Exception as e:  # surface the worker's error in the test
        buf = io.BytesIO()
        torch.save((rank, f"{type(e).__name__}: {e}", None, None), buf)
        queue.put(buf.getvalue())
        raise


def test_distributed_optimizer_state_gathers_by_name_and_scatters_back():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        got = [torch.load(io.BytesIO(queue.get(timeout=120)), weights_only=False) for _ in range(2)]
        results = {r: rest for r, *rest in got}
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    state, _, _ = results[0]
    assert isinstance(state, dict), state
    assert state["format"] == 2 and state["step"] == 3
    for name, shape in SHAPES.items():
        saved = state["params"][name]
        assert tuple(saved["exp_avg"].shape) == shape and tuple(saved["master"].shape) == shape
        for rank in (0, 1):
            _, slices, loaded = results[rank]
            if name not in slices:
                assert name not in loaded
                continue
            start, end = slices[name]["range"]
            # the whole tensor holds each rank's slice where that rank keeps it ...
            assert torch.equal(saved["exp_avg"].reshape(-1)[start:end], slices[name]["exp_avg"])
            assert torch.equal(saved["master"].reshape(-1)[start:end], slices[name]["master"])
            # ... and loading gives each rank that slice back, with its own Adam step count
            assert torch.equal(loaded[name]["exp_avg"], slices[name]["exp_avg"])
            assert torch.equal(loaded[name]["master"], slices[name]["master"])
            assert loaded[name]["step"] == 3.0
