"""`geo3k inspect`: look inside a shard set without writing code.

    geo3k inspect data_shards/geo3k/train                        # summary (summary.py)
    geo3k inspect data_shards/geo3k/train --sample 3 --save-image diagram.png   # one record (sample.py)
    geo3k inspect data_shards/geo3k/train --verify               # exit 1 names every bad shard and record (verify.py)
    geo3k inspect data_shards/geo3k/train --plot lengths.png --json             # with any mode (plot.py)

Every mode builds a plain JSON-able dict first (`summarize`, `view_sample`, `verify`); the text views
(`format_*`) only render those dicts, so `--json` and the human output never disagree. The summary reads
only the manifest, index and rejects file, so it is instant on any size of set; its batching figures are the
training loader's own plan (train/data/packing.py), not a second packer. `--sample` reads one shard and loads
the tokenizer named in the manifest; `--verify` reads every byte.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from geo3k.inspect.common import InspectError, use_color
from geo3k.inspect.plot import plot_lengths
from geo3k.inspect.sample import format_sample, save_images, view_sample
from geo3k.inspect.summary import format_summary, summarize
from geo3k.inspect.verify import format_verify, verify
from shared.manifest import ShardSet
from train.data.config import DataConfig

__all__ = ["InspectError", "Result", "run", "use_color"]


@dataclass
class Result:
    """What `geo3k inspect` prints: text for people, data for --json, and whether all was well."""

    text: str
    data: dict[str, Any]
    ok: bool = True
    warnings: list[str] = field(default_factory=list)


_KEYLIKE = re.compile(r"^\S+$")


def run(
    root: str | os.PathLike,
    *,
    sample: str | None = None,
    save_image: str | os.PathLike | None = None,
    verify_: bool = False,
    plot: str | os.PathLike | None = None,
    batching: DataConfig | None = None,
    dp_size: int = 1,
    processor: str | None = None,
    color: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Result:
    """Dispatch the modes of `geo3k inspect`: summary (default), --sample [--save-image], --verify; --plot with any.

    `batching` and `dp_size` are what training would plan with (the summary's batching, the plot's budget).
    """
    if sample is not None and verify_:
        raise InspectError("--sample and --verify are separate modes: run them one at a time")
    if save_image is not None and sample is None:
        raise InspectError("--save-image needs a sample: add --sample KEY|INDEX, e.g. --sample 0")
    if sample is not None and not _KEYLIKE.match(sample):
        raise InspectError(f"--sample {sample!r}: give a key such as 00000042 or a position such as 42")
    batching = batching or DataConfig()
    budget = batching.max_tokens_per_gpu

    ok, warnings = True, []
    if sample is not None:
        data, s = view_sample(root, sample, processor)
        warnings += data.pop("warnings")
        text = format_sample(data, color)
        if save_image is not None:
            data["saved_images"] = save_images(s, int(ShardSet(root).pixel_spec.merge_size), save_image)
            text += "\n" + "\n".join(
                f"wrote {w['path']} ({w['width']}x{w['height']} px, image {w['image']}: the processor's resized view)"
                for w in data["saved_images"]
            )
    elif verify_:
        data = verify(root, progress)
        text, ok = format_verify(data), data["ok"]
    else:
        data = summarize(root, batching, dp_size)
        text = format_summary(data)
    if plot is not None:
        data["plot"] = plot_lengths(root, plot, budget)
        text += f"\nwrote {plot} (histogram of {data['plot']['samples']:,} token lengths, budget {budget:,} marked)"
    return Result(text, data, ok, warnings)
