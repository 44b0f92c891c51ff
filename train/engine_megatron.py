"""The Megatron backend: model, data-parallel wrapper and optimizer behind the engine interface (train/engine.py).

On GPUs this is Megatron-Core all the way: the Qwen-VL model of train/models on tensor-parallel layers,
`Float16Module` for bf16, Megatron's `DistributedDataParallel` and its distributed optimizer (fp32 master
weights, Adam states sharded over data-parallel ranks; torch kernels without Apex/TE).

Megatron's DDP buffers and optimizers are CUDA-only (they allocate on `torch.cuda` and assert CUDA tensor
types), so on a CPU machine (CI, laptops) the same model trains in fp32 with `torch.optim.AdamW` and a plain
gradient all-reduce; the model itself, its tensor/sequence/expert-parallel layers and Megatron's gradient
finalisation run as on GPUs (train/distributed.py). Both paths use the same loss, parameter groups (no weight
decay on biases and norms, as Megatron), clipping and schedule; tests/test_train_e2e.py and
tests/test_parallel_layouts.py exercise the CPU path end to end, and the GPU runs in BENCHMARKS.md the
Megatron one.

Loss: the model returns the per-token loss; each micro-batch contributes sum(loss) / (loss tokens of the
*global* batch). With `calculate_per_token_loss` Megatron's DDP sums (not averages) gradients over
data-parallel ranks, so the step's gradient is exactly that of the global per-token mean.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from shared.config import TrainConfig
from train import grad_accum
from train.distributed import World
from train.engine import Engine, ForwardArgs, forward_args
from train.optim import build_adamw, clip_and_step


class _LocalDDP(torch.nn.Module):
    """CPU stand-in for Megatron's DDP: gradients summed over data-parallel ranks at the end of a step.

    Expert weights (Megatron marks them `allreduce=False`) differ between expert-parallel ranks, so their
    gradients are summed over the expert-data-parallel group instead, as Megatron's DDP does. Megatron's
    `finalize_model_grads` calls `finish_grad_sync` and then reduces what the parallel layout leaves partial
    (see MegatronEngine.train_step); `ddp_config` is the one field it reads."""

    def __init__(self, module: torch.nn.Module):
        from megatron.core import parallel_state
        from megatron.core.distributed import DistributedDataParallelConfig

        super().__init__()
        self.module = module
        self.ddp_config = DistributedDataParallelConfig()
        self.groups = {
            True: parallel_state.get_data_parallel_group(),
            False: parallel_state.get_expert_data_parallel_group(),
        }

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def zero_grad_buffer(self) -> None:
        for p in self.module.parameters():
            p.grad = None

    def finish_grad_sync(self, force_all_reduce: bool = False) -> None:
        for p in self.module.parameters():
            group = self.groups[getattr(p, "allreduce", True)]
            if dist.get_world_size(group) > 1:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                dist.all_reduce(p.grad, group=group)


class _TorchOptimizer:
    """AdamW with Megatron's interface: step() -> (ok, grad_norm, None), clipping inside."""

    def __init__(self, model: torch.nn.Module, cfg: TrainConfig):
        from megatron.core import parallel_state

        self.optimizer, self.params = build_adamw(model, cfg)
        self.clip = cfg.clip_grad
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.expert_group = parallel_state.get_expert_tensor_and_model_parallel_group()

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def step(self):
        # The global norm, as Megatron's clip_grad_norm computes it: tensor-parallel shards hold disjoint parts
        # of the split weights (summed over the TP group); the experts are split over the expert-tensor and
        # expert-parallel ranks (summed over that group); replicated weights (norms, the vision tower) are
        # identical on every TP rank and counted once.
        split = torch.zeros((), dtype=torch.float64)
        experts = torch.zeros((), dtype=torch.float64)
        replicated = torch.zeros((), dtype=torch.float64)
        for p in self.params:
            if p.grad is None:
                continue
            sq = p.grad.double().pow(2).sum()
            if getattr(p, "is_expert_weight", False):
                experts += sq
            elif getattr(p, "tensor_model_parallel", False):
                split += sq
            else:
                replicated += sq
        for part, group in ((split, self.tp_group), (experts, self.expert_group)):
            if dist.get_world_size(group) > 1:
                dist.all_reduce(part, group=group)
        ok, norm = clip_and_step(self.optimizer, self.params, self.clip, (split + experts + replicated).sqrt())
        return ok, norm, None


def _foreach_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """Megatron's multi_tensor_l2norm interface: the norm of all tensors, as a [1] fp32 CUDA tensor, in two
    kernels. Megatron's Apex-free fallback builds a host tensor from one CUDA scalar per tensor: a host sync per
    parameter (541 a step for Qwen3-VL-2B), each draining the GPU queue."""
    norms = torch._foreach_norm(tensor_lists[0])
    return torch.linalg.vector_norm(torch.stack(norms).float()).reshape(1), None


def _foreach_scale(chunk_size, noop_flag, tensor_lists, scale):
    """Megatron's multi_tensor_scale interface (dst = src * scale) as foreach kernels (the fallback: two per tensor)."""
    src, dst = tensor_lists
    if all(a is b for a, b in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def _fast_torch_optimizer(optimizer) -> None:
    """Without Apex or Transformer Engine Megatron-Core steps torch's AdamW in its default (foreach) form and
    takes gradient norms and clipping scales through per-tensor Python fallbacks. Here: torch's fused AdamW
    (one kernel pass over the fp32 master shards; the same update rule) and foreach norm and scale. Installed
    only in place of Megatron's local fallbacks; with Apex or TE their kernels stay."""
    from megatron.core import utils as mcore_utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is mcore_utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = _foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is mcore_utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = _foreach_scale
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        adam = getattr(inner, "optimizer", None)
        if isinstance(adam, torch.optim.AdamW) and not adam.state:  # before its first step: the state is made fused
            for group in adam.param_groups:
                group.update(fused=True, foreach=False)


class MegatronEngine(Engine):
    name = "megatron"
    kv_cache = True
    """Greedy generation prefills a KVCache and decodes one token per row (train/models/kv_cache.py)."""

    def __init__(self, hf_config, cfg: TrainConfig, world: World, *, init_from=None):
        """init_from: a train.models.source.ModelSource with weights, or None for random init."""
        from megatron.core import parallel_state

        from train.models.qwen_vl import build_model

        self.cfg = cfg
        self.world = world
        self.hf_config = hf_config
        self.cuda = world.device.type == "cuda"
        bf16 = cfg.bf16 and self.cuda
        overrides: dict[str, Any] = dict(
            tensor_model_parallel_size=cfg.tensor_parallel,
            sequence_parallel=cfg.sequence_parallel,
            expert_model_parallel_size=cfg.expert_parallel,
            calculate_per_token_loss=True,
            bf16=bf16,
            params_dtype=torch.bfloat16 if bf16 else torch.float32,
            use_cpu_initialization=not self.cuda,
            perform_initialization=init_from is None,
        )
        from train.models import attention, fused

        attention.set_backend(cfg.attention_backend, world.device, torch.bfloat16 if bf16 else torch.float32,
                              vision=cfg.vision_attention_backend)
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
        if getattr(hf_config.text_config, "num_experts", 0) and cfg.moe_aux_loss:
            # transformers' load-balancing loss coefficient, applied per MoE layer (Megatron's aux_loss)
            overrides.update(moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=hf_config.text_config.router_aux_loss_coef)
        model = build_model(hf_config, grouped_experts=cfg.moe_grouped_gemm, **overrides)
        if init_from is not None:
            from train.models.convert import load_megatron_state, shard_for_rank
            from train.models.source import full_megatron_state

            full = full_megatron_state(init_from)
            load_megatron_state(model, shard_for_rank(full, hf_config, tp_rank=world.tp_rank, tp_size=world.tp, ep_rank=world.ep_rank, ep_size=world.ep))
            del full
        self.fused_wgrad_layers = 0  # linear and norm layers whose weight gradients go straight into main_grad
        # Whole-layer compile (train/models/layer_compile.py) where it was measured: one model replica per GPU
        # (tensor-parallel collectives and recomputation's checkpoint function untested compiled).
        if cfg.compile_layers and self.cuda and cfg.tensor_parallel == 1 and cfg.recompute == "none":
            from train.models.layer_compile import compile_layers

            self.compiled_layers = compile_layers(model, cpp_wrapper=cfg.compile_cpp_wrapper)
        self.model_config = model.config
        self.inner = model  # the unwrapped QwenVLModel (checkpoints, export, generation)
        from train.models.qwen_vl import LocalTopKRouter

        self.routers = [m for m in model.modules() if isinstance(m, LocalTopKRouter)]
        from megatron.core.distributed import finalize_model_grads

        self._finalize_grads = finalize_model_grads
        if self.cuda:
            from megatron.core.distributed import DistributedDataParallelConfig
            from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
            from megatron.core.transformer.module import Float16Module

            model = model.to(world.device)
            wrapped = Float16Module(model.config, model) if bf16 else model
            self.model = grad_accum.distributed_data_parallel()(  # Megatron's DDP, its fp32 accumulation vectorised
                model.config,
                DistributedDataParallelConfig(grad_reduce_in_fp32=cfg.grad_reduce_in_fp32, use_distributed_optimizer=True,
                                              overlap_grad_reduce=False),
                wrapped,
            )
            # after DDP: the buffers' main_grad views exist now (overlap_grad_reduce is off, as fusion needs)
            fuse = cfg.gradient_accumulation_fusion and not self.model.ddp_config.overlap_grad_reduce
            self.fused_wgrad_layers = grad_accum.fuse_weight_gradients(model) if fuse else 0
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
            _fast_torch_optimizer(self.optimizer)
        else:
            self.model = _LocalDDP(model)
            self.optimizer = _TorchOptimizer(model, cfg)

    # ---------------------------------------------------------------- one step

    def _start_step(self) -> None:
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        for router in self.routers:
            router.routing_stats = None

    def _finish_step(self) -> tuple[bool, float]:
        # Data-parallel reduction, then what the layout leaves partial on each rank: weights replicated over
        # tensor-parallel ranks that see only part of the computation (Qwen3's q/k norms, which act on this
        # rank's heads; every norm and router under sequence parallelism, which see this rank's tokens) are
        # summed over the TP group, so all copies take the same update. Megatron-Core's own function, on
        # both the GPU path and the CPU one (_LocalDDP).
        self._finalize_grads([self.model])
        ok, grad_norm, _ = self.optimizer.step()
        return ok, grad_norm

    def _before_forward(self, mb, num_micro_batches: int, last: bool) -> None:
        """The load-balancing loss enters the step as the mean over all micro-batches of all data-parallel
        ranks (per MoE layer, times the config's router_aux_loss_coef). Megatron multiplies each micro-batch's
        aux loss by its token count (it expects a later division by the global token count, which this engine
        does not do: its main loss is already divided by the global loss tokens), so the scale undoes that."""
        if not (self.cfg.moe_aux_loss and self.routers):
            return
        from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, clear_aux_losses_tracker

        router_tokens = mb.num_tokens // self.world.tp if self.cfg.sequence_parallel else mb.num_tokens
        scale = 1.0 / (max(1, router_tokens) * num_micro_batches * self.world.dp)
        MoEAuxLossAutoScaler.set_loss_scale(torch.tensor(scale, device=self.world.device))
        clear_aux_losses_tracker()  # logged from the routers' own statistics instead (_step_metrics)

    def _step_metrics(self) -> dict[str, float]:
        """Expert load of this step, all ranks together (one all-reduce): `moe_imbalance` = tokens of the
        busiest expert over the mean, averaged over MoE layers (1.0 is perfect balance), `moe_imbalance_max`
        its worst layer, and `moe_aux_loss` the load-balancing loss num_experts * sum_e f_e * P_e (f: share of
        routed tokens, P: mean router probability; 1.0 when balanced), averaged over layers."""
        stats = [r.routing_stats for r in self.routers if r.routing_stats is not None]
        if not stats:
            return {}
        stats = torch.stack(stats)  # [layers, 2, experts]
        if dist.is_initialized() and dist.get_world_size() > 1:
            # every rank routes its own tokens over all experts; TP ranks without SP route the same tokens
            # twice, a factor that the ratios below cancel
            dist.all_reduce(stats)
        counts, prob_sums = stats[:, 0], stats[:, 1]
        imbalance = counts.max(dim=1).values / counts.mean(dim=1).clamp_min(1e-9)
        f = counts / counts.sum(dim=1, keepdim=True).clamp_min(1e-9)
        probs = prob_sums / prob_sums.sum(dim=1, keepdim=True).clamp_min(1e-9)
        aux = counts.shape[1] * (f * probs).sum(dim=1)
        out = torch.stack([imbalance.mean(), imbalance.max(), aux.mean()]).tolist()
        return dict(zip(("moe_imbalance", "moe_imbalance_max", "moe_aux_loss"), out))

    def _model_forward(self, args: ForwardArgs, **extra):
        # the tensors positionally: Float16Module casts its positional inputs to bf16, not its keyword ones
        return self.model(*args[:7], loss_index=args.loss_positions, image_index=args.image_positions, **extra)

    def forward(self, args: ForwardArgs, *, training: bool = False) -> torch.Tensor:
        out = self._model_forward(args)
        return out if args.labels is None else out.sum()  # the model gives the per-token loss [T]

    def per_token_loss(self, mb) -> torch.Tensor:
        """float32 [T], 0 where there is no label: to compare token by token (bench/validate_megatron_gpu.py)."""
        return self._model_forward(forward_args(mb, labels=True))

    @property
    def collective_forward(self) -> bool:
        """Expert parallelism's all-to-all makes every forward a collective over the data-parallel ranks."""
        return self.world.ep > 1

    @torch.no_grad()
    def prefill(self, mb, cache, last: torch.Tensor) -> torch.Tensor:
        """Logits [len(last), vocab] at positions `last` of a packed micro-batch of prompts, writing their keys and
        values into `cache`."""
        return self._model_forward(forward_args(mb, labels=False), logits_index=last, kv_cache=cache)

    @torch.no_grad()
    def decode(self, input_ids: torch.Tensor, position_ids: torch.Tensor, cache) -> torch.Tensor:
        """Logits [rows, vocab] of one new token per cache row (input_ids [rows], position_ids [3, rows])."""
        cu = torch.arange(input_ids.shape[0] + 1, dtype=torch.int32, device=input_ids.device)
        return self.model(input_ids, position_ids, cu, 1, None, None, None, kv_cache=cache)

    # ---------------------------------------------------------------- checkpoints

    def save(self, ckpt: Path) -> None:
        """Per tensor-parallel rank: its model shard and its optimizer state by parameter name, gathered over
        data-parallel ranks (train/megatron_state.py), so a run can resume on another number of GPUs; a MoE
        model's experts per (TP, EP) rank in files of their own."""
        from megatron.core import parallel_state

        from train.megatron_state import file_name, optimizer_state
        from train.models.convert import is_expert_key

        w = self.world
        optim = optimizer_state(self._optimizer_core, self._named_params, distributed=self.cuda)  # collective over DP
        model = {k: v.detach().cpu() for k, v in self.inner.state_dict().items() if torch.is_tensor(v)}
        experts = {k for k in model if is_expert_key(k)}
        if w.dp_rank == 0:  # dense weights: the same on every DP (and EP) rank
            torch.save({k: v for k, v in model.items() if k not in experts}, ckpt / file_name("model", w.tp_rank))
            torch.save({**optim, "params": {k: v for k, v in optim["params"].items() if k not in experts}}, ckpt / file_name("optim", w.tp_rank))
        if experts and parallel_state.get_expert_data_parallel_rank() == 0:  # each EP rank's own experts
            torch.save({k: model[k] for k in experts}, ckpt / file_name("experts", w.tp_rank, w.ep_rank))
            torch.save({**optim, "params": {k: v for k, v in optim["params"].items() if k in experts}},
                       ckpt / file_name("optim_experts", w.tp_rank, w.ep_rank))

    def load(self, ckpt: Path) -> tuple[int, int]:
        """Load a checkpoint of any tensor- and expert-parallel layout (merged and re-split when it differs from
        this run's). Returns the (TP, EP) sizes it was saved with."""
        from train.megatron_state import load_optimizer_state, resharded
        from train.models.convert import load_megatron_state

        w = self.world
        model, optim, saved = resharded(ckpt, self.hf_config, tp_rank=w.tp_rank, tp_size=w.tp, ep_rank=w.ep_rank, ep_size=w.ep)
        load_megatron_state(self.inner, model)
        load_optimizer_state(self._optimizer_core, self._named_params, optim, distributed=self.cuda)
        return saved

    @property
    def _named_params(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]

    @property
    def _optimizer_core(self):
        """Megatron's (chained) distributed optimizer on GPUs; torch AdamW itself on CPU."""
        return self.optimizer if self.cuda else self.optimizer.optimizer


def merged_model_state(ckpt: Path, hf_config) -> dict[str, torch.Tensor]:
    """The full (TP 1, EP 1) model state of a checkpoint, for export."""
    from train.megatron_state import full_model_state

    return full_model_state(ckpt)
