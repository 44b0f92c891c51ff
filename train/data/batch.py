"""One packed micro-batch: several whole samples laid end to end as a single sequence (batch dim 1).

The layout is the contract with train/models/qwen_vl.py (`model(**batch.model_inputs())`):

    input_ids      int64 [T]       samples back to back, then padding up to a multiple of pad_to_multiple_of
    position_ids   int64 [3, T]    M-RoPE per sample, restarting at 0 (train/data/rope.py); padding counts 0..
    labels         int64 [T]       labels[i] = input_ids[i+1] if loss_mask[i+1] else -100; -100 at each sample's
                                   last token (no prediction across a boundary) and on the padding
    cu_seqlens     int32 [S+1]     segment boundaries; the padding is its own last segment, so attention never
                                   mixes it with a sample
    max_seqlen     int             the longest segment
    pixel_values   float [N, C*Tp*P*P]  normalised like the processor, images in order of appearance
    image_grid_thw int64 [I, 3]    stays on the host in `.to(device)`: the vision encoder's index arithmetic
                                   (per-image Python loops in transformers) reads it there without a GPU sync
    loss_positions int64 [n]       where labels != -100, and image_positions where input_ids is the image
                                   token: computed here so the model needs no `nonzero()` (a host sync) per step

Why the host holds uint8 patches: float32 `pixel_values` repeat every frame Tp=2 times at 4 bytes a value, 8x
the uint8 patch bytes (a full 4096-token Geo3K micro-batch: ~90 MB of float32 vs ~11 MB of uint8). The
workers, the pinned buffers and the host-to-device copy carry uint8; `.to(device)` normalises on the device
with the processor's float32 arithmetic ((u8 - offset) / scale, correctly rounded in both NumPy and torch), so
the values equal `shared.schema.normalize_patches` bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from shared.schema import IGNORE_INDEX, PixelSpec, RecordError, Sample
from train.data.rope import mrope_position_ids


@dataclass
class PackedBatch:
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor
    max_seqlen: int
    patches: torch.Tensor
    """uint8 [N, C, P, P]: one temporal frame per patch, as stored in the shards."""
    image_grid_thw: torch.Tensor
    pixel_offset: torch.Tensor
    """float32 [C]: pixel = (u8 - offset) / scale, PixelSpec.affine()."""
    pixel_scale: torch.Tensor
    temporal_patch_size: int
    num_loss_tokens: int
    """Label positions != -100 in this micro-batch (the step's denominator is GlobalStep.num_loss_tokens)."""
    num_real_tokens: int
    """Tokens of samples, padding excluded."""
    keys: list[str] = field(default_factory=list)
    """Sample keys in packing order (one per real segment of cu_seqlens)."""
    loss_positions: torch.Tensor | None = None
    """int64 [n]: positions with a label (labels != -100), ascending."""
    image_positions: torch.Tensor | None = None
    """int64 [num image tokens]: positions of the image placeholder tokens, ascending."""
    _pixel_values: torch.Tensor | None = field(default=None, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_patches(self) -> int:
        return int(self.patches.shape[0])

    @property
    def num_images(self) -> int:
        return int(self.image_grid_thw.shape[0])

    @property
    def pixel_values(self) -> torch.Tensor:
        """float32 [N, C*Tp*P*P] on the patches' device, computed once."""
        if self._pixel_values is None:
            self._pixel_values = normalize_patches_torch(self.patches, self.pixel_offset, self.pixel_scale, self.temporal_patch_size)
        return self._pixel_values

    def model_inputs(self, pixel_dtype: torch.dtype | None = None) -> dict[str, Any]:
        """Keyword arguments of the model's forward; no pixels (None) when the micro-batch has no image."""
        has_images = self.num_images > 0
        pixels = self.pixel_values if has_images else None
        if pixels is not None and pixel_dtype is not None:
            pixels = pixels.to(pixel_dtype)
        return {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "max_seqlen": self.max_seqlen,
            "pixel_values": pixels,
            "image_grid_thw": self.image_grid_thw if has_images else None,
            "labels": self.labels,
        }

    _TENSORS = ("input_ids", "position_ids", "labels", "cu_seqlens", "patches", "image_grid_thw",
                "pixel_offset", "pixel_scale", "loss_positions", "image_positions")

    def _map(self, fn, skip: tuple[str, ...] = ()) -> "PackedBatch":
        names = [n for n in self._TENSORS if n not in skip and getattr(self, n) is not None]
        return replace(self, **{n: fn(getattr(self, n)) for n in names}, keys=list(self.keys), _pixel_values=None)

    def pin_memory(self) -> "PackedBatch":
        # torch's DataLoader pin thread calls this; the uint8 patches are what makes pinning cheap
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False, pixel_dtype: torch.dtype | None = None) -> "PackedBatch":
        """Copy to `device` and normalise the pixels there (then cast to pixel_dtype, e.g. the model's bf16).
        image_grid_thw stays where it is (the host): see the module docstring."""
        out = self._map(lambda t: t.to(device, non_blocking=non_blocking), skip=("image_grid_thw",))
        if out.num_patches:
            pv = out.pixel_values
            out._pixel_values = pv if pixel_dtype is None else pv.to(pixel_dtype)
        return out


def normalize_patches_torch(patches: torch.Tensor, offset: torch.Tensor, scale: torch.Tensor, temporal_patch_size: int) -> torch.Tensor:
    """uint8 [N, C, P, P] -> float32 [N, C*Tp*P*P]: shared.schema.normalize_patches in torch, bit-identical."""
    n, c, p, _ = patches.shape
    x = (patches.to(torch.float32) - offset.view(1, c, 1, 1)) / scale.view(1, c, 1, 1)
    return x.unsqueeze(2).expand(n, c, temporal_patch_size, p, p).reshape(n, c * temporal_patch_size * p * p)


@dataclass
class PackingSpec:
    """The facts of the shard set's processor that packing needs (from the manifest)."""

    image_token_id: int
    pad_token_id: int
    pixel_spec: PixelSpec
    pad_to_multiple_of: int = 1

    @classmethod
    def from_processor_identity(cls, identity: dict[str, Any], pad_to_multiple_of: int = 1) -> "PackingSpec":
        ids = identity["special_ids"]
        return cls(
            image_token_id=int(ids["image_pad"]),
            # <|endoftext|> is the Qwen tokenizers' pad token; the padding is masked everywhere anyway
            pad_token_id=int(ids.get("endoftext", 0)),
            pixel_spec=PixelSpec.from_dict(identity["pixel_spec"]),
            pad_to_multiple_of=pad_to_multiple_of,
        )


def shifted_labels(input_ids: np.ndarray, loss_mask: np.ndarray) -> np.ndarray:
    """labels[i] = input_ids[i+1] where loss_mask[i+1], else -100; the last position is always -100."""
    labels = np.full(input_ids.shape[0], IGNORE_INDEX, dtype=np.int64)
    labels[:-1] = np.where(loss_mask[1:].astype(bool), input_ids[1:], IGNORE_INDEX)
    return labels


def pack_samples(samples: list[Sample], spec: PackingSpec) -> PackedBatch:
    """Lay whole samples end to end as one micro-batch (an empty list gives a padding-only micro-batch)."""
    ps = spec.pixel_spec
    lengths = [s.num_tokens for s in samples]
    real = sum(lengths)
    m = spec.pad_to_multiple_of
    total = -(-real // m) * m or m  # round up to the multiple; an empty micro-batch is m padding tokens
    pad = total - real
    input_ids = np.empty(total, dtype=np.int64)
    labels = np.empty(total, dtype=np.int64)
    position_ids = np.empty((3, total), dtype=np.int64)
    at = 0
    num_loss = 0
    for s, n in zip(samples, lengths):
        ids = s.input_ids
        input_ids[at : at + n] = ids
        labels[at : at + n] = shifted_labels(ids, s.loss_mask)
        position_ids[:, at : at + n] = mrope_position_ids(ids, s.image_grid_thw, spec.image_token_id, ps.merge_size, s.key)
        num_loss += int(s.loss_mask[1:].sum())
        if s.loss_mask[0]:
            raise RecordError(f"{s.key}: the loss mask covers the first token, which no position predicts")
        at += n
    input_ids[at:] = spec.pad_token_id
    labels[at:] = IGNORE_INDEX
    position_ids[:, at:] = np.arange(pad)
    segments = lengths + ([pad] if pad else [])
    cu_seqlens = np.zeros(len(segments) + 1, dtype=np.int32)
    np.cumsum(segments, out=cu_seqlens[1:])
    grids = [np.asarray(s.image_grid_thw, dtype=np.int64).reshape(-1, 3) for s in samples]
    grid = np.concatenate(grids) if grids else np.zeros((0, 3), dtype=np.int64)
    patch_list = [s.patches for s in samples if s.patches.shape[0]]
    patches = (
        np.concatenate(patch_list) if patch_list else np.zeros((0, ps.channels, ps.patch_size, ps.patch_size), dtype=np.uint8)
    )
    if patches.shape[0] != int(grid.prod(axis=1).sum()):
        raise RecordError(f"{[s.key for s in samples]}: image_grid_thw and the pixel data disagree")
    offset, scale = ps.affine()
    return PackedBatch(
        input_ids=torch.from_numpy(input_ids),
        position_ids=torch.from_numpy(position_ids),
        labels=torch.from_numpy(labels),
        cu_seqlens=torch.from_numpy(cu_seqlens),
        max_seqlen=max(segments) if segments else 0,
        patches=torch.from_numpy(patches),
        image_grid_thw=torch.from_numpy(grid),
        pixel_offset=torch.from_numpy(offset.copy()),
        pixel_scale=torch.from_numpy(scale.copy()),
        temporal_patch_size=ps.temporal_patch_size,
        num_loss_tokens=num_loss,
        num_real_tokens=real,
        keys=[s.key for s in samples],
        loss_positions=torch.from_numpy(np.flatnonzero(labels != IGNORE_INDEX)),
        image_positions=torch.from_numpy(np.flatnonzero(input_ids == spec.image_token_id)),
    )
