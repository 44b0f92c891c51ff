"""Process groups: the one place that starts torch.distributed and Megatron-Core's parallel state.

`geo3k train` runs as one process per GPU (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK); a plain single
process is a world of one. NCCL on GPUs, gloo on CPU. NVLink multicast stays off (NCCL_NVLS_ENABLE=0):
on shared hosts it can take the GPUs down.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    pp: int
    dp: int
    dp_rank: int
    tp_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1) -> World:
    """Start (or join) the process group and Megatron-Core's model-parallel state."""
    from megatron.core import parallel_state

    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size % (tp * pp):
        raise ValueError(
            f"{world_size} processes cannot hold tensor_parallel={tp} x pipeline_parallel={pp}: "
            "use a process count that is a multiple of their product"
        )
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            # a lone process (not started by torchrun): its own store on a free port. An inherited
            # MASTER_PORT may belong to a parent's process group and is already taken.
            os.environ["MASTER_ADDR"] = "127.0.0.1"
            os.environ["MASTER_PORT"] = str(_free_port())
        dist.init_process_group(
            "nccl" if cuda else "gloo", rank=rank, world_size=world_size, timeout=timedelta(minutes=30),
            device_id=device if cuda else None,
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp=tp,
        pp=pp,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
    )


def destroy() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, group=None) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(t, group=group)
    return t


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
