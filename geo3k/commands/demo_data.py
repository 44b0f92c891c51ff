"""`geo3k demo-data`: a Geo3K-shaped parquet of synthetic problems, to try the pipeline offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


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

