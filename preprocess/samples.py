"""One source row -> one `Sample` (or a `Reject`): conversation, processor, loss mask, compact pixels.

The conversation is a user turn with each image where the problem text has an `<image>` placeholder and an
assistant turn with the answer (through `preprocess.response_template`). The chat template renders it;
the images go through the processor's own resize, and their uint8 patches are laid out in its order
(`image_patches`); the rendered text goes through the tokenizer, each image's pad id then repeated once per
merged patch (`_tokenize_with_images`), so `input_ids` are exactly what
`processor.apply_chat_template(messages, tokenize=True)` gives; `encode(check=True)` proves it per row against
the full processor (the pipeline checks a fixed sample of rows, or every row with `--verify`).

Loss mask: 1 on the assistant's answer tokens and its closing `<|im_end|>`, 0 everywhere else (system,
user text, image pads, vision start/end, the `<|im_start|>assistant\\n` header). The template's newline after
the final `<|im_end|>` is 0 too: it is formatting between turns, and generation stops at `<|im_end|>`,
so the model never has to produce it. `preprocess.train_final_newline: true` sets it to 1 (the convention of
slime, Megatron-Bridge, ms-swift, LLaMA-Factory and verl), so that loss values compare with theirs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from preprocess.images import Reject
from shared.config import PreprocessConfig
from shared.presets import LoadedProcessor
from shared.schema import RecordError, Sample, patches_from_pixel_values

IMAGE_PLACEHOLDER = "<image>"
PIXEL_TOLERANCE = 1e-6


def build_messages(problem: str, answer: str, num_images: int, cfg: PreprocessConfig) -> list[dict[str, Any]]:
    """The chat messages of one row; images are `{"type": "image"}` parts at their placeholders."""
    parts = problem.split(IMAGE_PLACEHOLDER)
    if len(parts) - 1 != num_images:
        raise Reject(
            "image-count-mismatch",
            f"{len(parts) - 1} {IMAGE_PLACEHOLDER} placeholder(s) in the problem but {num_images} image(s)",
        )
    content: list[dict[str, Any]] = []
    for i, text in enumerate(parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < num_images:
            content.append({"type": "image"})
    messages: list[dict[str, Any]] = []
    if cfg.system_prompt is not None:
        messages.append({"role": "system", "content": [{"type": "text", "text": cfg.system_prompt}]})
    messages.append({"role": "user", "content": content})
    reply = cfg.response_template.format(answer=answer)
    messages.append({"role": "assistant", "content": [{"type": "text", "text": reply}]})
    return messages


def answer_text(answer: Any) -> str:
    """The answer as the text the assistant turn is trained on, or a Reject.

    Decided per type, so that no value is trained as its Python repr:
    - text is used as it is; empty or whitespace-only text is `missing-field`;
    - None and NaN (how pandas writes a missing value) are `missing-field`;
    - integers, and floats with an integral value (a column of integers with one missing value becomes float
      in pandas: 3 is stored as 3.0), are written as integers ("3"); other finite floats in Python's shortest
      round-trip form ("2.5"); infinities are `bad-answer`;
    - booleans, lists, dicts and anything else are `bad-answer`: which text they stand for is not ours to guess.
    """
    if isinstance(answer, str):
        if not answer.strip():
            raise Reject("missing-field", "the answer is empty")
        return answer
    if answer is None or (isinstance(answer, float) and math.isnan(answer)):
        raise Reject("missing-field", "the answer is missing (null or NaN)")
    if isinstance(answer, bool) or isinstance(answer, np.bool_):
        raise Reject("bad-answer", f"the answer is the boolean {answer}: write it as text in the source")
    if isinstance(answer, (int, np.integer)):
        return str(int(answer))
    if isinstance(answer, (float, np.floating)):
        x = float(answer)
        if not math.isfinite(x):
            raise Reject("bad-answer", f"the answer is {x}: write it as text in the source")
        return str(int(x)) if x.is_integer() and abs(x) < 2**53 else repr(x)
    raise Reject("bad-answer", f"the answer is a {type(answer).__name__} ({str(answer)[:60]}), not text: write it as a string")


@dataclass
class Encoded:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_grid_thw: np.ndarray
    patches: np.ndarray
    checked: bool = False  # compared with the full processor's output
    mismatch: str | None = None  # what differed, when checked and the fast path was wrong


def image_patches(images: list[Image.Image], proc: LoadedProcessor) -> tuple[np.ndarray, np.ndarray]:
    """The stored uint8 patches [N, C, P, P] and grid [I, 3] of the images, without the float32 detour.

    The processor resizes the uint8 image (its own `resize`: smart_resize's target size, then torchvision's
    antialiased bicubic on uint8), converts to float32, rescales, normalises, and lays the patches out with a
    temporal frame duplicated. Normalisation is affine per channel, so the stored uint8 patches are exactly the
    resized image in the processor's patch order: this calls the processor's `resize` on the uint8 image and
    lays out the uint8 patches directly (one temporal frame), skipping the float32 work and its inversion
    (~5x less time per image).
    `encode(..., check=True)` compares the result with the full processor's output.
    """
    spec = proc.pixel_spec
    ip = proc.processor.image_processor
    if not images:
        return np.zeros((0, spec.channels, spec.patch_size, spec.patch_size), np.uint8), np.zeros((0, 3), np.int32)
    p, m, c = spec.patch_size, spec.merge_size, spec.channels
    out, grids = [], []
    for img in images:
        w, h = img.size
        # HWC bytes viewed as NCHW with channels-last strides: no copy, and torch's uint8 antialiased resize
        # is ~2x faster on this layout than on planar CHW (same values: the check compares them).
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, h, w, c).permute(0, 3, 1, 2)
        try:
            resized = ip.resize(images=t, size=ip.size, resample=ip.resample, factor=p * m)
        except ValueError as e:  # smart_resize refuses, e.g., an aspect ratio over 200
            raise Reject("processor", f"the image processor refuses this {w}x{h} image: {e}") from None
        rh, rw = resized.shape[-2:]
        gh, gw = rh // p, rw // p
        # the processor's patch order, [gh/m, gw/m, m, m, C, P, P], taken from the HWC view in one copy
        hwc = resized[0].permute(1, 2, 0).numpy()
        x = hwc.reshape(gh // m, m, p, gw // m, m, p, c).transpose(0, 3, 1, 4, 6, 2, 5)
        out.append(np.ascontiguousarray(x).reshape(-1, c, p, p))
        grids.append((1, gh, gw))
    return np.concatenate(out), np.asarray(grids, dtype=np.int32)


def _tokenize_with_images(text: str, grid: np.ndarray, proc: LoadedProcessor) -> np.ndarray:
    """The ids the processor gives the rendered text: each image's one pad token repeated once per merged patch.

    The processor repeats the pad in the text and tokenizes that; a special token is matched before the text
    between them is split into tokens, so repeating its id after tokenizing the short text gives the same ids
    (the check proves it per sampled row) without making the tokenizer scan hundreds of pads per image."""
    ids = np.asarray(proc.tokenizer(text)["input_ids"], dtype=np.int64)
    pad = proc.identity["special_ids"]["image_pad"]
    where = np.flatnonzero(ids == pad)
    if len(where) != len(grid):
        raise Reject("template", f"the rendered conversation has {len(where)} image pads for {len(grid)} images")
    repeats = np.ones(len(ids), dtype=np.int64)
    repeats[where] = grid.prod(axis=1) // proc.pixel_spec.merge_size**2
    return np.repeat(ids, repeats)


def _reference(full: str, images: list[Image.Image], proc: LoadedProcessor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(input_ids, uint8 patches, grid) from the full processor: the ground truth of the fast path."""
    try:
        out = proc.processor(text=[full], images=images or None, return_tensors="np")
    except ValueError as e:
        raise Reject("processor", f"the processor refuses this row: {e}") from None
    ids = np.asarray(out["input_ids"][0], dtype=np.int64)
    if not images:
        return ids, *image_patches([], proc)
    try:
        patches, err = patches_from_pixel_values(np.asarray(out["pixel_values"]), proc.pixel_spec)
    except RecordError as e:
        raise Reject("pixels", str(e)) from None
    if err > PIXEL_TOLERANCE:
        raise Reject("pixels", f"stored pixels rebuild pixel_values only to {err:.2e} > {PIXEL_TOLERANCE}")
    return ids, patches, np.asarray(out["image_grid_thw"], dtype=np.int32).reshape(-1, 3)


def encode(
    messages: list[dict[str, Any]], images: list[Image.Image], proc: LoadedProcessor, max_tokens: int, check: bool = False,
    train_final_newline: bool = False,
) -> Encoded:
    """Token ids, loss mask, grid and uint8 patches of one conversation.

    check=True also runs the full processor on the row and compares ids, grid and patches; where they differ
    the processor's result is the one kept (and the difference reported), so a checked row is always right.
    """
    processor = proc.processor
    full = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise Reject("template", "the chat template renders the prompt differently with and without the answer")
    patches, grid = image_patches(images, proc)
    ids = _tokenize_with_images(full, grid, proc)
    mismatch = None
    if check:
        ref_ids, ref_patches, ref_grid = _reference(full, images, proc)
        diffs = [
            name
            for name, a, b in (("input_ids", ids, ref_ids), ("image_grid_thw", grid, ref_grid), ("patches", patches, ref_patches))
            if a.shape != b.shape or not np.array_equal(a, b)
        ]
        if diffs:
            mismatch = "the fast path's " + ", ".join(diffs) + " differ from the processor's"
            ids, patches, grid = ref_ids, ref_patches, ref_grid
    if ids.shape[0] > max_tokens:
        raise Reject("too-long", f"{ids.shape[0]} tokens > preprocess.max_tokens {max_tokens}")

    # The completion (answer + <|im_end|> + newline) has no images, so the tokenizer alone gives its ids;
    # they must be the tail of the full sequence, or the answer span is not where we think it is.
    completion = proc.tokenizer(full[len(prompt) :], add_special_tokens=False)["input_ids"]
    n = len(completion)
    if n == 0 or ids[-n:].tolist() != list(completion):
        raise Reject("template", "the answer's tokens are not the tail of the conversation's tokens")
    im_end = proc.identity["special_ids"]["im_end"]
    last_end = max(i for i, t in enumerate(completion) if t == im_end) if im_end in completion else n - 1
    mask = np.zeros(ids.shape[0], dtype=np.uint8)
    end = n if train_final_newline else last_end + 1  # what follows the last <|im_end|>: the template's newline
    mask[ids.shape[0] - n : ids.shape[0] - n + end] = 1
    return Encoded(ids.astype(np.int32), mask, grid, patches, checked=check, mismatch=mismatch)


def make_sample(
    key: str,
    row_index: int,
    problem: Any,
    answer: Any,
    images: list[Any],
    image_info: list[dict[str, Any]],
    proc: LoadedProcessor,
    cfg: PreprocessConfig,
    check: bool = False,
) -> tuple[Sample, Encoded]:
    if not isinstance(problem, str) or not problem.strip():
        kind = "missing or empty" if problem is None or isinstance(problem, str) else f"a {type(problem).__name__}, not text"
        raise Reject("missing-field", f"the problem text is {kind}")
    answer = answer_text(answer)
    messages = build_messages(problem, answer, len(images), cfg)
    enc = encode(messages, images, proc, cfg.max_tokens, check=check, train_final_newline=cfg.train_final_newline)
    image_token = proc.identity["special_ids"]["image_pad"]
    meta = {
        "row": row_index,
        "problem": problem,
        "answer": answer,
        "images": image_info,
        "num_tokens": int(enc.input_ids.shape[0]),
        "num_image_tokens": int((enc.input_ids == image_token).sum()),
        "num_loss_tokens": int(enc.loss_mask.sum()),
        "num_patches": int(enc.patches.shape[0]),
    }
    return Sample(key, enc.input_ids, enc.loss_mask, enc.image_grid_thw, enc.patches, meta), enc
