"""`geo3k inspect`: look inside a shard set (the modes live in geo3k/inspect/)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from geo3k.options import ConfigOpt, JsonOpt, SetOpt, load_pipeline_config


def _training_batching(config: Optional[Path], set_: Optional[list[str]], budget: Optional[int], nproc: int):
    """The DataConfig and data-parallel size training would plan with, from pipeline.yaml and --budget/--nproc."""
    from geo3k.inspect import InspectError
    from train.data.config import DataConfig

    overrides = list(set_ or [])
    if budget is not None:
        if budget < 1:
            raise InspectError(f"--budget {budget}: give a positive number of tokens per GPU micro-batch, e.g. 4096")
        overrides.append(f"train.max_tokens_per_gpu={budget}")
    tc = load_pipeline_config(config, overrides)[0].train
    if nproc < 1 or nproc % tc.tensor_parallel:
        raise InspectError(f"--nproc {nproc}: give a multiple of train.tensor_parallel={tc.tensor_parallel}")
    try:
        data = DataConfig.from_train_config(tc)
    except ValueError as e:  # e.g. a budget that is not a multiple of the tensor-parallel size under SP
        raise InspectError(f"{e} (--budget sets train.max_tokens_per_gpu)") from None
    return data, nproc // tc.tensor_parallel  # data parallelism takes what tensor parallelism leaves


def inspect_(
    path: Annotated[Path, typer.Argument(metavar="DIR", help="A split folder of shards, e.g. data_shards/geo3k/train.", show_default=False)],
    sample: Annotated[
        Optional[str], typer.Option("--sample", help="Show one sample, by key (00000042) or position (42), loss span marked.")
    ] = None,
    save_image: Annotated[
        Optional[Path], typer.Option("--save-image", help="With --sample: write its image, rebuilt from the stored pixels, as PNG.")
    ] = None,
    verify: Annotated[
        bool, typer.Option("--verify", help="Check every shard's sha256 and every record; exit 1 naming each bad one.")
    ] = False,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG histogram of token lengths, budget marked.")] = None,
    budget: Annotated[
        Optional[int],
        typer.Option("--budget", help="Tokens per GPU micro-batch for the batching plan and plot (default: train.max_tokens_per_gpu)."),
    ] = None,
    nproc: Annotated[
        int, typer.Option("--nproc", help="GPUs training would run on: the batching plan splits each global batch over their data-parallel ranks.")
    ] = 1,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    processor: Annotated[
        Optional[str], typer.Option("--processor", help="Decode with this preset or model folder instead of the manifest's.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Look inside a shard set: summary, one sample, integrity check, length histogram.

    The summary's batching is the plan training makes of the set (the train settings of pipeline.yaml,
    -c or --set: global batch, seed, patch cap), at --budget tokens per GPU on --nproc GPUs.

    Examples:

      geo3k inspect data_shards/geo3k/train

      geo3k inspect data_shards/geo3k/train --sample 0 --save-image diagram.png

      geo3k inspect data_shards/geo3k/train --verify

      geo3k inspect data_shards/geo3k/train --budget 8192 --nproc 8 --set train.global_batch_size=256

      geo3k inspect data_shards/geo3k/train --plot lengths.png --json
    """
    from geo3k import inspect as inspection

    batching, dp_size = None, 1
    if (sample is None and not verify) or plot is not None:  # only the summary and the plot read the train settings
        batching, dp_size = _training_batching(config, set_, budget, nproc)

    progress = None
    if verify and sys.stderr.isatty():  # one self-overwriting line, cleared once the check is done

        def progress(name: str) -> None:
            print(f"\rverifying {name} …\x1b[K", end="", file=sys.stderr, flush=True)

    result = inspection.run(
        path,
        sample=sample,
        save_image=save_image,
        verify_=verify,
        plot=plot,
        batching=batching,
        dp_size=dp_size,
        processor=processor,
        color=not json_out and inspection.use_color(sys.stdout),
        progress=progress,
    )
    if progress:
        print("\r\x1b[K", end="", file=sys.stderr, flush=True)
    for w in result.warnings:
        print(f"warning: {w}", file=sys.stderr)
    print(json.dumps(result.data, indent=2, ensure_ascii=False) if json_out else result.text)
    if not result.ok:
        raise typer.Exit(1)
