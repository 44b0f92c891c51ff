"""`geo3k preprocess --ray ADDRESS`: one Ray task per shard, each running the local workers' `process_shard`.

    driver: read source -> plan shards -> [Ray tasks, anywhere in the cluster: process_shard] -> manifest

Only the pool of local worker processes is replaced: the plan, the claims on `.parts/NNNNNN.lock`, the part
files and the manifest are preprocess/pipeline.py's, so a run over Ray writes the shards, counts and manifest a
local run writes, byte for byte, and can share a folder with local runs and `--shards` ranges. The driver (where
the command runs) reads the source and hands each task its rows; the tasks write straight into the split
folder, which must be the same path on every node (a shared filesystem with flock, as for `--shards`).

- One CPU per task, like a local worker: the cluster runs as many shards at once as it has CPUs free
  (`preprocess.workers` does not apply). A worker process keeps its processor from one task to the next.
- A task whose process or node dies (the OOM killer, a preempted machine) runs again, up to MAX_RETRIES times:
  a shard is written whole or not at all (its tar appears by rename, its part file after it), so a retry starts
  clean. An exception inside a shard is not retried, since the same rows and code raise it again: it ends the
  run as a local worker's does, and the finished shards are kept for the next run.
- On an error or Ctrl-C the tasks still queued or running are cancelled (their processes killed), so none
  keeps writing into the folder.
"""

from __future__ import annotations

import dataclasses
import os
from contextlib import contextmanager
from typing import Any, Iterator

from preprocess import pipeline
from preprocess.pipeline import MapTasks, PreprocessError, ShardTask
from shared.config import PipelineConfig
from shared.ray_cluster import connected, enter_driver_dir

MAX_RETRIES = 3


def shard_task(cfg: PipelineConfig, task: ShardTask, cwd: str) -> dict[str, Any]:
    """One shard, in a Ray worker process: what a local worker runs, after the same start-up."""
    enter_driver_dir(cwd)
    if pipeline._WORKER.get("cfg") != cfg:  # the first shard of this process (or of another run's config)
        pipeline._init_worker(cfg)
    return pipeline.process_shard(task)


@contextmanager
def ray_map_tasks(address: str) -> Iterator[MapTasks]:
    """Join the cluster at `address` for the whole run and yield pipeline.py's executor for it."""
    with connected(address) as ray:
        remote = ray.remote(num_cpus=1, max_retries=MAX_RETRIES, retry_exceptions=False)(shard_task)

        def map_tasks(cfg: PipelineConfig, tasks: list[ShardTask]) -> Iterator[dict[str, Any]]:
            cwd = os.getcwd()
            cfg_ref = ray.put(cfg)  # once, not once per task
            # absolute folders: a node without the driver's working directory still finds them
            tasks = [dataclasses.replace(t, out_dir=os.path.abspath(t.out_dir), base_dir=os.path.abspath(t.base_dir)) for t in tasks]
            pending = {remote.remote(cfg_ref, t, cwd): t.index for t in tasks}
            try:
                while pending:
                    (ref,), _ = ray.wait(list(pending), num_returns=1)
                    index = pending.pop(ref)
                    yield _result(ray, ref, index)
            finally:
                for ref in pending:
                    ray.cancel(ref, force=True)

        yield map_tasks


def _result(ray: Any, ref: Any, index: int) -> dict[str, Any]:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as e:
        # what the shard raised, as a local worker's exception reaches the driver: a user's error stays one line
        # (a full disk, a read-only folder); a bug keeps the remote traceback in its chain
        if isinstance(e.cause, Exception):
            raise e.cause from e
        raise
    except ray.exceptions.RayError as e:  # the process or node died more often than it may be retried
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise PreprocessError(
            f"shard {index} failed on the Ray cluster ({type(e).__name__}: {detail}) after {MAX_RETRIES} retries: "
            "rerun the command; finished shards are kept"
        ) from e
