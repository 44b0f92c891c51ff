"""`geo3k export`: a training checkpoint -> a Hugging Face model folder."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer


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

