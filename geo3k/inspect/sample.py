"""`geo3k inspect DIR --sample KEY|INDEX [--save-image PATH.png]`: one record decoded, its loss span marked.

Reads one shard and loads the tokenizer named in the manifest (or `--processor`); the image is rebuilt from
the stored uint8 patches, as the processor resized it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from geo3k.inspect.common import InspectError
from shared.manifest import MANIFEST, ShardSet
from shared.schema import RecordError, Sample

MARK_OPEN, MARK_CLOSE = "⟦", "⟧"  # the loss-masked-in span when colour is off


def load_tokenizer(ss: ShardSet, processor: str | None = None) -> tuple[Any, list[str]]:
    """The tokenizer that made the set (or `processor`), and warnings if it is not the recorded one."""
    from shared.presets import PresetError, load_processor

    rec = ss.processor
    name = processor or ss.processor_name
    if not name:
        raise InspectError(f"{ss.root}/{MANIFEST} names no processor: pass --processor NAME_OR_PATH to decode tokens")
    try:
        loaded = load_processor(name)
    except PresetError as e:
        raise InspectError(f"{e}; to decode tokens, pass --processor with a preset or a local model folder") from None
    warnings = []
    for k, what in (("tokenizer_sha256", "tokenizer files"), ("chat_template_sha256", "chat template")):
        want, got = rec.get(k), loaded.identity.get(k)
        if want and got and want != got:
            warnings.append(f"the {what} of {name!r} differ from the ones that made these shards: decoded text may be wrong")
    return loaded.tokenizer, warnings


def _segments(sample: Sample, tokenizer: Any, special: dict[str, int], merge_size: int) -> list[dict[str, Any]]:
    """Runs of tokens: text (decoded, with its loss flag) or one image's placeholder pads, in order."""
    ids, mask = sample.input_ids, sample.loss_mask.astype(bool)
    pad = special.get("image_pad")
    grids = [tuple(int(x) for x in g) for g in sample.image_grid_thw]
    per_image = [t * h * w // merge_size**2 for t, h, w in grids]
    segs: list[dict[str, Any]] = []
    image, left_in_image = 0, per_image[0] if per_image else 0
    i, n = 0, len(ids)
    while i < n:
        if ids[i] == pad:
            j = i
            while j < n and ids[j] == pad and (image >= len(grids) or j - i < left_in_image):
                j += 1
            seg: dict[str, Any] = {"kind": "image", "num_tokens": j - i, "loss": bool(mask[i:j].any())}
            if image < len(grids):
                t, h, w = grids[image]
                seg.update(image=image + 1, grid=[t, h, w], num_patches=t * h * w, pixels=[h * sample.patches.shape[-1], w * sample.patches.shape[-1]])
                left_in_image -= j - i
                if left_in_image == 0:
                    image += 1
                    left_in_image = per_image[image] if image < len(per_image) else 0
            segs.append(seg)
        else:
            j = i
            while j < n and ids[j] != pad and mask[j] == mask[i]:
                j += 1
            segs.append(
                {
                    "kind": "text",
                    "text": tokenizer.decode([int(x) for x in ids[i:j]], skip_special_tokens=False),
                    "num_tokens": j - i,
                    "loss": bool(mask[i]),
                }
            )
        i = j
    return segs


def view_sample(root: str | os.PathLike, key_or_index: str | int, processor: str | None = None) -> tuple[dict[str, Any], Sample]:
    """One sample decoded: its counts, images and the conversation as text/image segments with loss flags."""
    ss = ShardSet(root)
    sample = ss.get(key_or_index)
    index = ss.index()
    position = index.column("key").to_pylist().index(sample.key)
    rec = ss.processor
    special = rec.get("special_ids", {})
    merge = int(ss.pixel_spec.merge_size)
    tokenizer, warnings = load_tokenizer(ss, processor)
    segs = _segments(sample, tokenizer, special, merge)
    loss_ids = [int(x) for x in sample.input_ids[sample.loss_mask.astype(bool)]]
    p = sample.patches.shape[-1] if sample.patches.ndim == 4 else 0
    meta = sample.meta
    sources = meta.get("images") or []
    images = [
        {
            "image": i + 1,
            "grid": [int(t), int(h), int(w)],
            "num_patches": int(t * h * w),
            "num_tokens": int(t * h * w) // merge**2,
            "pixels": [int(h) * p, int(w) * p],  # [height, width] of the resized image
            "source": sources[i] if i < len(sources) else None,
        }
        for i, (t, h, w) in enumerate(sample.image_grid_thw)
    ]
    d = {
        "path": str(ss.root),
        "key": sample.key,
        "index": position,
        "shard": index.column("shard")[position].as_py(),
        "row": meta.get("row"),
        "num_tokens": sample.num_tokens,
        "num_image_tokens": int((sample.input_ids == special.get("image_pad")).sum()),
        "num_loss_tokens": int(sample.loss_mask.sum()),
        "num_patches": sample.num_patches,
        "images": images,
        "problem": meta.get("problem"),
        "answer": meta.get("answer"),
        "loss_text": tokenizer.decode(loss_ids, skip_special_tokens=False),
        "segments": segs,
        "warnings": warnings,
    }
    return d, sample


_GREEN, _CYAN, _DIM, _RESET = "\x1b[1;32m", "\x1b[36m", "\x1b[2m", "\x1b[0m"


def format_sample(d: dict[str, Any], color: bool = False) -> str:
    def image_text(s: dict[str, Any]) -> str:
        if "image" not in s:
            return f"<{s['num_tokens']} unmatched image tokens>"
        t, h, w = s["grid"]
        return f"<image {s['image']}: grid {t}x{h}x{w}, {s['num_tokens']} tokens>"

    body = []
    for s in d["segments"]:
        text = image_text(s) if s["kind"] == "image" else s["text"]
        if color:
            style = _GREEN if s["loss"] else (_CYAN if s["kind"] == "image" else "")
            body.append(f"{style}{text}{_RESET}" if style else text)
        else:
            body.append(f"{MARK_OPEN}{text}{MARK_CLOSE}" if s["loss"] else text)
    images = "; ".join(
        f"{im['image']}: grid {'x'.join(map(str, im['grid']))}, {im['num_patches']} patches, {im['num_tokens']} tokens, "
        f"{im['pixels'][1]}x{im['pixels'][0]} px" + (f" from {im['source']['source']}" if (im["source"] or {}).get("source") else "")
        for im in d["images"]
    ) or "none"
    legend = f"{_GREEN}green{_RESET}" if color else f"{MARK_OPEN}…{MARK_CLOSE}"
    lines = [
        f"sample {d['key']}  (index {d['index']}, {d['shard']}, source row {d['row']})",
        f"  tokens {d['num_tokens']:,}: image {d['num_image_tokens']:,}, loss {d['num_loss_tokens']:,}; patches {d['num_patches']:,}",
        f"  images {images}",
        f"  answer {d['answer']}",
        f"--- conversation; {legend} = in the loss (the tokens the model learns to produce) ---",
        "".join(body).rstrip("\n"),
    ]
    return "\n".join(lines)


def unpatchify(patches: np.ndarray, grid_thw: tuple[int, int, int] | np.ndarray, merge_size: int) -> np.ndarray:
    """uint8 [N, C, P, P] patch rows of one image -> uint8 [H, W, C], the processor's resized image.

    The processor orders rows by (t, h/merge, w/merge, merge_h, merge_w) so that each merge x merge block of
    patches sits together (see Qwen2VLImageProcessor.patchify); this undoes that permutation. Only the first
    temporal frame is returned (a still image has one).
    """
    t, gh, gw = (int(x) for x in grid_thw)
    n, c, p, _ = patches.shape
    m = merge_size
    if n != t * gh * gw or gh % m or gw % m:
        raise RecordError(f"{n} patches do not fill a grid of {t}x{gh}x{gw} with merge size {m}")
    x = patches.reshape(t, gh // m, gw // m, m, m, c, p, p)[0]
    x = x.transpose(0, 2, 5, 1, 3, 6, 4)  # (gh/m, m, P, gw/m, m, P, C)
    return np.ascontiguousarray(x).reshape(gh * p, gw * p, c)


def sample_images(sample: Sample, merge_size: int) -> list[np.ndarray]:
    """Every image of a sample as uint8 [H, W, C], in conversation order."""
    out, start = [], 0
    for g in sample.image_grid_thw:
        n = int(np.prod(g))
        out.append(unpatchify(sample.patches[start : start + n], g, merge_size))
        start += n
    return out


def save_images(sample: Sample, merge_size: int, path: str | os.PathLike) -> list[dict[str, Any]]:
    """Write a sample's image(s) as PNG: PATH for one image, PATH-1.png, PATH-2.png, ... for several."""
    from PIL import Image

    images = sample_images(sample, merge_size)
    if not images:
        raise InspectError(f"sample {sample.key} has no image to save: pick another with --sample")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise InspectError(f"--save-image {path}: the picture is written as PNG; give a path ending in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    written = []
    for i, img in enumerate(images):
        out = path if len(images) == 1 else path.with_name(f"{path.stem}-{i + 1}{path.suffix}")
        Image.fromarray(img[..., :3] if img.shape[-1] >= 3 else img[..., 0]).save(out)
        written.append({"image": i + 1, "path": str(out), "width": img.shape[1], "height": img.shape[0]})
    return written

