"""`geo3k inspect DIR --plot PATH.png`: a histogram of token lengths with the micro-batch budget marked."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from geo3k.inspect.common import InspectError, stats
from shared.manifest import ShardSet


def plot_lengths(root: str | os.PathLike, path: str | os.PathLike, budget: int) -> dict[str, Any]:
    """A PNG histogram of token lengths (text + image tokens per sample), with the budget marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InspectError(f"--plot {path}: the plot is written as PNG; give a path ending in .png")
    ss = ShardSet(root)
    tokens = np.asarray(ss.index().column("num_tokens").to_numpy(), dtype=np.int64)
    st = stats(tokens)
    title = f"{ss.manifest.get('dataset')}/{ss.manifest.get('split')}: token lengths of {tokens.size:,} samples"

    # When every sample is far below the budget, one axis spanning 0..budget squeezes the data into a
    # bar or two; then a second, zoomed panel shows the distribution itself.
    off_scale = tokens.size > 0 and budget > 1.5 * st["max"]
    fig = Figure(figsize=(9, 6.5 if off_scale else 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    panels = [("full", fig.add_subplot(2, 1, 1) if off_scale else fig.add_subplot())]
    if off_scale:
        panels.append(("zoom", fig.add_subplot(2, 1, 2)))
    for kind, ax in panels:
        if kind == "full":
            lo, hi = 0.0, max(budget, st["max"]) * 1.04
        else:
            pad = max(1.0, 0.05 * (st["max"] - st["min"]))
            lo, hi = max(0.0, st["min"] - pad), st["max"] + pad
        ax.hist(tokens, bins=np.linspace(lo, hi, 61), color="#4c72b0", label="samples")
        if budget <= hi:
            ax.axvline(budget, color="#c44e52", lw=2, ls="--", label=f"budget {budget:,} tokens/GPU")
        for q, ls in (("median", ":"), ("p95", "-.")):
            ax.axvline(st[q], color="k", lw=1, ls=ls, label=f"{q} {st[q]:,}")
        ax.set_xlim(lo, hi)
        ax.set_xlabel("tokens per sample (text + image)")
        ax.set_ylabel("samples")
        ax.legend(loc="upper right", fontsize=8)
        ax.set_title(title if kind == "full" else f"zoomed in: min {st['min']:,}, max {st['max']:,}", fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return {"path": str(path), "budget": budget, "samples": int(tokens.size), **st}

