"""The Megatron backend: model, data-parallel wrapper and optimizer behind one small interface.

On GPUs this is Megatron-Core all the way: the Qwen-VL model of train/models on tensor-parallel layers,
`Float16Module` for bf16, Megatron's `DistributedDataParallel` and its distributed optimizer (fp32 master
weights, Adam states sharded over data-parallel ranks; torch kernels without Apex/TE).

Megatron's DDP buffers and optimizers are CUDA-only (they allocate on `torch.cuda` and assert CUDA tensor
types), so on a CPU machine (CI, laptops) the same model trains in fp32 with `torch.optim.AdamW` and a plain
gradient all-reduce. Both paths use the same loss, parameter groups (no weight decay on biases and norms, as
Megatron), clipping and schedule; tests/test_train_e2e.py exercises the CPU path end to end, and the GPU runs
in BENCHMARKS.md the Megatron one.

Loss: the model returns the per-token loss; each micro-batch contributes sum(loss) / (loss tokens of the
*global* batch). With `calculate_per_token_loss` Megatron's DDP sums (not averages) gradients over
data-parallel ranks, so the step's gradient is exactly that of the global per-token mean.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.config import TrainConfig
from train.distributed import World


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


def build_adamw(model: torch.nn.Module, cfg: TrainConfig) -> tuple[torch.optim.AdamW, list[torch.nn.Parameter]]:
    """torch AdamW with Megatron's parameter groups; also returns the parameters (decayed first)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.adam_beta1, cfg.adam_beta2),
        eps=cfg.adam_eps,
    )
    return optimizer, decay + no_decay


class _LocalDDP(torch.nn.Module):
    """CPU stand-in for Megatron's DDP: gradients summed over data-parallel ranks at the end of a step."""

    def __init__(self, module: torch.nn.Module, group):
        super().__init__()
        self.module = module
        self.group = group

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def finish_grad_sync(self) -> None:
        if dist.get_world_size(self.group) > 1:
            for p in self.module.parameters():
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=self.group)


class _TorchOptimizer:
    """AdamW with Megatron's interface: step() -> (ok, grad_norm, None), clipping inside."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig, tp_group):
        self.optimizer, self.params = build_adamw(model, cfg)
        self.clip = cfg.clip_grad
        self.tp_group = tp_group

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        grads = [p.grad for p in self.params if p.grad is not None]
        # The global norm: tensor-parallel shards hold disjoint parts of the split weights (summed over
        # the TP group); replicated weights (norms, the vision tower) are identical on every TP rank and
        # counted once, as Megatron's clip_grad_norm does.
        split = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2).sum()
            if getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                replicated += sq
        if dist.get_world_size(self.tp_group) > 1:
            dist.all_reduce(split, group=self.tp_group)
        norm = float((split + replicated).sqrt())
        if not math.isfinite(norm):
            return False, norm, None
        if self.clip > 0 and norm > self.clip:
            for g in grads:
                g.mul_(self.clip / (norm + 1e-6))
        self.optimizer.step()
        return True, norm, None

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state)


class MegatronEngine:
    name = "megatron"

    def __init__(self, hf_config, cfg: TrainConfig, world: World, *, init_from: str | None):
        from megatron.core import parallel_state

        from train.models.qwen_vl import build_model

        self.cfg = cfg
        self.world = world
        self.hf_config = hf_config
        self.cuda = world.device.type == "cuda"
        bf16 = cfg.bf16 and self.cuda
        overrides: dict[str, Any] = dict(
            tensor_model_parallel_size=cfg.tensor_parallel,
            pipeline_model_parallel_size=cfg.pipeline_parallel,
            sequence_parallel=cfg.sequence_parallel,
            calculate_per_token_loss=True,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_cpu_initialization=not self.cuda,
            perform_initialization=init_from is None,
        )
        from train.models import fused

        # torch.compile'd norm/RoPE (ours) and SwiGLU (Megatron's bias_activation_fusion, plain torch) on GPUs;
        # the CPU path stays eager and exact (and needs no compiler).
        use_fused = cfg.fused_kernels and self.cuda
        fused.set_enabled(use_fused)
        overrides["bias_activation_fusion"] = use_fused
        if cfg.recompute == "full":
            overrides.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
        elif cfg.recompute == "selective":
            overrides.update(recompute_granularity="selective")
        torch.manual_seed(cfg.seed)
        if self.cuda:
            from megatron.core import tensor_parallel

            tensor_parallel.model_parallel_cuda_manual_seed(cfg.seed)
        model = build_model(hf_config, **overrides)
        if init_from is not None:
            from train.models.convert import load_hf_checkpoint

            load_hf_checkpoint(model, init_from, tp_rank=world.tp_rank, tp_size=world.tp)
        self.compiled_layers = (0, 0)  # (decoder layers, vision blocks) running as compiled graphs
        # Whole-layer compile (train/models/layer_compile.py) where it was measured: one model replica per GPU
        # (tensor-parallel collectives and recomputation's checkpoint function untested compiled).
        if cfg.compile_layers and self.cuda and cfg.tensor_parallel == 1 and cfg.recompute == "none":
            from train.models.layer_compile import compile_layers

            self.compiled_layers = compile_layers(model)
        self.model_config = model.config
        self.inner = model  # the unwrapped QwenVLModel (checkpoints, export, generation)
        dp_group = parallel_state.get_data_parallel_group()
        if self.cuda:
            from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
            from megatron.core.transformer.module import Float16Module

            model = model.to(world.device)
            wrapped = Float16Module(model.config, model) if bf16 else model
            self.model = DistributedDataParallel(
                model.config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=True, use_distributed_optimizer=True, overlap_grad_reduce=False),
                wrapped,
            )
            self.optimizer = get_megatron_optimizer(
                OptimizerConfig(
                    optimizer="adam",
                    lr=cfg.lr,
                    min_lr=cfg.min_lr,
                    weight_decay=cfg.weight_decay,
                    adam_beta1=cfg.adam_beta1,
                    adam_beta2=cfg.adam_beta2,
                    adam_eps=cfg.adam_eps,
                    clip_grad=cfg.clip_grad,
                    bf16=bf16,
                    params_dtype=torch.bfloat16 if bf16 else torch.float32,
                    use_distributed_optimizer=True,
                ),
                [self.model],
            )
        else:
            self.model = _LocalDDP(model, dp_group)
            self.optimizer = _TorchOptimizer(model, cfg, parallel_state.get_tensor_model_parallel_group())

    # ---------------------------------------------------------------- one step

    def train_step(self, micro_batches: list, num_loss_tokens: int, lr: float) -> dict[str, Any]:
        """Forward/backward every micro-batch, sync gradients, clip, step. Returns loss sum and grad norm."""
        self.model.train()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.world.device, dtype=torch.float32)
        denom = float(max(1, num_loss_tokens))
        for mb in micro_batches:
            if mb.num_real_tokens == 0:
                continue  # an empty slot that only keeps micro-batch counts equal across ranks
            per_token = self.forward(mb, labels=True)
            loss = per_token.sum()
            (loss / denom).backward()
            loss_sum += loss.detach()
        self.model.finish_grad_sync()
        ok, grad_norm, _ = self.optimizer.step()
        return {"loss_sum": loss_sum, "grad_norm": grad_norm, "ok": ok}

    def forward(self, mb, labels: bool):
        return self.model(
            mb.input_ids,
            mb.position_ids,
            mb.cu_seqlens,
            mb.max_seqlen,
            mb.pixel_values,
            mb.image_grid_thw,
            mb.labels if labels else None,
            loss_index=mb.loss_positions if labels else None,
            image_index=mb.image_positions if mb.num_images else None,
        )

    @torch.no_grad()
    def eval_loss(self, mb) -> torch.Tensor:
        self.model.eval()
        return self.forward(mb, labels=True).sum()

    @torch.no_grad()
    def logits(self, mb) -> torch.Tensor:
        self.model.eval()
        return self.forward(mb, labels=False)

    # ---------------------------------------------------------------- checkpoints

    def save(self, ckpt: Path) -> None:
        """Per tensor-parallel rank: its model shard and optimizer state (the DP ranks' optimizer shards
        gathered to DP rank 0 in Megatron's DP-size-independent layout, so a run can resume on another
        number of data-parallel GPUs)."""
        w = self.world
        tag = f"tp{w.tp_rank:02d}"
        if self.cuda:
            self.optimizer.save_parameter_state(str(ckpt / f"optim_params_{tag}.pt"))  # collective over DP
        if w.dp_rank == 0:
            torch.save({k: v.detach().cpu() for k, v in self.inner.state_dict().items() if torch.is_tensor(v)}, ckpt / f"model_{tag}.pt")
            torch.save(self.optimizer.state_dict(), ckpt / f"optim_{tag}.pt")

    def load(self, ckpt: Path) -> None:
        from train.models.convert import load_megatron_state

        tag = f"tp{self.world.tp_rank:02d}"
        path = ckpt / f"model_{tag}.pt"
        if not path.exists():
            found = sorted(p.name for p in ckpt.glob("model_tp*.pt"))
            raise FileNotFoundError(
                f"{ckpt} has no {path.name} (it holds {', '.join(found)}): resume with the tensor_parallel size "
                f"it was saved with ({len(found)})"
            )
        load_megatron_state(self.inner, torch.load(path, map_location="cpu", weights_only=True))
        self.optimizer.load_state_dict(torch.load(ckpt / f"optim_{tag}.pt", map_location="cpu", weights_only=False))
        if self.cuda:
            load_parameter_state(self.optimizer, ckpt / f"optim_params_{tag}.pt")


def load_parameter_state(optimizer, path: Path) -> None:
    """Megatron's `load_parameter_state` for its distributed optimizer without Apex/TE, minus two bugs there.

    Without Apex/TE the distributed optimizer runs torch.optim.AdamW, whose per-parameter state holds a "step"
    tensor beside exp_avg/exp_avg_sq. Megatron's `load_state_dict` (called before this) puts one and the same
    step tensor into every parameter's state, and `load_parameter_state` copies *every* state key from the
    file, which holds param, exp_avg and exp_avg_sq only. So: (1) KeyError 'step'; (2) were it loaded, AdamW
    increments the shared step once per parameter, giving each parameter a wrong Adam bias correction after
    a resume. Both showed when a 2-GPU checkpoint was resumed on 1 H200 (docs/validation). Here the steps are
    set aside for the copy and put back as one tensor per parameter."""
    inner = [o.optimizer for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    set_aside = [{p: st.pop("step") for p, st in opt.state.items() if "step" in st} for opt in inner]
    try:
        optimizer.load_parameter_state(str(path))
    finally:
        for opt, steps in zip(inner, set_aside):
            for p, step in steps.items():
                opt.state[p]["step"] = step.clone()


def merged_model_state(ckpt: Path, hf_config) -> dict[str, torch.Tensor]:
    """The full (tensor-parallel size 1) model state of a checkpoint, for export."""
    from train.models.convert import merge_tensor_parallel

    files = sorted(ckpt.glob("model_tp*.pt"))
    if not files:
        raise FileNotFoundError(f"{ckpt} holds no model_tp*.pt: is it a geo3k Megatron checkpoint?")
    ranks = [torch.load(f, map_location="cpu", weights_only=True) for f in files]
    return ranks[0] if len(ranks) == 1 else merge_tensor_parallel(ranks)
