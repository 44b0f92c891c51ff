"""One source row -> one `Sample` (or a `Reject`): conversation, processor, loss mask, compact pixels.

The conversation is a user turn with each image where the problem text has an `<image>` placeholder and an
assistant turn with the answer (through `preprocess.response_template`). The chat template renders it;
the processor runs once on the rendered text and the images, so `input_ids` are exactly what
`processor.apply_chat_template(messages, tokenize=True)` gives.

Loss mask: 1 on the assistant's answer tokens and its closing `<|im_end|>`, 0 everywhere else (system,
user text, image pads, vision start/end, the `<|im_start|>assistant\\n` header). The template's newline after
the final `<|im_end|>` is 0 too: it is formatting between turns, and generation stops at `<|im_end|>`,
so the model never has to produce it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
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


@dataclass
class Encoded:
    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_grid_thw: np.ndarray
    patches: np.ndarray
    pixel_error: float


def encode(messages: list[dict[str, Any]], images: list[Image.Image], proc: LoadedProcessor, max_tokens: int) -> Encoded:
    processor = proc.processor
    full = processor.apply_chat_template(messages, tokenize=False)
    prompt = processor.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
    if not full.startswith(prompt):
        raise Reject("template", "the chat template renders the prompt differently with and without the answer")
    out = processor(text=[full], images=images or None, return_tensors="np")
    ids = np.asarray(out["input_ids"][0], dtype=np.int64)
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
    mask[ids.shape[0] - n : ids.shape[0] - n + last_end + 1] = 1

    if images:
        try:
            patches, err = patches_from_pixel_values(np.asarray(out["pixel_values"]), proc.pixel_spec)
        except RecordError as e:
            raise Reject("pixels", str(e)) from None
        if err > PIXEL_TOLERANCE:
            raise Reject("pixels", f"stored pixels rebuild pixel_values only to {err:.2e} > {PIXEL_TOLERANCE}")
        grid = np.asarray(out["image_grid_thw"], dtype=np.int32).reshape(-1, 3)
    else:
        spec = proc.pixel_spec
        patches = np.zeros((0, spec.channels, spec.patch_size, spec.patch_size), np.uint8)
        grid, err = np.zeros((0, 3), np.int32), 0.0
    return Encoded(ids.astype(np.int32), mask, grid, patches, err)


def make_sample(
    key: str,
    row_index: int,
    problem: Any,
    answer: Any,
    images: list[Any],
    image_info: list[dict[str, Any]],
    proc: LoadedProcessor,
    cfg: PreprocessConfig,
) -> Sample:
    if not isinstance(problem, str) or not problem.strip():
        raise Reject("missing-field", "the problem text is missing or empty")
    if answer is None or (isinstance(answer, str) and not answer.strip()):
        raise Reject("missing-field", "the answer is missing or empty")
    answer = str(answer)
    messages = build_messages(problem, answer, len(images), cfg)
    enc = encode(messages, images, proc, cfg.max_tokens)
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
    return Sample(key, enc.input_ids, enc.loss_mask, enc.image_grid_thw, enc.patches, meta)
