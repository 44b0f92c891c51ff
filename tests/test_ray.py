"""`--ray`: preprocessing and training on a Ray cluster give what the local runs give.

The cluster is a one-node Ray started by this file (2 CPUs, a 100 MB object store, no dashboard, a token of its
own), and the commands join it through the CLI with `--ray HOST:PORT`, as they join a real one:

- `geo3k preprocess --ray` runs the shards as Ray tasks and writes the folders a local run of the same config
  writes (conftest's `demo_shards`), file for file, byte for byte (shards, index, rejects, manifest), with the
  local run's closing summary;
- `geo3k train --ray --nproc 2` (two CPU processes, gloo) takes the step losses of `geo3k train --nproc 2`
  (torchrun) from the same start checkpoint, with rank 0's step lines on the driver's stdout;
- a run whose ranks fail (no shards where train.shards points) ends with exit code 2 and one `error:` line
  naming the rank.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest
import yaml

from shared.manifest import sha256_file
from tests.conftest import REPO, from_checkpoint_args, geo3k, train_losses

ray = pytest.importorskip("ray", reason="Ray is the optional extra geo3k[ray] (scripts/setup.sh installs it for the tests)")

STEPS = 2


@pytest.fixture(scope="module")
def ray_logs() -> Iterator[Path]:
    """The cluster's folder (its session logs are under it)."""
    temp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    yield temp
    shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster(ray_logs):
    """The head's HOST:PORT of a Ray cluster running in this process (stopped at the end of the file)."""
    with pytest.MonkeyPatch.context() as env:
        # Ray's token authentication (its default for a new cluster) with a token of the test's own, so nothing
        # is written under ~/.ray; ray.init sets RAY_AUTH_MODE=token, which the CLI's processes inherit
        env.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
        env.setenv("RAY_AUTH_MODE", "")  # recorded as unset before, so leaving the context removes Ray's value too
        env.delenv("RAY_AUTH_MODE")
        ctx = ray.init(
            address="local", num_cpus=2, object_store_memory=100 * 2**20, include_dashboard=False, _temp_dir=str(ray_logs),
            log_to_driver=False, logging_level=logging.WARNING,
        )
        try:
            yield ctx.address_info["gcs_address"]
        finally:
            ray.shutdown()


def _folder_hashes(split_dir: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(split_dir.iterdir()) if p.is_file() and not p.name.startswith(".")}


def test_preprocess_over_ray_writes_the_shards_of_a_local_run(cluster, ray_logs, demo_data, demo_shards, tmp_path):
    """Against conftest's `demo_shards`, made by a local run (one worker) of the same config."""
    config = tmp_path / "pipeline.yaml"
    files = {"train": str(demo_data / "train.parquet"), "test": str(demo_data / "test.parquet")}
    config.write_text(yaml.safe_dump({
        "source": {"files": files, "splits": ["train", "test"]},
        "preprocess": {"workers": 1, "fetch": {"cache_dir": None}},
        "shards": {"output_dir": str(tmp_path / "out"), "samples_per_shard": 8},
    }))
    proc = geo3k("preprocess", "-c", str(config), "-q", "--ray", cluster, cwd=tmp_path)
    # the shards were Ray tasks (Ray's worker logs name the task each process ran)
    assert any("shard_task" in log.read_text() for log in ray_logs.glob("session_*/logs/worker-*.out"))
    for split in ("train", "test"):
        local, over_ray = _folder_hashes(demo_shards / split), _folder_hashes(tmp_path / "out" / "geo3k" / split)
        assert "manifest.json" in local and over_ray == local, split
    # the closing summary of a local run
    assert "rows read 48 = written 48 + rejected 0" in proc.stdout and "shards 6 (6 this run)" in proc.stdout, proc.stdout
    assert "rows read 12 = written 12 + rejected 0" in proc.stdout, proc.stdout


@pytest.fixture(scope="module")
def runs(cluster, demo_shards, tiny_checkpoint, tmp_path_factory) -> dict[str, tuple[Path, str]]:
    root = tmp_path_factory.mktemp("ray-train")
    out = {}
    for name, extra in {"torchrun": [], "ray": ["--ray", cluster]}.items():
        args = from_checkpoint_args(
            demo_shards, tiny_checkpoint, root / name, STEPS, "--nproc", "2", "--set", "train.eval_interval=0", *extra
        )
        out[name] = (root / name, geo3k(*args, cwd=root, threads=1).stdout)
    return out


def test_train_over_ray_takes_the_steps_of_torchrun(runs):
    (ref_run, _), (run, stdout) = runs["torchrun"], runs["ray"]
    ref, got = train_losses(ref_run), train_losses(run)
    # the same processes doing the same work (one thread each, gloo): equal to the last bit
    assert sorted(got) == list(range(1, STEPS + 1)) and got == ref, (got, ref)
    # rank 0's log reached the driver, as under torchrun
    assert f"step {STEPS}/{STEPS}" in stdout and "saved " in stdout, stdout[-2000:]
    assert (run / "checkpoints" / f"step-{STEPS:07d}").is_dir()


def test_a_failing_rank_ends_the_run_with_one_error_line(cluster, demo_shards, tiny_checkpoint, tmp_path):
    args = from_checkpoint_args(demo_shards, tiny_checkpoint, tmp_path / "run", STEPS, "--nproc", "2", "--ray", cluster,
                                "--set", f"train.shards={tmp_path / 'missing'}", "--set", "train.eval_interval=0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "geo3k", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: rank ") and "missing" in errors[0], proc.stderr[-3000:]


def test_ranks_follow_nodes_then_gpus():
    """Two nodes of 2 GPUs, the actors in the order Ray happened to start them: ranks in node order, then GPU id;
    every process of a node sees both its GPUs, LOCAL_RANK its own among them."""
    from train.ray_launch import _assign_ranks

    actors = [(1, "d"), (0, "b"), (1, "c"), (0, "a")]
    places = [("10.0.0.2", ["7"]), ("10.0.0.1", ["3"]), ("10.0.0.2", ["6"]), ("10.0.0.1", ["2"])]
    ranked, envs = _assign_ranks(actors, places, nproc=2, nodes=2)
    assert ranked == ["a", "b", "c", "d"]
    assert [(e["RANK"], e["LOCAL_RANK"], e["GROUP_RANK"], e["CUDA_VISIBLE_DEVICES"]) for e in envs] == [
        ("0", "0", "0", "2,3"), ("1", "1", "0", "2,3"), ("2", "0", "1", "6,7"), ("3", "1", "1", "6,7"),
    ]
    assert {e["WORLD_SIZE"] for e in envs} == {"4"} and envs[0]["_NODE_IP"] == "10.0.0.1"
