"""`geo3k train --ray ADDRESS --nproc N [--nodes M]`: the training processes as Ray actors, placed on a cluster.

    driver: load config, check layout -> placement group (M bundles of N GPUs, one per node) -> N x M actors
            -> each: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT -> train.trainer.run_training(cfg)

Why a placement group of plain actors and not Ray Train's TorchTrainer: each actor does exactly what a torchrun
process does (the same environment variables, then the same entry point, `run_training` with the config loaded
on the driver), so train/distributed.py starts the process group as it always does and the config, checkpoints,
resume and export are untouched. TorchTrainer starts the process group itself and brings a run folder,
checkpoint storage and result reporting of its own, all of which geo3k's Trainer already does, and it needs
`ray[train]` (pandas, pyarrow, fsspec, pydantic, tensorboardX) where core Ray is enough.

- Placement: one bundle per node (STRICT_SPREAD), each of N GPUs (or N CPUs where the cluster has no GPU:
  gloo, as on a CPU machine), so ranks node*N .. node*N+N-1 share a node, as under torchrun, and tensor
  parallelism stays inside one. Ray gives each actor one GPU; the actors of a node then all see the node's N
  GPUs (CUDA_VISIBLE_DEVICES) and LOCAL_RANK is the position of their own among them.
- Output: rank 0's stdout and stderr come back to the driver's as they are written; the other ranks' output
  stays in Ray's log folder of their node (`/tmp/ray/session_latest/logs`).
- Failure: the first rank that fails (an exception, or its process or node dying) ends the run: every actor is
  killed (none waits in a collective for a peer that is gone) and the driver prints one `error:` line naming
  the rank, its node and what it raised, exit code 2 (GEO3K_DEBUG=1 adds the remote traceback). Nothing is
  retried: `geo3k train --resume` continues from the last checkpoint.
- train.output_dir, the shards and a local model folder must be the same paths on every node.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
from typing import Any

from shared.config import PipelineConfig
from shared.ray_cluster import ClusterError, connected, enter_driver_dir

PLACEMENT_TIMEOUT_S = 120.0
POLL_S = 0.5


class _Captured:
    """A text stream that keeps what is written for the driver to collect (rank 0's sys.stdout / sys.stderr)."""

    def __init__(self, name: str, chunks: list[tuple[str, str]], lock: threading.Lock, original: Any):
        self.name, self._chunks, self._lock, self._original = name, chunks, lock, original
        self.encoding = "utf-8"

    def write(self, text: str) -> int:
        with self._lock:
            self._chunks.append((self.name, text))
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:  # C-level writers (faulthandler) go to the node's log file
        return self._original.fileno()


class TrainProcess:
    """One training process: one GPU, or one CPU process (gloo) on a cluster without GPUs."""

    def __init__(self, cwd: str):
        enter_driver_dir(cwd)
        self._chunks: list[tuple[str, str]] = []
        self._lock = threading.Lock()

    def where(self) -> tuple[str, list[str]]:
        """This process's node address and the GPU ids Ray gave it."""
        import ray

        return ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def run(self, env: dict[str, str], cfg: PipelineConfig, options: dict[str, Any], capture: bool) -> dict[str, Any]:
        os.environ.update(env)  # before torch touches CUDA: CUDA_VISIBLE_DEVICES is read then
        if capture:
            sys.stdout = _Captured("stdout", self._chunks, self._lock, sys.stdout)
            sys.stderr = _Captured("stderr", self._chunks, self._lock, sys.stderr)
        from train.trainer import run_training

        try:
            return run_training(cfg, **options)
        finally:
            sys.stdout.flush()
            sys.stderr.flush()

    def drain(self) -> list[tuple[str, str]]:
        """What rank 0 wrote since the last call."""
        with self._lock:
            out, self._chunks[:] = list(self._chunks), []
        return out


def train_on_ray(address: str, nproc: int, nodes: int, cfg: PipelineConfig, **options: Any) -> dict[str, Any]:
    """Run `run_training(cfg, **options)` as nproc x nodes processes on the cluster; rank 0's result."""
    if nproc < 1 or nodes < 1:
        raise ClusterError(f"--nproc {nproc} --nodes {nodes}: both must be >= 1")
    with connected(address) as ray:
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpu = ray.cluster_resources().get("GPU", 0) >= 1
        unit = "GPU" if gpu else "CPU"
        bundle = {"CPU": nproc, "GPU": nproc} if gpu else {"CPU": nproc}
        pg = placement_group([bundle] * nodes, strategy="STRICT_SPREAD")
        actors: list[Any] = []
        try:
            fitting = [n for n in ray.nodes() if n.get("Alive") and n.get("Resources", {}).get(unit, 0) >= nproc]
            if len(fitting) < nodes:  # an autoscaler may still add nodes: wait, but say what for
                print(f"waiting up to {PLACEMENT_TIMEOUT_S:.0f} s for {nodes} node(s) with {nproc} {unit}s each "
                      f"(the cluster has {len(fitting)} now)", file=sys.stderr, flush=True)
            try:
                ray.get(pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
            except ray.exceptions.GetTimeoutError:
                have = {k: v for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
                raise ClusterError(
                    f"the Ray cluster cannot place {nodes} node(s) x {nproc} {unit}s within {PLACEMENT_TIMEOUT_S:.0f} s "
                    f"(it has {len(ray.nodes())} node(s), {have}): add nodes or ask for fewer with --nproc / --nodes"
                ) from None
            actor_cls = ray.remote(TrainProcess)
            cwd = os.getcwd()
            for node in range(nodes):
                for _ in range(nproc):
                    strategy = PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=node)
                    # two threads: `run` trains while `drain` hands rank 0's output to the driver
                    opts = dict(num_cpus=1, num_gpus=1 if gpu else 0, max_concurrency=2, max_restarts=0, scheduling_strategy=strategy)
                    actors.append((node, actor_cls.options(**opts).remote(cwd)))
            places = ray.get([a.where.remote() for _, a in actors])
            ranked, envs = _assign_ranks(actors, places, nproc, nodes)
            port = ray.get(ranked[0].free_port.remote())
            for env in envs:
                env.update(MASTER_ADDR=envs[0]["_NODE_IP"], MASTER_PORT=str(port))
            runs = {
                a.run.remote({k: v for k, v in env.items() if not k.startswith("_")}, cfg, options, rank == 0): rank
                for rank, (a, env) in enumerate(zip(ranked, envs))
            }
            return _wait(ray, runs, ranked, envs)
        finally:
            for _, a in actors:
                ray.kill(a)
            remove_placement_group(pg)


def _assign_ranks(actors: list[tuple[int, Any]], places: list[tuple[str, list[str]]], nproc: int, nodes: int):
    """Ranks in node order (bundle = node), then by GPU id; each actor's torchrun-style environment."""
    order = sorted(range(len(actors)), key=lambda i: (actors[i][0], [int(g) for g in places[i][1]], i))
    world = nproc * nodes
    ranked, envs = [], []
    for rank, i in enumerate(order):
        node, actor = actors[i]
        ip, gpus = places[i]
        env = {
            "RANK": str(rank),
            "WORLD_SIZE": str(world),
            "LOCAL_RANK": str(rank % nproc),
            "LOCAL_WORLD_SIZE": str(nproc),
            "GROUP_RANK": str(node),
            "_NODE_IP": ip,
        }
        if gpus:
            node_gpus = sorted({g for j in order if actors[j][0] == node for g in places[j][1]}, key=int)
            env["CUDA_VISIBLE_DEVICES"] = ",".join(node_gpus)
            env["LOCAL_RANK"] = str(node_gpus.index(gpus[0]))
        ranked.append(actor)
        envs.append(env)
    return ranked, envs


def _forward(chunks: list[tuple[str, str]]) -> None:
    for stream, text in chunks:
        (sys.stdout if stream == "stdout" else sys.stderr).write(text)
    sys.stdout.flush()
    sys.stderr.flush()


def _drain(ray: Any, rank0: Any) -> None:
    try:
        _forward(ray.get(rank0.drain.remote(), timeout=30))
    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
        pass  # rank 0 is gone (its failure is reported) or busy: what it wrote comes with the next call


def _wait(ray: Any, runs: dict[Any, int], ranked: list[Any], envs: list[dict[str, str]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    world = len(ranked)
    while runs:
        done, _ = ray.wait(list(runs), num_returns=1, timeout=POLL_S)
        _drain(ray, ranked[0])
        for ref in done:
            rank = runs.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayError as e:
                _drain(ray, ranked[0])
                where = envs[rank]["_NODE_IP"]
                raise ClusterError(f"rank {rank} of {world} (node {where}) failed: {_reason(ray, e)}") from e
            if rank == 0:
                result = value
    return result


def _reason(ray: Any, e: Exception) -> str:
    from shared.errors import UserError

    if isinstance(e, ray.exceptions.RayTaskError) and isinstance(e.cause, BaseException):
        cause = e.cause
        if isinstance(cause, UserError):
            return str(cause)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else ""
        return f"{type(cause).__name__}: {first} (GEO3K_DEBUG=1 shows its traceback)"
    return f"its process died ({type(e).__name__}); its log is in Ray's log folder on that node"
