"""Joining a Ray cluster for `geo3k preprocess --ray` and `geo3k train --ray`.

Ray is the optional extra `geo3k[ray]`: this module and the two launchers that use it
(preprocess/ray_shards.py, train/ray_launch.py) are imported only when `--ray` is given, and only they import Ray.

What a cluster must provide: the same geo3k install on every node (the same versions: shards are byte-identical
only when made with the same processor and libraries), and the same paths for the data and the outputs (a
shared filesystem). Ray starts tasks and actors in folders of its own, so each one first changes into the
driver's working directory where that exists on its node: relative paths in pipeline.yaml then mean what they
mean where the command was typed. The driver's geo3k, Hugging Face, NCCL and torch settings (GEO3K_*, HF_*,
NCCL_*, TORCH_* environment variables, tokens excepted) reach every task; the rest of the environment is the
node's own.
"""

from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from typing import Any, Iterator

from shared.errors import UserError

FORWARDED_PREFIXES = ("GEO3K_", "HF_", "NCCL_", "TORCH_")
CONNECT_TIMEOUT_S = 10.0


class ClusterError(UserError, RuntimeError):
    pass


def forwarded_env() -> dict[str, str]:
    """The driver's environment variables that every task and actor gets (credentials stay on the driver)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_PREFIXES) and "TOKEN" not in k}


def enter_driver_dir(cwd: str) -> None:
    """In a task or actor: work in the driver's folder when this node has it (see the module docstring)."""
    if os.path.isdir(cwd):
        os.chdir(cwd)


def _check_reachable(address: str) -> None:
    """Fail in seconds on a HOST:PORT where no cluster listens (ray.init retries such an address for minutes)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local", ray://…: Ray resolves those itself
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT_S).close()
    except OSError as e:
        raise ClusterError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): give the head's HOST:PORT as `ray start --head` "
            "printed it, or --ray auto on a node of the cluster"
        ) from None


@contextmanager
def connected(address: str) -> Iterator[Any]:
    """Join the cluster at `address` (HOST:PORT of its head, or auto: the one this node belongs to, or RAY_ADDRESS)
    and yield the `ray` module; leave it on exit. A process already connected (a test, a notebook) stays so."""
    try:
        import ray
    except ImportError:
        raise ClusterError("--ray needs Ray here and on every node: pip install 'geo3k[ray]'") from None
    if ray.is_initialized():
        yield ray
        return
    _check_reachable(address)
    try:
        # the driver prints what a local run prints: Ray's own start-up lines and the workers' logs stay in the
        # cluster's log folders (the launchers bring back what matters: results, errors, rank 0's output)
        ray.init(
            address=address, log_to_driver=False, logging_level=logging.WARNING, runtime_env={"env_vars": forwarded_env()}
        )
    except ConnectionError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClusterError(
            f"no Ray cluster at {address!r} ({first}): start one with `ray start --head` (see the README) or give its head's HOST:PORT"
        ) from None
    try:
        yield ray
    finally:
        ray.shutdown()
