"""`geo3k preprocess`: Geo3K rows -> pre-tokenized WebDataset shards (the CPU stage, preprocess/)."""

from __future__ import annotations

import json
import signal
import sys
from typing import Annotated, Optional

import typer

from geo3k.options import ConfigOpt, JsonOpt, RayOpt, SetOpt, load_pipeline_config


def preprocess(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Only these splits (repeatable).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Worker processes (default: all cores).")] = None,
    shards: Annotated[
        Optional[str], typer.Option("--shards", help="Only shard indices START:STOP of each split (split a job across machines).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if shards with other inputs exist.")] = False,
    verify: Annotated[
        bool, typer.Option("--verify", help="Compare every row with the full processor (default: one row in 64).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    ray: RayOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Turn Geo3K rows into pre-tokenized WebDataset shards.

    Examples:

      geo3k preprocess

      geo3k preprocess -c demo_data/pipeline.yaml --workers 2

      geo3k preprocess --shards 0:4    # on one machine; --shards 4:8 on another, same folder

      geo3k preprocess --ray auto      # one Ray task per shard, over the cluster (a folder every node sees)

      geo3k preprocess --set model.name_or_path=qwen2.5-vl-3b --set shards.output_dir=/data/shards --force
    """
    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"preprocess.workers={workers}")
    if verify:
        overrides.append("preprocess.verify=true")
    if split:
        overrides.append(f"source.splits=[{','.join(split)}]")
    cfg, cfg_dir = load_pipeline_config(config, overrides)
    from preprocess.pipeline import run_preprocess  # after the config: its errors come before torch's import

    # SIGTERM as an exception: the run then stops and reaps its workers on the way out, as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

    summaries = run_preprocess(
        cfg, config_dir=cfg_dir, force=force, shard_range=shards, progress=not quiet and not json_out, ray_address=ray
    )
    if json_out:
        print(json.dumps([{**s.__dict__, "out_dir": str(s.out_dir)} for s in summaries], indent=2))
    else:
        for s in summaries:
            print("\n".join(s.lines()))

