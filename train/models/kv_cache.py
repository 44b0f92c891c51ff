"""The key/value cache of greedy decoding: each prompt is read once, then every new token costs one position.

One `KVCache` holds a batch of sequences (rows), each with its own length, for every attention layer:
`[rows, kv_heads, capacity, head_dim]` keys and values, allocated by each layer at its first write (so
tensor-parallel ranks hold their own heads, in the model's dtype). Two phases, set by the caller between
forwards (train/evaluate.py drives them):

- **prefill**: a packed micro-batch of whole prompts runs the ordinary varlen attention
  (`VarlenCoreAttention`); each layer also writes its rotated keys and its values into the rows of those
  prompts. Long batches prefill in several packed chunks, each into its own rows.
- **decode**: one new token per row, `T = rows`. Each layer writes the token's key and value at the row's
  length and attends the token's query over positions `0..length` of its row (two batched matmuls over the
  cached heads as they are, softmax in float32, the positions beyond a shorter row's length masked).

The cache travels to the attention layers inside the packed-sequence parameters
(`QwenPackedSeqParams.kv_cache`); `layer_number` (Megatron's, 1-based) keys the layers. Nothing here is
specific to a model family: RoPE is applied before the write (keys are cached rotated), and positions are the
caller's to pass (M-RoPE's text positions continue from the prompt's largest position, on all three axes).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_rows: int, capacity: int, device: torch.device | str):
        self.num_rows = num_rows
        self.capacity = capacity
        self.device = torch.device(device)
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.lengths = torch.zeros(num_rows, dtype=torch.long, device=self.device)
        self.max_length = 0  # on the host: decode attends over this many positions (+1), no sync per step
        self.decoding = False
        self._rows: torch.Tensor | None = None  # prefill: (row, column) of each real token of the packed chunk
        self._cols: torch.Tensor | None = None

    def prefill(self, rows: list[int], lengths: list[int]) -> None:
        """The next forward is a packed chunk of prompts (in this order, first token first) for these rows."""
        if any(length > self.capacity for length in lengths):
            raise ValueError(f"a prompt of {max(lengths)} tokens does not fit a cache of {self.capacity} positions")
        self.decoding = False
        counts = torch.tensor(lengths, dtype=torch.long)
        self._rows = torch.repeat_interleave(torch.tensor(rows, dtype=torch.long), counts).to(self.device)
        self._cols = torch.cat([torch.arange(n) for n in lengths]).to(self.device)
        self.lengths[torch.tensor(rows, device=self.device)] = counts.to(self.device)
        self.max_length = max(self.max_length, max(lengths))

    def decode(self) -> None:
        """The next forwards carry one token per row."""
        if self.max_length >= self.capacity:
            raise ValueError(f"the cache is full ({self.capacity} positions)")
        self.decoding = True

    def advance(self) -> None:
        """After a decode forward: every row grew by its one token."""
        self.lengths += 1
        self.max_length += 1

    def _buffers(self, layer: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            # kv heads before positions: a row's span of one head is contiguous, so the decode matmuls read the
            # cache in place
            shape = (self.num_rows, like.shape[1], self.capacity, like.shape[2])
            self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return self.keys[layer], self.values[layer]

    def store_prompt(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Prefill: key, value [T, kv_heads, head_dim] of the packed chunk; its padding tail is not stored."""
        k, v = self._buffers(layer, key)
        n = self._rows.shape[0]
        k[self._rows, :, self._cols] = key[:n]
        v[self._rows, :, self._cols] = value[:n]

    def attend(self, layer: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float) -> torch.Tensor:
        """Decode: query [rows, heads, dim] and the new key/value [rows, kv_heads, dim] -> [rows, heads, dim]."""
        k, v = self._buffers(layer, key)
        rows = torch.arange(self.num_rows, device=key.device)
        k[rows, :, self.lengths] = key
        v[rows, :, self.lengths] = value
        span = self.max_length + 1
        rows, heads, dim = query.shape
        groups = key.shape[1]
        # grouped-query attention without repeating the cached heads: the `heads // groups` query heads of a kv
        # head (h // rep, as in training) attend together, one batched matmul over [rows, groups]
        q = query.view(rows, groups, heads // groups, dim)
        scores = torch.matmul(q, k[:, :, :span].transpose(2, 3)).float() * scale  # [rows, groups, rep, span]
        future = torch.arange(span, device=key.device)[None, :] > self.lengths[:, None]  # [rows, span]
        probs = scores.masked_fill(future[:, None, None, :], float("-inf")).softmax(dim=-1).to(v.dtype)
        out = torch.matmul(probs, v[:, :, :span])  # [rows, groups, rep, dim]
        return out.reshape(rows, heads, dim)
