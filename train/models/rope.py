"""Multimodal RoPE (M-RoPE) exactly as the transformers Qwen-VL models compute it.

Each token has three positions (temporal, height, width), shape [3, T]. Every rotary frequency pair is
driven by one of the three, chosen by `mrope_section` (pairs per axis, summing to head_dim / 2):

- Qwen2.5-VL, *contiguous*: the first `s[0]` pairs follow t, the next `s[1]` follow h, the last `s[2]` w.
  This is also what Megatron-Core's own `MultimodalRotaryEmbedding` does.
- Qwen3-VL, *interleaved*: pair j follows h when j % 3 == 1 and j < 3 * s[1], w when j % 3 == 2 and
  j < 3 * s[2], t otherwise. Megatron-Core has no such mode, hence this module.

The output is Megatron's rotary tensor, angles of shape [T, B, 1, head_dim] in the rotate-half layout
(`cat(freqs, freqs)`), which Megatron's attention turns into cos/sin per token.
"""

from __future__ import annotations

import torch


def mrope_angles(
    position_ids: torch.Tensor,
    inv_freq: torch.Tensor,
    mrope_section: list[int],
    interleaved: bool,
) -> torch.Tensor:
    """position_ids [3, ..., T] -> rotation angles [..., T, head_dim] (float32)."""
    assert position_ids.shape[0] == 3, "M-RoPE positions are [3, ..., tokens]"
    assert sum(mrope_section) == inv_freq.numel(), "mrope_section must sum to head_dim / 2"
    # Same arithmetic as transformers (float positions times float32 inverse frequencies), so that
    # the angles are bit-identical and differences can only come from the layers.
    freqs = position_ids[..., None].float() * inv_freq.float()  # [3, ..., T, D/2]
    if interleaved:
        out = freqs[0].clone()
        for axis in (1, 2):
            idx = slice(axis, mrope_section[axis] * 3, 3)
            out[..., idx] = freqs[axis, ..., idx]
    else:
        chunks = freqs.split(mrope_section, dim=-1)
        out = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)
    return torch.cat((out, out), dim=-1)


def rope_inv_freq(head_dim: int, theta: float, device=None) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))


class QwenMRoPE(torch.nn.Module):
    """Drop-in for Megatron-Core's `MultimodalRotaryEmbedding` inside `GPTModel` (same call signature).

    The inverse frequencies are recomputed in float32 on every call instead of living in a buffer:
    Megatron's mixed-precision wrapper casts buffers to bf16, which would coarsen the angles.
    """

    def __init__(self, head_dim: int, theta: float, mrope_section: list[int], interleaved: bool):
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self.mrope_section = list(mrope_section)
        self.interleaved = interleaved

    def forward(self, position_ids: torch.Tensor, mrope_section=None, cp_group=None, **kwargs) -> torch.Tensor:
        # position_ids: [3, B, T] -> [T, B, 1, head_dim]
        if cp_group is not None and cp_group.size() > 1:
            raise ValueError("context parallelism is not supported with M-RoPE here; set context_parallel_size=1")
        inv_freq = rope_inv_freq(self.head_dim, self.theta, device=position_ids.device)
        angles = mrope_angles(position_ids, inv_freq, self.mrope_section, self.interleaved)  # [B, T, D]
        return angles.transpose(0, 1).unsqueeze(2).contiguous()

    def extra_repr(self) -> str:
        kind = "interleaved" if self.interleaved else "contiguous"
        return f"head_dim={self.head_dim}, theta={self.theta}, mrope_section={self.mrope_section} ({kind})"
