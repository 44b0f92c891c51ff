"""M-RoPE position ids of one sample, exactly as transformers' Qwen-VL `get_rope_index` computes them.

For a still image, Qwen2.5-VL and Qwen3-VL use the same rule (tests/test_data_rope.py checks both against
transformers): text tokens count up on all three axes; the image's `t*(h/m)*(w/m)` tokens (m = spatial merge
size) get `start + (t_index, row, column)` over the merged grid, in row-major order; the text after the image
resumes at `start + max(h/m, w/m)`, which for t = 1 is the image's largest position + 1.

Positions restart at 0 for every sample, so a packed micro-batch is the concatenation of per-sample results.
NumPy on the host: a sample costs a few array fills per image, well under a millisecond.
"""

from __future__ import annotations

import numpy as np

from shared.schema import RecordError


def mrope_position_ids(
    input_ids: np.ndarray, image_grid_thw: np.ndarray, image_token_id: int, merge_size: int, key: str = "sample"
) -> np.ndarray:
    """input_ids [T], image_grid_thw [I, 3] -> int64 [3, T]."""
    ids = np.asarray(input_ids)
    num_tokens = ids.shape[0]
    pos = np.empty((3, num_tokens), dtype=np.int64)
    image_at = np.flatnonzero(ids == image_token_id)
    used = 0  # image tokens consumed so far
    text_from = 0  # first token after the previous image
    cur = 0  # next position to hand out
    for t, h, w in np.asarray(image_grid_thw, dtype=np.int64).reshape(-1, 3):
        gh, gw = h // merge_size, w // merge_size
        n = int(t * gh * gw)
        if used + n > image_at.size:
            raise RecordError(f"{key}: image_grid_thw needs more image tokens than input_ids holds")
        start = int(image_at[used])
        if int(image_at[used + n - 1]) != start + n - 1:
            raise RecordError(f"{key}: the {n} tokens of an image are not contiguous in input_ids")
        pos[:, text_from:start] = np.arange(cur, cur + start - text_from)
        cur += start - text_from
        pos[0, start : start + n] = cur + np.repeat(np.arange(t), gh * gw)
        pos[1, start : start + n] = cur + np.tile(np.repeat(np.arange(gh), gw), t)
        pos[2, start : start + n] = cur + np.tile(np.arange(gw), t * gh)
        cur += int(max(gh, gw))  # transformers: max(h, w) // merge_size, whatever t is
        used += n
        text_from = start + n
    if used != image_at.size:
        raise RecordError(f"{key}: {image_at.size} image tokens but image_grid_thw accounts for {used}")
    pos[:, text_from:] = np.arange(cur, cur + num_tokens - text_from)
    return pos
