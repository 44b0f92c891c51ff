"""Test-only helpers to run the engines' models on CPU in one process (tests, not production).

The FSDP engine needs a process group only: a one-process gloo group (`init_cpu_group`). Megatron-Core expects
torch.distributed and its parallel state to exist: that group and
`parallel_state.initialize_model_parallel(1, 1)`, plus what train/distributed.py's `megatron_on_cpu` does for
every CPU training process (CPU buffers for collectives, the no-op RNG tracker, the all-to-all dispatcher's
host-side split sizes).
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_cpu_group() -> None:
    """Idempotent: a world of one process (gloo), without Megatron-Core."""
    if not torch.distributed.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ["MASTER_PORT"] = str(_free_port())
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def init_megatron_cpu() -> None:
    """Idempotent: a world of one process (gloo) with every parallel size 1."""
    from megatron.core import parallel_state

    init_cpu_group()
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=1, pipeline_model_parallel_size=1)
    from train.distributed import megatron_on_cpu

    megatron_on_cpu()  # what train/distributed.py does for every CPU process


CPU_OVERRIDES = dict(use_cpu_initialization=True, perform_initialization=False)
"""TransformerConfig fields for CPU tests: allocate on CPU, skip random init (weights are loaded)."""


@contextlib.contextmanager
def torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def run_ranks(worker, world_size: int, *args, timeout: float):
    """Start `worker(rank, port, *args, queue)` in world_size spawned processes (a free port for their gloo
    group) and return what one of them puts on the queue: its result, or the text of its error."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, *args, queue)) for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        return queue.get(timeout=timeout)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
