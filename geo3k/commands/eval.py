"""`geo3k eval`: score a model on test shards (loss, image gain, greedy answers and their accuracy)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from geo3k.options import ConfigOpt, JsonOpt, NprocOpt, SetOpt, load_pipeline_config, relaunch


def eval_(
    model: Annotated[str, typer.Argument(help="A run folder, a checkpoint (step-N), an exported or any Hugging Face Qwen-VL folder, or a hub id.")],
    shards: Annotated[Path, typer.Option("--shards", help="The test split's shard folder, e.g. data_shards/geo3k/test.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[str, typer.Option("--samples", help="Problems to answer: a count or all.")] = "all",
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest answer (default: train.eval_max_new_tokens).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="JSONL of every answer (default: eval-<model>.jsonl here).")] = None,
    nproc: NprocOpt = 1,
    json_out: JsonOpt = False,
) -> None:
    """Score a model on test shards: per-token loss, image gain, greedy answers and their accuracy.

    Examples:

      geo3k eval Qwen/Qwen3-VL-2B-Instruct --shards data_shards/geo3k/test

      geo3k eval runs/geo3k --shards data_shards/geo3k/test --samples 64 --json

      geo3k eval exported/geo3k-qwen3-vl-2b --shards data_shards/geo3k/test --nproc 2 --set train.tensor_parallel=2
    """
    from shared.config import ConfigError

    if samples != "all" and not (samples.isdigit() and int(samples) > 0):
        raise ConfigError(f"--samples {samples}: give a count > 0 or all")
    overrides = list(set_ or [])
    if max_new_tokens is not None:
        overrides.append(f"train.eval_max_new_tokens={max_new_tokens}")
    cfg, _ = load_pipeline_config(config, overrides)
    relaunch(nproc)
    from train.distributed import destroy
    from train.evaluate import eval_summary, run_eval

    out = out or Path(f"eval-{Path(model.rstrip('/')).name}.jsonl")
    try:
        res = run_eval(cfg, model, shards, samples=None if samples == "all" else int(samples), out_jsonl=out)
    finally:
        destroy()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res, indent=2, default=str) if json_out else eval_summary(res))

