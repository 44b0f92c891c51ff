"""The `geo3k` command: this file only wires subcommands; each job lives in its stage's package.

Errors that a user can fix print one line saying how, without a traceback; set GEO3K_DEBUG=1 for one.
"""

from __future__ import annotations

import json
import os
import signal
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
H200_BYTES = 143_771 * 2**20
"""What an H200 reports (torch.cuda.get_device_properties): the card a plan is printed against."""


def _config(path: Optional[Path], overrides: Optional[list[str]]):
    from shared.config import load_config

    if path is None and Path("pipeline.yaml").exists():
        path = Path("pipeline.yaml")
    return load_config(path, overrides or []), (path.resolve().parent if path else None)


def _relaunch(nproc: int) -> None:
    """With nproc > 1 in a lone process: run this same command again under torchrun (does not return)."""
    if nproc > 1 and "RANK" not in os.environ:
        from train.trainer import launch_with_torchrun

        argv = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv:  # "--nproc N" as two words
            i = sys.argv.index("--nproc")
            argv = sys.argv[1:i] + sys.argv[i + 2 :]
        launch_with_torchrun(nproc, argv)


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
    verify: Annotated[
        bool, typer.Option("--verify", help="Compare every row with the full processor (default: one row in 64).")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    json_out: JsonOpt = False,
) -> None:
    """Turn Geo3K rows into pre-tokenized WebDataset shards.

    Examples:

      geo3k preprocess

      geo3k preprocess -c demo_data/pipeline.yaml --workers 2

      geo3k preprocess --shards 0:4    # on one machine; --shards 4:8 on another, same folder

      geo3k preprocess --set model.name_or_path=qwen2.5-vl-3b --set shards.output_dir=/data/shards --force
    """
    overrides = list(set_ or [])
    if workers is not None:
        overrides.append(f"preprocess.workers={workers}")
    if verify:
        overrides.append("preprocess.verify=true")
    if split:
        overrides.append(f"source.splits=[{','.join(split)}]")
    cfg, cfg_dir = _config(config, overrides)
    from preprocess.pipeline import run_preprocess  # after the config: its errors come before torch's import

    # SIGTERM as an exception: the run then stops and reaps its workers on the way out, as on Ctrl-C
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))

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


@app.command()
def train(
    config: ConfigOpt = None,
    set_: SetOpt = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the latest checkpoint in train.output_dir.")] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start over in a train.output_dir that holds another run, deleting its checkpoints and metrics.")
    ] = False,
    allow_schedule_change: Annotated[
        bool,
        typer.Option("--allow-schedule-change", help="With --resume: continue although train_iters, epochs, lr or another schedule setting changed."),
    ] = False,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) on this node; >1 relaunches under torchrun.")] = 1,
    backend: Annotated[Optional[str], typer.Option("--backend", help="megatron (default) or fsdp.")] = None,
    plan: Annotated[
        bool, typer.Option("--plan", help="Print the memory each GPU needs for this model and layout, and stop (no GPU needed).")
    ] = False,
    json_out: JsonOpt = False,
) -> None:
    """Train on preprocessed shards (never re-tokenizes).

    Examples:

      geo3k train

      geo3k train -c demo_data/pipeline.yaml --set train.random_init=true --set train.global_batch_size=32

      geo3k train --nproc 8 --set train.tensor_parallel=4 --set train.sequence_parallel=true

      geo3k train --resume

      geo3k train --overwrite --set train.output_dir=runs/geo3k

      geo3k train --plan --nproc 8 --set model.name_or_path=qwen3-vl-30b-a3b --set train.expert_parallel=8

    Several nodes: run `torchrun --nnodes N --node-rank R --rdzv-endpoint HOST:PORT --nproc-per-node G
    -m shared.cli train ...` on each node.
    """
    if resume and overwrite:
        from shared.config import ConfigError

        raise ConfigError("--resume continues the run in train.output_dir, --overwrite deletes it: pass one of them")
    overrides = list(set_ or [])
    if backend:
        overrides.append(f"train.backend={backend}")
    cfg, _ = _config(config, overrides)
    if "RANK" not in os.environ:
        from shared.errors import UserError
        from train.models.source import resolve_source
        from train.trainer import check_layout

        # the config the model will be built from: a checkpoint's own when weights are loaded
        try:
            hf_config = resolve_source(cfg.model.name_or_path, pretrained=not cfg.train.random_init).hf_config
        except UserError as e:
            if not plan:
                raise
            # a plan needs no weights: the preset's transcription of the config will do
            hf_config = resolve_source(cfg.model.name_or_path, pretrained=False).hf_config
            print(f"note: {e}; planning with the preset's config", file=sys.stderr)
        check_layout(cfg.train, hf_config, nproc)  # before any process starts
        if plan:
            from train.trainer import memory_plan

            p = memory_plan(cfg, hf_config, nproc)
            if json_out:
                print(json.dumps({**p.__dict__, "total": p.total}, indent=2))
                return
            print("\n".join(p.lines(H200_BYTES)))
            if not p.fits(H200_BYTES):
                from train.memory_plan import advice

                print(f"  to fit: {advice(p, cfg.train, nproc, hf_config)}")
            return
    _relaunch(nproc)
    from train.trainer import run_training  # one loop for both backends; the Trainer picks the engine

    result = run_training(cfg, resume=resume, overwrite=overwrite, allow_schedule_change=allow_schedule_change)
    if json_out and int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(result, indent=2, default=str))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(help="A checkpoint folder (runs/x/checkpoints/step-N) or a run folder (its latest).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder for the Hugging Face model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bfloat16, float16 or float32.")] = "bfloat16",
) -> None:
    """Export a training checkpoint as a Hugging Face model folder (safetensors, config, processor).

    Example:

      geo3k export runs/geo3k --out exported/geo3k-qwen3-vl-2b
    """
    from train.trainer import export_checkpoint

    path = export_checkpoint(checkpoint, out, dtype=dtype, warn=lambda w: print(f"warning: {w}", file=sys.stderr))
    print(f"exported {path}; load it with transformers' AutoModelForImageTextToText.from_pretrained({str(path)!r})")


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="A run folder, a checkpoint (step-N), an exported or any Hugging Face Qwen-VL folder, or a hub id.")],
    shards: Annotated[Path, typer.Option("--shards", help="The test split's shard folder, e.g. data_shards/geo3k/test.")],
    config: ConfigOpt = None,
    set_: SetOpt = None,
    samples: Annotated[str, typer.Option("--samples", help="Problems to answer: a count or all.")] = "all",
    max_new_tokens: Annotated[Optional[int], typer.Option("--max-new-tokens", help="Longest answer (default: train.eval_max_new_tokens).")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="JSONL of every answer (default: eval-<model>.jsonl here).")] = None,
    nproc: Annotated[int, typer.Option("--nproc", help="Processes (GPUs) on this node; >1 relaunches under torchrun.")] = 1,
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
    cfg, _ = _config(config, overrides)
    _relaunch(nproc)
    from train.distributed import destroy
    from train.evaluate import eval_summary, run_eval

    out = out or Path(f"eval-{Path(model.rstrip('/')).name}.jsonl")
    try:
        res = run_eval(cfg, model, shards, samples=None if samples == "all" else int(samples), out_jsonl=out)
    finally:
        destroy()
    if int(os.environ.get("RANK", 0)) == 0:
        print(json.dumps(res, indent=2, default=str) if json_out else eval_summary(res))


def main() -> None:
    from shared.errors import UserError

    try:
        app()
    except UserError as e:
        if os.environ.get("GEO3K_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
