"""Options several commands take, declared once so their help reads the same everywhere, and what they do."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="pipeline.yaml to read (default: ./pipeline.yaml if present).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any config field: --set preprocess.workers=4 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]
NprocOpt = Annotated[int, typer.Option("--nproc", help="Processes (GPUs) on this node; >1 relaunches under torchrun.")]
RayOpt = Annotated[
    Optional[str],
    typer.Option("--ray", metavar="ADDRESS", help="Run on a Ray cluster: its head's HOST:PORT, or auto (the cluster of this node). Needs geo3k[ray]."),
]


def load_pipeline_config(path: Optional[Path], overrides: Optional[list[str]]):
    """(config, the folder its relative paths are read from): --config, else ./pipeline.yaml, else the defaults."""
    from shared.config import load_config

    if path is None and Path("pipeline.yaml").exists():
        path = Path("pipeline.yaml")
    return load_config(path, overrides or []), (path.resolve().parent if path else None)


def relaunch(nproc: int) -> None:
    """With --nproc > 1 in a lone process: run this same command again under torchrun (does not return)."""
    if nproc > 1 and "RANK" not in os.environ:
        from train.trainer import launch_with_torchrun

        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv:  # "--nproc N" as two words
            i = sys.argv.index("--nproc")
            argv = sys.argv[1:i] + sys.argv[i + 2 :]
        launch_with_torchrun(nproc, argv)
