"""What both backends' optimizers share: the learning-rate schedule, Megatron's parameter groups, clipping.

No Megatron-Core import: the FSDP backend uses all of it, the Megatron backend's CPU path too (on GPUs Megatron's
distributed optimizer clips and steps by the same rule).
"""

from __future__ import annotations

import math

import torch

from shared.config import TrainConfig


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup from 0 over warmup_fraction of the steps, then cosine from lr to min_lr."""
    warmup = int(round(cfg.warmup_fraction * total))
    if warmup and step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * progress))


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    # Megatron's rule: biases and 1-D parameters (norm weights) get no weight decay.
    return name.endswith(".bias") or param.ndim == 1


def build_adamw(model: torch.nn.Module, cfg: TrainConfig, fused: bool = False) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """torch AdamW with Megatron's parameter groups; also returns the parameters (decayed first).

    fused: torch's fused AdamW, one `_fused_adamw_` call over all parameters (FSDP's DTensor shards included),
    instead of the default foreach implementation's dozen foreach ops, each a round of launches (and of DTensor
    dispatch); for GPUs. False keeps torch's default."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
        fused=fused or None,  # None: torch's default (foreach where it can)
    )
    return optimizer, decay + no_decay


def clip_and_step(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], max_norm: float,
                  norm: torch.Tensor) -> tuple[bool, float]:
    """Clip the gradients to `max_norm` (0: no clipping) by their global `norm` (0-dim, every rank's shards
    already counted), then step. Returns (whether the step was taken, the norm); a non-finite norm skips it.

    Megatron-Core's rule (clip_grad_by_total_norm_fp32): scale by max_norm / (norm + 1e-6) when that is below 1.
    The coefficient is computed in the norm's dtype, so a float64 norm clips as a Python float would."""
    grad_norm = float(norm)
    if not math.isfinite(grad_norm):
        return False, grad_norm
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm > 0 and grads:
        coef = max_norm / (norm + 1e-6)
        if coef < 1.0:
            # one multiply per tensor in the gradients' dtype (a float64 coefficient is rounded once, as a Python
            # scalar would be); works on FSDP's DTensor shards as on plain tensors
            torch._foreach_mul_(grads, coef.to(grads[0].dtype))
    optimizer.step()
    return True, grad_norm
