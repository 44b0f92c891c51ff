"""The `geo3k` command: this file only wires subcommands; each job lives in its stage's package.

Errors that a user can fix print one line saying how, without a traceback; set GEO3K_DEBUG=1 for one.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_show_locals=False,
    help="Fine-tune Qwen vision-language models on Geo3K: preprocess once into shards, train many times.",
)

ConfigOpt = Annotated[
    Optional[Path], typer.Option("--config", "-c", help="pipeline.yaml to read (default: ./pipeline.yaml if present).")
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", "-s", help="Override any config field: --set preprocess.workers=4 (repeatable)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of text.")]


def _config(path: Optional[Path], overrides: Optional[list[str]]):
    from shared.config import load_config

    if path is None and Path("pipeline.yaml").exists():
        path = Path("pipeline.yaml")
    return load_config(path, overrides or []), (path.resolve().parent if path else None)


@app.command()
def preprocess(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    split: Annotated[Optional[list[str]], typer.Option("--split", help="Only these splits (repeatable).")] = None,
    workers: Annotated[Optional[int], typer.Option("--workers", "-j", help="Worker processes (default: all cores).")] = None,
    shards: Annotated[
        Optional[str], typer.Option("--shards", help="Only shard indices START:STOP of each split (split a job across machines).")
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Rebuild even if shards with other inputs exist.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Turn Geo3K rows into pre-tokenized WebDataset shards.

    Examples:

      geo3k preprocess

      geo3k preprocess -c demo_data/pipeline.yaml --workers 2

      geo3k preprocess --set model.name_or_path=qwen2.5-vl-3b --set shards.output_dir=/data/shards --force
    """
    from preprocess.pipeline import run_preprocess

    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"preprocess.workers={workers}")
    if split:
        overrides.append(f"source.splits=[{','.join(split)}]")
    cfg, cfg_dir = _config(config, overrides)
    summaries = run_preprocess(cfg, config_dir=cfg_dir, force=force, shard_range=shards, progress=not quiet and not json_out)
    if json_out:
        print(json.dumps([{**s.__dict__, "out_dir": str(s.out_dir)} for s in summaries], indent=2))
    else:
        for s in summaries:
            print("\n".join(s.lines()))


@app.command("demo-data")
def demo_data(
    out: Annotated[Path, typer.Option("--out", help="Folder to write.")] = Path("demo_data"),
    train: Annotated[int, typer.Option("--train", help="Training problems.")] = 200,
    test: Annotated[int, typer.Option("--test", help="Test problems.")] = 40,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    base_url: Annotated[
        Optional[str], typer.Option("--base-url", help="Serve images from this URL (default: file:// URLs).")
    ] = None,
) -> None:
    """Write a Geo3K-shaped parquet of synthetic geometry problems with drawn diagrams.

    Example:

      geo3k demo-data --out demo_data && geo3k preprocess -c demo_data/pipeline.yaml
    """
    from preprocess.demo import write_demo_data

    cfg = write_demo_data(out, train, test, seed, base_url)
    print(f"wrote {train} train + {test} test problems to {out}/ ; next: geo3k preprocess -c {cfg}")


@app.command("inspect")
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
    budget: Annotated[int, typer.Option("--budget", help="Tokens per GPU micro-batch for the batching estimate and plot.")] = 4096,
    processor: Annotated[
        Optional[str], typer.Option("--processor", help="Decode with this preset or model folder instead of the manifest's.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Look inside a shard set: summary, one sample, integrity check, length histogram.

    Examples:

      geo3k inspect data_shards/geo3k/train

      geo3k inspect data_shards/geo3k/train --sample 0 --save-image diagram.png

      geo3k inspect data_shards/geo3k/train --verify

      geo3k inspect data_shards/geo3k/train --plot lengths.png --budget 8192 --json
    """
    from shared import inspection

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
        budget=budget,
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


def main() -> None:
    from preprocess.pipeline import PreprocessError
    from preprocess.sources import SourceError
    from shared.config import ConfigError
    from shared.manifest import ShardSetError
    from shared.presets import PresetError

    user_errors = (ConfigError, PreprocessError, SourceError, ShardSetError, PresetError)
    try:
        app()
    except user_errors as e:
        if os.environ.get("GEO3K_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
