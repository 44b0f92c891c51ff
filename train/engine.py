"""The engine interface: what the trainer (train/trainer.py) and eval (train/evaluate.py) see of a backend.

    build     Engine(hf_config, train_config, world, init_from=ModelSource | None): model, wrapper, optimizer
    train     train_step(micro_batches, num_loss_tokens, lr) -> {"loss_sum", "grad_norm", "ok", ...}
    eval      evaluating() around eval_loss(mb) / logits(mb); prefill / decode where kv_cache is True
    ckpts     save(folder), load(folder) -> the (TP, EP) sizes it was saved with, or None

Two backends implement it: train/engine_megatron.py (Megatron-Core: TP, SP, EP, the distributed optimizer) and
train/engine_fsdp.py (transformers' model under FSDP2, no Megatron-Core import). What they share is written here
once: the step over micro-batches, the loss normalisation, and the forward arguments of a micro-batch; each
backend provides its model's forward, the start and end of a step (its gradient sync, clipping and optimizer),
and its checkpoints. `build_engine` imports the backend a run names and no other.

Loss: the model gives the CE sum over a micro-batch's loss positions; each micro-batch contributes sum / (loss
tokens of the *global* batch), and both backends sum (not average) gradients over data-parallel ranks, so the
step's gradient is exactly that of the global per-token mean whatever the number of ranks.
"""

from __future__ import annotations

import abc
import contextlib
from pathlib import Path
from typing import Any, NamedTuple

import torch

from shared.config import TrainConfig
from train.distributed import World


class ForwardArgs(NamedTuple):
    """One packed micro-batch as both models take it (batch dimension 1, left implicit; see QwenVLModel.forward)."""

    input_ids: torch.Tensor
    """int64 [T]"""
    position_ids: torch.Tensor
    """int64 [3, T]: M-RoPE positions, restarting per sample"""
    cu_seqlens: torch.Tensor
    """int32 [num_samples + 1]: sample boundaries (attention never crosses them)"""
    max_seqlen: int
    pixel_values: torch.Tensor | None
    """[num_patches, C*t*P*P], None when the micro-batch has no image"""
    image_grid_thw: torch.Tensor | None
    labels: torch.Tensor | None
    """int64 [T], shifted (-100: no loss); None for logits"""
    loss_positions: torch.Tensor | None
    """int64, ascending: where labels != -100, shipped by the data path so that no forward needs a host sync
    to find them (None: the model computes them)"""
    image_positions: torch.Tensor | None
    """int64, ascending: the image tokens, likewise"""


def forward_args(mb, labels: bool) -> ForwardArgs:
    """The forward arguments of a micro-batch (train/data/batch.py PackedBatch, or anything with its fields): with
    its labels and loss positions for the loss, without them for logits."""
    has_images = mb.num_images > 0
    return ForwardArgs(
        mb.input_ids,
        mb.position_ids,
        mb.cu_seqlens,
        mb.max_seqlen,
        mb.pixel_values if has_images else None,
        mb.image_grid_thw if has_images else None,
        mb.labels if labels else None,
        getattr(mb, "loss_positions", None) if labels else None,
        getattr(mb, "image_positions", None) if has_images else None,
    )


class Engine(abc.ABC):
    """A backend: its model (`model`, wrapped for training; `inner`, the unwrapped one), optimizer and checkpoints."""

    name: str
    """The backend's name (train.backend), recorded in every checkpoint."""
    cfg: TrainConfig
    world: World
    cuda: bool
    model: torch.nn.Module
    inner: torch.nn.Module
    optimizer: Any
    """Anything with param_groups (the step sets their lr)."""
    compiled_layers: tuple[int, int] = (0, 0)
    """(decoder layers, vision blocks) running as compiled graphs (train.compile_layers)."""
    steps_run = 0
    """Training steps this engine has run (train.compile_skip_guards_after counts them)."""

    collective_forward = False
    """Whether an eval or generation forward is a collective over the data-parallel ranks, so that every rank must
    run the same number of them (train/evaluate.py pads with empty forwards then)."""

    kv_cache = False
    """Whether greedy generation can prefill a kv_cache.KVCache and decode one token per row (prefill, decode)."""

    @property
    def collective_train_forward(self) -> bool:
        """Whether a training forward is a collective: then the padding-only micro-batches that keep every rank's
        count equal run too, else they are skipped."""
        return self.collective_forward

    # ---------------------------------------------------------------- what a backend provides

    @abc.abstractmethod
    def forward(self, args: ForwardArgs, *, training: bool = False) -> torch.Tensor:
        """The float32 CE sum over the loss positions when args.labels is given, else logits [T, vocab]."""

    @abc.abstractmethod
    def _start_step(self) -> None:
        """Clear what the last step left (gradients, and whatever the backend accumulates per step)."""

    @abc.abstractmethod
    def _finish_step(self) -> tuple[bool, float]:
        """After every backward: sync the gradients, clip, step. Returns (step taken, global grad norm)."""

    def _before_forward(self, mb, num_micro_batches: int, last: bool) -> None:
        """Called before each training forward; `last`: its backward is the step's last (the Megatron backend scales
        its MoE aux loss here, the FSDP backend decides when gradients are reduced)."""

    def _step_metrics(self) -> dict[str, float]:
        """Extra figures for the step's log line (the Megatron backend's expert load)."""
        return {}

    @abc.abstractmethod
    def save(self, ckpt: Path) -> None:
        """Write this rank's part of the model and optimizer state into the folder (a collective)."""

    @abc.abstractmethod
    def load(self, ckpt: Path) -> tuple[int, int] | None:
        """Read a checkpoint this backend saved; returns the (TP, EP) sizes it was saved with, where it has them."""

    def prefill(self, mb, cache, last: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} engine has no KV cache (kv_cache is False)")

    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        raise NotImplementedError(f"the {self.name} engine has no KV cache (kv_cache is False)")

    # ---------------------------------------------------------------- written once

    def train_step(self, micro_batches: list, num_loss_tokens: int, lr: float) -> dict[str, Any]:
        """Forward/backward every micro-batch, then sync, clip and step. Returns the loss sum (this rank's, on the
        device), the grad norm, whether the step was taken, and the backend's extra metrics."""
        self.model.train()
        self._start_step()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.world.device, dtype=torch.float32)
        denom = float(max(1, num_loss_tokens))
        # an empty slot only keeps micro-batch counts equal across ranks: it runs where other ranks need it
        runs = [mb for mb in micro_batches if mb.num_real_tokens or self.collective_train_forward]
        with self._guard_stance():
            for i, mb in enumerate(runs):
                self._before_forward(mb, len(micro_batches), last=i == len(runs) - 1)
                loss = self.forward(forward_args(mb, labels=True), training=True)
                (loss / denom).backward()
                loss_sum += loss.detach().float()
        ok, grad_norm = self._finish_step()
        self.steps_run += 1
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "ok": ok, **self._step_metrics()}

    def _guard_stance(self):
        """train.compile_skip_guards_after: once that many steps have run, the compiled layers' calls check only
        the guards that tell their cached graphs apart (tensor sizes and size ranges, dtypes, strides, grad mode,
        and whatever made a graph recompile so far) instead of all of them (~0.2 ms of host time a call on a GPU,
        ~300 calls a step); a call no cached graph fits compiles one with every guard. Only around the training
        forwards and backwards: evaluation and generation keep every guard."""
        n = self.cfg.compile_skip_guards_after
        if n and any(self.compiled_layers) and self.steps_run >= n:
            from train.models.layer_compile import skipping_guards

            return skipping_guards()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def evaluating(self):
        """Around an eval: every rank enters it, also one without eval samples (a backend that must prepare
        collectively extends it)."""
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    @torch.no_grad()
    def eval_loss(self, mb) -> torch.Tensor:
        """The CE sum over the micro-batch's loss positions (float32, on the device)."""
        return self.forward(forward_args(mb, labels=True)).float()

    @torch.no_grad()
    def logits(self, mb) -> torch.Tensor:
        """Logits [T, vocab] of every position of the micro-batch."""
        return self.forward(forward_args(mb, labels=False))


def build_engine(hf_config, cfg: TrainConfig, world: World, *, init_from=None) -> Engine:
    """The engine of cfg.backend. Only that backend's module is imported: an FSDP run never imports Megatron-Core
    (an optional dependency)."""
    if cfg.backend == "fsdp":
        from train.engine_fsdp import FSDPEngine as cls
    else:
        from train.engine_megatron import MegatronEngine as cls
    return cls(hf_config, cfg, world, init_from=init_from)
