"""The one sample schema: what a shard record holds, written by preprocess and read by train and inspect.

A record is a group of tar members sharing a key (WebDataset convention, `<key>.<field>`):

    <key>.input_ids.npy      int32 [T]        token ids, identical to processor.apply_chat_template(..., tokenize=True)
    <key>.loss_mask.npy      uint8 [T]        1 on the answer tokens and the closing <|im_end|>, else 0
    <key>.image_grid_thw.npy int32 [I, 3]     (t, h, w) patch grid of each image, as the processor reports it
    <key>.patches.npy.zst    uint8 [N, C, P, P] zstd-compressed: the resized image's patches, one temporal frame
    <key>.meta.json          source row, image URLs and content hashes, lengths, answer

Why uint8 patches: the processor's float32 `pixel_values` ([N, C*Tp*P*P]) hold each image frame Tp=2 times
and 4 bytes a value, but they are an affine function of the resized uint8 image. Storing the uint8 patch
rows once and normalising at load time (`normalize_patches`) reproduces them to within 1e-6 in an eighth of
the bytes before compression. The writer lays out the uint8 patches directly (never through float32) and
compares them with the processor's values on a fixed sample of rows (every row with `geo3k preprocess --verify`).

The `.npy` members are plain NumPy files (no pickle: `allow_pickle=False` everywhere), so `tar` lists the
shards and `webdataset.WebDataset(...).decode()` reads them; only the `.zst` member needs zstandard.
Changing a member's name, dtype or layout is a breaking change: bump FORMAT_VERSION and docs/shard-format.md.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import zstandard

FORMAT_VERSION = 1

INPUT_IDS = "input_ids.npy"
LOSS_MASK = "loss_mask.npy"
GRID_THW = "image_grid_thw.npy"
PATCHES = "patches.npy.zst"
META = "meta.json"
MEMBERS = (INPUT_IDS, LOSS_MASK, GRID_THW, PATCHES, META)

IGNORE_INDEX = -100
"""The label of a position without a loss (PyTorch cross_entropy's default ignore_index). The shards keep
`loss_mask`; train/data/batch.py turns it into shifted labels with this value where the mask is 0."""


class RecordError(ValueError):
    """A shard record that is missing a member or whose members disagree."""


@dataclass
class PixelSpec:
    """The image processor facts needed to rebuild `pixel_values` from stored patches."""

    patch_size: int
    temporal_patch_size: int
    merge_size: int
    image_mean: list[float]
    image_std: list[float]
    rescale_factor: float = 1 / 255
    channels: int = 3

    @property
    def patch_dim(self) -> int:
        return self.channels * self.temporal_patch_size * self.patch_size**2

    def to_dict(self) -> dict[str, Any]:
        return {
            "patch_size": self.patch_size,
            "temporal_patch_size": self.temporal_patch_size,
            "merge_size": self.merge_size,
            "image_mean": list(self.image_mean),
            "image_std": list(self.image_std),
            "rescale_factor": self.rescale_factor,
            "channels": self.channels,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "PixelSpec":
        return cls(**d)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """Per-channel (offset, scale) in float32 such that pixel = (u8 - offset) / scale.

        This is the processor's fused rescale+normalise (mean/rescale_factor, std/rescale_factor), computed
        the same way so that the result matches it to float32 rounding.
        """
        inv = np.float32(1.0 / self.rescale_factor)
        offset = np.asarray(self.image_mean, dtype=np.float32) * inv
        scale = np.asarray(self.image_std, dtype=np.float32) * inv
        return offset, scale


def normalize_patches(patches: np.ndarray, spec: PixelSpec) -> np.ndarray:
    """uint8 [N, C, P, P] -> float32 [N, C*Tp*P*P], the processor's `pixel_values` layout.

    NumPy version for tests and inspection; the training data path does the same on torch tensors.
    """
    n, c, p, _ = patches.shape
    offset, scale = spec.affine()
    x = (patches.astype(np.float32) - offset[None, :, None, None]) / scale[None, :, None, None]
    x = np.broadcast_to(x[:, :, None], (n, c, spec.temporal_patch_size, p, p))
    return np.ascontiguousarray(x).reshape(n, spec.patch_dim)


def patches_from_pixel_values(pixel_values: np.ndarray, spec: PixelSpec) -> tuple[np.ndarray, float]:
    """Invert the processor's normalisation: float32 [N, C*Tp*P*P] -> (uint8 [N, C, P, P], max |error|).

    Raises RecordError if the temporal frames differ (video) or the values are not an affine image of uint8.
    The error is that of `normalize_patches` (the reader's formula) against the processor's values; the
    temporal frames being equal, frame 0 stands for all of them.
    """
    n = pixel_values.shape[0]
    c, tp, p = spec.channels, spec.temporal_patch_size, spec.patch_size
    x = np.asarray(pixel_values, dtype=np.float32).reshape(n, c, tp, p, p)
    if tp > 1 and not (x[:, :, 1:] == x[:, :, :1]).all():
        raise RecordError("the temporal frames of an image differ: only still images are supported")
    offset, scale = spec.affine()
    off, sc = offset[None, :, None, None], scale[None, :, None, None]
    frame = x[:, :, 0]
    # float32 is ample: values are within ~1e-5 of integers 0..255, far from the rounding boundary at .5
    u = np.rint(frame * sc + off)
    if n and (u.min() < 0 or u.max() > 255):
        raise RecordError("pixel values fall outside the uint8 range: the processor does not match its preset")
    patches = u.astype(np.uint8)
    err = float(np.abs((patches.astype(np.float32) - off) / sc - frame).max()) if n else 0.0
    return patches, err


@dataclass
class Sample:
    """One decoded record."""

    key: str
    input_ids: np.ndarray
    loss_mask: np.ndarray
    image_grid_thw: np.ndarray
    patches: np.ndarray
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])

    def check(self, image_token_id: int, merge_size: int) -> None:
        """Raise RecordError if the members disagree with each other."""
        t = self.input_ids.shape[0]
        if self.input_ids.ndim != 1 or self.loss_mask.shape != (t,):
            raise RecordError(f"{self.key}: input_ids {self.input_ids.shape} and loss_mask {self.loss_mask.shape} differ")
        if self.image_grid_thw.ndim != 2 or self.image_grid_thw.shape[1] != 3:
            raise RecordError(f"{self.key}: image_grid_thw has shape {self.image_grid_thw.shape}, expected [I, 3]")
        grid_patches = int(np.prod(self.image_grid_thw, axis=1).sum())
        if grid_patches != self.patches.shape[0]:
            raise RecordError(f"{self.key}: grid says {grid_patches} patches, pixel data holds {self.patches.shape[0]}")
        pads = int((self.input_ids == image_token_id).sum())
        if pads * merge_size**2 != grid_patches:
            raise RecordError(
                f"{self.key}: {pads} image tokens but {grid_patches} patches / merge_size^2 = "
                f"{grid_patches / merge_size**2:g}"
            )
        if not set(np.unique(self.loss_mask).tolist()) <= {0, 1} or not self.loss_mask.any():
            raise RecordError(f"{self.key}: loss mask must be 0/1 with at least one 1")


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def _npy_load(b: bytes) -> np.ndarray:
    return np.load(io.BytesIO(b), allow_pickle=False)


def encode_sample(sample: Sample, zstd_level: int = 10) -> dict[str, bytes]:
    """Sample -> {member name: bytes}, in MEMBERS order (the order is part of the byte-exact output)."""
    cctx = zstandard.ZstdCompressor(level=zstd_level)  # single-threaded: deterministic output
    return {
        INPUT_IDS: _npy_bytes(np.ascontiguousarray(sample.input_ids, dtype=np.int32)),
        LOSS_MASK: _npy_bytes(np.ascontiguousarray(sample.loss_mask, dtype=np.uint8)),
        GRID_THW: _npy_bytes(np.ascontiguousarray(sample.image_grid_thw, dtype=np.int32).reshape(-1, 3)),
        PATCHES: cctx.compress(_npy_bytes(np.ascontiguousarray(sample.patches, dtype=np.uint8))),
        META: json.dumps(sample.meta, sort_keys=True, ensure_ascii=False).encode(),
    }


def decode_sample(key: str, members: dict[str, bytes]) -> Sample:
    """{member name: bytes} -> Sample. Accepts the names with or without a leading dot."""
    m = {k.lstrip("."): v for k, v in members.items()}
    missing = [name for name in MEMBERS if name not in m]
    if missing:
        raise RecordError(f"{key}: missing member(s) {', '.join(missing)}")
    try:
        patches = _npy_load(zstandard.ZstdDecompressor().decompress(m[PATCHES]))
        return Sample(
            key=key,
            input_ids=_npy_load(m[INPUT_IDS]),
            loss_mask=_npy_load(m[LOSS_MASK]),
            image_grid_thw=_npy_load(m[GRID_THW]),
            patches=patches,
            meta=json.loads(m[META]),
        )
    except (ValueError, zstandard.ZstdError, json.JSONDecodeError, EOFError) as e:
        raise RecordError(f"{key}: cannot decode: {e}") from None
