"""Process groups: the one place that starts torch.distributed and (for the Megatron backend) Megatron-Core's
parallel state. The FSDP backend needs no Megatron-Core: its world is one data-parallel group of all processes.

`geo3k train` runs as one process per GPU (torchrun sets RANK/WORLD_SIZE/LOCAL_RANK); a plain single
process is a world of one. NCCL on GPUs, gloo on CPU. NVLink multicast stays off (NCCL_NVLS_ENABLE=0):
on shared hosts it can take the GPUs down.

Megatron-Core on CPU (CI, laptops): its tensor-parallel collectives are plain torch.distributed calls that
gloo runs, but they allocate their output buffers on `torch.cuda.current_device()`; sequence parallelism
forks the CUDA RNG tracker around every block (and recomputation saves the CUDA RNG state); the MoE all-to-all
token dispatcher copies its split sizes to the host on a side CUDA stream. `megatron_on_cpu` points the first at
the CPU, installs Megatron's own no-op tracker (the layers draw no random numbers: dropout is 0), skips the CUDA
RNG state and gives the dispatcher a host-only version of that copy, so TP, SP and EP run on CPU processes as on GPUs: that is how the parallel layouts are proven in CI
(tests/test_parallel_layouts.py, tests/test_train_moe.py).
"""

from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    tp: int
    dp: int
    dp_rank: int
    tp_rank: int
    ep: int = 1
    ep_rank: int = 0
    dp_group: Any = None
    """The data-parallel process group (the ranks that split the batch) for eval's and the logs' reductions;
    None: the default group, every process a data-parallel rank."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def megatron_on_cpu() -> None:
    """Let Megatron-Core's collectives, sequence-parallel blocks and MoE dispatcher run without CUDA."""
    if torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mp_random
    from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

    # Megatron calls this only to place the buffers of all-gathers, reduce-scatters and all-to-alls (and CUDA
    # initialisation, which use_cpu_initialization skips); without a GPU those buffers belong on the CPU.
    torch.cuda.current_device = lambda: torch.device("cpu")
    # The inference tracker's fork() is a no-op: nothing inside the layers is random (dropout 0). Activation
    # recomputation saves and restores the RNG states around each checkpointed layer: there is no CUDA
    # generator to save (the CPU one still is).
    mp_random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
    mp_random._get_cuda_rng_state = lambda *args, **kwargs: None
    mp_random._set_cuda_rng_state = lambda *args, **kwargs: None
    # Set, the class's side stream is not created; the split sizes are on the host already.
    MoEAlltoAllTokenDispatcher.cuda_dtoh_stream = "host"
    MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize = _host_split_sizes


def _host_split_sizes(dispatcher, point: str, tokens_per_expert=None):
    """MoEAlltoAllTokenDispatcher._maybe_dtoh_and_synchronize without CUDA: at the copy point, the split sizes
    become the NumPy arrays the all-to-all takes (on GPUs they arrive that way from the side-stream copy)."""
    if not dispatcher.drop_and_pad and point == dispatcher.cuda_dtoh_point:
        for name in ("input_splits", "output_splits", "output_splits_tp"):
            value = getattr(dispatcher, name)
            if torch.is_tensor(value):
                setattr(dispatcher, name, value.numpy())
    return tokens_per_expert


def init_distributed(tp: int = 1, pp: int = 1, ep: int = 1, *, megatron: bool = True) -> World:
    """Start (or join) the process group and, with `megatron`, Megatron-Core's model-parallel state.

    tp x pp ranks hold one model replica; experts are split over ep ranks, which Megatron carves out of the
    data-parallel ranks (so ep divides world_size / (tp x pp)). Without `megatron` (the FSDP backend) every
    process is a data-parallel rank and Megatron-Core is not imported."""
    assert megatron or tp * pp * ep == 1, "model parallelism is the Megatron backend's (check_layout refuses it)"
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size % (tp * pp) or (world_size // (tp * pp)) % ep:
        raise ValueError(
            f"{world_size} processes cannot hold train.tensor_parallel={tp} with train.expert_parallel={ep}: "
            f"use a process count that is a multiple of {tp * pp * ep}"
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
    if not megatron:
        return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, tp=1, dp=world_size,
                     dp_rank=rank, tp_rank=0)
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, expert_model_parallel_size=ep
        )
    megatron_on_cpu()
    return World(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=device,
        tp=tp,
        dp=parallel_state.get_data_parallel_world_size(),
        dp_rank=parallel_state.get_data_parallel_rank(),
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        ep=ep,
        ep_rank=parallel_state.get_expert_model_parallel_rank(),
        dp_group=parallel_state.get_data_parallel_group(),
    )


def destroy() -> None:
    # Megatron's parallel state only where this process imported it (an FSDP run never does)
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None and parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
