"""The FSDP backend: transformers' own Qwen-VL model, sharded with PyTorch FSDP2, behind the engine interface.

The engine interface of train/engine.py, as train/engine_megatron.py implements it, so the loop, data path,
schedule, eval, logging and export of train/trainer.py are shared; only this file differs. Nothing here imports
Megatron-Core (an optional dependency).

    model     AutoModelForImageTextToText (Qwen2.5-VL / Qwen3-VL / Qwen3-VL-MoE) built from the run's config:
              random init (train.random_init) or the weights of an HF checkpoint (directory or hub id)
    attention every text and vision attention module runs `attention.varlen_attention` through transformers'
              attention interface; the packed micro-batch's cu_seqlens reach it as `cu_seq_lens_q/k` kwargs,
              so attention never crosses samples (the data path's per-sample M-RoPE positions go in as the
              model's 3-row position_ids, shape [3, 1, T])
    sharding  `fully_shard` on each decoder layer and vision block (the model's `_no_split_modules`), then the
              root (embeddings, tied LM head, final norm, patch embedding and mergers); one process shards the
              root alone (the whole model, one group: no per-layer hooks). One data-parallel mesh
              over all processes; no tensor parallelism. On GPUs bf16 compute with fp32 sharded master weights
              and fp32 gradient reduction (MixedPrecisionPolicy); on CPU plain fp32 (gloo). One process gathers
              each layer once per step, not in every forward and backward (a gather is a copy there), and
              reduces the gradients once per step, in the last micro-batch's backward
    compile   on GPUs (train.compile_layers, recompute none) each decoder layer and vision block runs as one
              compiled graph, shared by all layers of a kind; FSDP's hooks stay eager around it (layer_compile.py)
    recompute train.recompute != none -> transformers' gradient checkpointing on every layer and vision block
              (non-reentrant; FSDP2's hooks run inside the checkpointed call, which FSDP2 supports).
              "selective" has no transformers equivalent and is treated as "full"
    loss      labels arrive shifted (-100 elsewhere), so the LM head and cross entropy run here, not in
              transformers: only the loss positions go through the head, in chunks of LOSS_CHUNK tokens, each
              recomputed in backward, so the full [T, vocab] fp32 logits never exist. sum(CE) / (loss tokens
              of the *global* batch), gradients summed (not averaged) over ranks: the step's gradient is that of
              the global per-token mean, as the Megatron backend's
    optimizer AdamW (fused on GPUs) with Megatron's parameter groups (no decay on biases and 1-D weights),
              gradient clipping on the global norm (DTensor-aware), the shared lr schedule (all in train/optim.py
              but the norm)
    ckpts     torch.distributed.checkpoint (DCP) of the model and optimizer state dicts, sharded per rank: a run
              resumes on any number of processes. `full_model_state` reads the model part back without a
              process group, for `geo3k export`

Collectives. FSDP all-gathers every layer's parameters in its forward, so all ranks must run the same forwards:
- training runs every micro-batch, also the padding-only ones (the loader gives every rank the same count), and
  a micro-batch without images still runs the vision tower on a dummy image (its output times 0 joins the loss);
- eval and generation run a different number of forwards per rank (greedy decoding stops early; a rank may hold
  no eval sample at all), so `evaluating()`, which the trainer enters on every rank, gathers all parameters once
  and keeps them gathered until eval ends: the forwards in between need no collective. This holds the full model
  on each GPU during eval.
"""

from __future__ import annotations

import contextlib
import dataclasses
import types
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils.checkpoint

from shared.config import TrainConfig
from shared.errors import UserError
from shared.schema import IGNORE_INDEX
from train import grad_accum
from train.distributed import World
from train.engine import Engine, ForwardArgs
from train.optim import build_adamw, clip_and_step
from train.models.attention import use_varlen_attention
from train.models.vision import encode_images, linear_patch_embed, place_image_features

LOSS_CHUNK = 1024
"""Loss tokens per LM-head chunk: [1024, vocab 151936] fp32 logits are 0.6 GB, alive one chunk at a time."""
DCP_DIR = "dcp"


class FSDPConfigError(UserError, ValueError):
    """A setting the FSDP backend cannot honour."""


# ---------------------------------------------------------------- model


def _model_kwargs(hf_config, cuda: bool) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(dtype=torch.float32, attn_implementation="sdpa")
    if cuda and getattr(hf_config.text_config, "num_experts", 0):
        # all experts of a layer in grouped GEMMs (torch._grouped_mm) instead of a Python loop over them
        kwargs["experts_implementation"] = "grouped_mm"
    return kwargs


def build_hf_model(hf_config, init_from, seed: int, *, materialize: bool = True, cuda: bool = False) -> torch.nn.Module:
    """The transformers model in fp32: random (seeded) or from a checkpoint, on the CPU; with materialize=False
    only its structure, on the meta device (no memory), to be sharded and filled from rank 0."""
    import copy

    from transformers import AutoModelForImageTextToText

    # The model gets its own config: use_varlen_attention switches the attention name on it, which must not
    # reach the caller's config (or any other model built from it).
    hf_config = copy.deepcopy(hf_config)
    kwargs = _model_kwargs(hf_config, cuda)
    if not materialize:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(hf_config, **kwargs)
    elif init_from is None:
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(hf_config, **kwargs)
    else:
        if init_from.is_geo3k_checkpoint:
            raise FSDPConfigError(
                f"train.backend=fsdp starts from transformers folders and hub ids; export {init_from.weights} first "
                "(geo3k export) and set model.name_or_path to the export")
        model = AutoModelForImageTextToText.from_pretrained(str(init_from.weights), config=hf_config, **kwargs)
    use_varlen_attention(model)
    language_model = model.model.language_model
    if hasattr(language_model, "_deepstack_process"):  # Qwen3-VL: packed_forward passes the image positions
        language_model._deepstack_process = types.MethodType(_deepstack_at_positions, language_model)
    if kwargs.get("experts_implementation") and getattr(model.config, "_experts_implementation", None) != "grouped_mm":
        import transformers

        print(f"note: transformers {transformers.__version__} kept its per-expert loop (no grouped_mm experts)", flush=True)
    return model


def _deepstack_at_positions(self, hidden_states, positions, visual_embeds):
    """Qwen3-VL's deepstack addition (`_deepstack_process`) at the image tokens' indices instead of under their
    boolean mask: indexing by a mask sizes its output from the mask's contents, a host sync per use (two per
    deepstack layer); `positions` (ascending, so in the mask's order) are the same rows, the same sums. A mask
    (transformers' own forward) takes transformers' path."""
    if positions.dtype == torch.bool:
        return type(self)._deepstack_process(self, hidden_states, positions, visual_embeds)
    positions = positions.to(hidden_states.device)
    # one add per row at unique indices: exactly hidden + embeds there, as the masked version computes
    return hidden_states.index_add(1, positions, visual_embeds.to(hidden_states.device, hidden_states.dtype)[None])


def _fill_from_rank0(model: torch.nn.Module, source: torch.nn.Module | None, device: torch.device) -> None:
    """Allocate the sharded meta `model` on `device` and fill it from rank 0's whole `source` model: each rank
    receives only its shards of the parameters, and the buffers (rotary frequencies, not in the state dict's
    persistent part) whole."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model.to_empty(device=device)
    state = source.state_dict() if source is not None else {}
    set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    source_buffers = dict(source.named_buffers()) if source is not None else {}
    for name, buf in model.named_buffers():
        if source is not None:
            buf.copy_(source_buffers[name].to(buf.device))
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.broadcast(buf, src=0)


def _ce_chunk(h: torch.Tensor, weight: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(F.linear(h, weight).float(), y, reduction="sum")


def chunked_ce_sum(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = LOSS_CHUNK, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """sum over labels != -100 of CE(hidden @ weight.T, label), in fp32, never holding more than one chunk's logits.

    hidden: [T, H]; weight: [V, H]; labels: [T]. Positions without a label skip the head entirely (for Geo3K the
    prompt is most of the tokens). In training each chunk's logits are recomputed in backward. keep: those
    positions, ascending, when the data path ships them (PackedBatch.loss_positions): no host sync here then."""
    if keep is None:
        keep = (labels != IGNORE_INDEX).nonzero().squeeze(1)
    h, y = hidden.index_select(0, keep), labels.index_select(0, keep)
    total = hidden.sum() * 0.0  # keeps the graph (and FSDP's backward) connected when there is no loss token
    for start in range(0, h.shape[0], chunk):
        args = (h[start : start + chunk], weight, y[start : start + chunk])
        if torch.is_grad_enabled():
            total = total + torch.utils.checkpoint.checkpoint(_ce_chunk, *args, use_reentrant=False)
        else:
            total = total + _ce_chunk(*args)
    return total


def _vision(core, pixel_values, image_grid_thw):
    out = encode_images(core.visual, pixel_values.to(core.visual.dtype), image_grid_thw)
    return out.image_embeds, out.deepstack_embeds


def packed_forward(
    model, input_ids, position_ids, cu_seqlens, max_seqlen: int, pixel_values, image_grid_thw, labels,
    loss_positions=None, image_positions=None, dummy_vision=None,
):
    """One packed micro-batch (train/engine.py ForwardArgs) through the transformers model: the CE sum (labels
    given) or logits [T, vocab].

    Bound to the model and registered with FSDP as a forward method, so the root's parameters are gathered
    around it. The vision tower runs first, by itself (the attention kwargs cu_seq_lens_* are the language
    model's, not the vision tower's); its features replace the image tokens' embeddings, and Qwen3-VL's
    deepstack features go to the language model as it expects them."""
    core = model.model
    emb = core.get_input_embeddings()(input_ids)  # [T, H]
    lm_kwargs = {}
    zero = None
    if pixel_values is not None:
        feats, deep = _vision(core, pixel_values, image_grid_thw)
        if image_positions is None:
            image_positions = (input_ids == model.config.image_token_id).nonzero().squeeze(1)
        emb = place_image_features(emb, feats, image_positions)
        if deep:
            # transformers adds the deepstack features after the first decoder layers; its `visual_pos_masks` take
            # the positions here (_deepstack_at_positions, installed by build_hf_model), not a mask: no host sync
            lm_kwargs.update(visual_pos_masks=image_positions, deepstack_visual_embeds=[d.to(emb.dtype) for d in deep])
    elif dummy_vision is not None:
        feats, deep = _vision(core, *dummy_vision)
        zero = sum(t.sum() for t in [feats, *deep]) * 0.0
    cu = cu_seqlens.to(torch.int32)
    out = core.language_model(
        inputs_embeds=emb[None],
        position_ids=position_ids[:, None, :],  # 3 rows (t, h, w): transformers takes these as the M-RoPE ids
        use_cache=False,
        cu_seq_lens_q=cu,
        cu_seq_lens_k=cu,
        max_length_q=int(max_seqlen),
        max_length_k=int(max_seqlen),
        **lm_kwargs,
    )
    hidden = out.last_hidden_state[0]
    if labels is None:
        return model.lm_head(hidden)
    # The head at the loss positions only, as the Megatron model's (QwenVLLanguageModel._postprocess); that one is
    # Megatron's vocab-parallel head and cross entropy (split over TP ranks), this one transformers' lm_head in
    # recomputed chunks, so the two stay apart.
    loss = chunked_ce_sum(hidden, model.lm_head.weight, labels, keep=loss_positions)
    return loss if zero is None else loss + zero


def _accumulate_unsharded_grad(fsdp_param) -> None:
    # FSDP2's FSDPParam.accumulate_unsharded_grad_if_needed, with the sum through grad_accum.accumulate_
    acc, grad = fsdp_param.unsharded_accumulated_grad, fsdp_param.unsharded_param.grad
    if acc is not None and grad is not None:
        grad_accum.accumulate_(acc, grad)
        fsdp_param.unsharded_param.grad = None


def vectorised_grad_accumulation(fsdp_modules) -> int:
    """Without gradient sync FSDP2 sums each micro-batch's bf16 gradient into a float32 one per parameter with a
    mixed-dtype `+=`, PyTorch's unrolled element-wise kernel; the Megatron engine's accumulation kernel does the same
    sum, bit for bit, at the memory bandwidth (train/grad_accum.py: 58 -> 37 ms a 2B step on an H200 there).
    Installed on each FSDPParam (FSDP2's per-parameter state, reached through private attributes: where they are
    missing nothing changes); returns how many parameters."""
    n = 0
    for m in fsdp_modules:
        group = getattr(m._get_fsdp_state(), "_fsdp_param_group", None)
        for fsdp_param in getattr(group, "fsdp_params", None) or ():
            if hasattr(fsdp_param, "accumulate_unsharded_grad_if_needed") and hasattr(fsdp_param, "unsharded_accumulated_grad"):
                fsdp_param.accumulate_unsharded_grad_if_needed = types.MethodType(_accumulate_unsharded_grad, fsdp_param)
                n += 1
    return n


def shard_model(model: torch.nn.Module, mesh, *, bf16: bool, reshard_after_forward: bool, per_block: bool = True) -> None:
    """FSDP2's `fully_shard` on each layer the model names unsplittable (`_no_split_modules`: its decoder layers and
    vision blocks), then on the whole model. bf16: bf16 parameters for compute, fp32 gradient reduction.
    per_block=False: the whole model as one group (what one process wants: see the engine).

    Only the root casts its floating-point inputs to bf16 (the pixels). A block's inputs are the model's own
    activations, already bf16, but for the vision blocks' rotary cos/sin, which transformers computes in fp32 and
    the blocks use in fp32 (as transformers' own bf16 model does); cast per block, they were rounded to bf16 first,
    and a walk over every block's arguments ran on the host ~300 times a step."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    blocks = [m for m in model.modules() if type(m).__name__ in set(model._no_split_modules or [])]
    if not blocks:
        raise FSDPConfigError(f"{type(model).__name__} names no layers to shard (_no_split_modules is empty)")
    block_mp = dataclasses.replace(mp, cast_forward_inputs=False)
    if per_block:
        for block in blocks:
            fully_shard(block, mesh=mesh, mp_policy=block_mp, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=mp)


# ---------------------------------------------------------------- engine


class FSDPEngine(Engine):
    name = "fsdp"

    def __init__(self, hf_config, cfg: TrainConfig, world: World, *, init_from=None):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import FSDPModule, register_fsdp_forward_method

        if world.tp > 1 or world.ep > 1 or cfg.sequence_parallel:  # the trainer refuses these first (check_layout)
            raise FSDPConfigError("train.backend=fsdp shards over data-parallel ranks only")
        self.cfg = cfg
        self.world = world
        self.hf_config = hf_config
        self.cuda = world.device.type == "cuda"
        self.bf16 = cfg.bf16 and self.cuda
        from train.models import attention

        attention.set_backend(cfg.attention_backend, world.device, torch.bfloat16 if self.bf16 else torch.float32,
                              vision=cfg.vision_attention_backend)
        # Every rank builds the model on the meta device (no memory) and shards it; rank 0 alone holds the whole
        # model on the host (random, seeded, or the checkpoint) and broadcasts each rank its shards. Host memory is
        # one model on rank 0, not one per rank (30B-A3B: 122 GB in fp32 once, instead of ~1 TB on 8 ranks).
        model = build_hf_model(hf_config, init_from, cfg.seed, materialize=False, cuda=self.cuda)
        source = build_hf_model(hf_config, init_from, cfg.seed, cuda=self.cuda) if world.rank == 0 else None
        model.config.use_cache = False
        if cfg.recompute != "none":
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

        # the patch embedding (a Conv3d with kernel = stride) as the GEMM it is, as in the Megatron model's tower
        linear_patch_embed(model.model.visual)

        mesh = init_device_mesh(world.device.type, (world.world_size,))
        # With one process a "shard" is the whole parameter and a gather is a copy (and bf16 cast) of it, made
        # again in each backward and each micro-batch's forward after resharding. So one process keeps what it
        # gathered from the first forward of a step to the step's end: one bf16 copy of the model beside the fp32
        # master (as Megatron's bf16 weights beside its optimizer's fp32 ones), instead of a layer or two at a
        # time. _finish_step reshards before the optimizer changes the shards: FSDP's unshard is a no-op on an
        # unsharded module, which would go on with the old weights. Kept gathered, per-layer groups would buy
        # nothing, and each costs FSDP's Python hooks around every layer's forward and backward (~0.4 ms of host
        # time a layer and micro-batch on the CPU box; 52 layers on the 2B model): one process shards the whole
        # model as one group. What that costs: a micro-batch's bf16 gradients all live until its backward ends
        # (+2 bytes a parameter) before they are added into the float32 ones, and the step's one reduction copies
        # the float32 gradients of the whole model at once (+8 bytes a parameter for a moment, when the last
        # backward has freed the activations).
        self._reshard_after_forward = world.world_size > 1
        shard_model(model, mesh, bf16=self.bf16, reshard_after_forward=self._reshard_after_forward,
                    per_block=world.world_size > 1)
        _fill_from_rank0(model, source, world.device)
        del source
        self.fsdp_modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        for m in self.fsdp_modules:
            if world.world_size > 1:
                # sum over ranks (the loss is already divided by the global count) with a plain SUM collective:
                # a divide factor alone becomes NCCL's PreMulSum, which gloo lacks. (One process copies its
                # gradients over as they are without one; with one it would divide them by 1 into a temporary.)
                m.set_gradient_divide_factor(1.0)
                m.set_force_sum_reduction_for_comms(True)
            if not self._reshard_after_forward and hasattr(m, "set_reshard_after_backward"):
                m.set_reshard_after_backward(False, recurse=False)
        # ranks whose micro-batch leaves a parameter unused must still join its reduce-scatter. torch < 2.12
        # lacks the switch; there the dummy image below already keeps every parameter in use.
        if hasattr(model, "set_reduce_scatter_unused_params"):
            model.set_reduce_scatter_unused_params(True)
        if world.world_size == 1:  # the micro-batches' gradients are summed unsharded (see _before_forward)
            vectorised_grad_accumulation(self.fsdp_modules)
        model.geo3k_forward = types.MethodType(packed_forward, model)
        register_fsdp_forward_method(model, "geo3k_forward")
        self.model = model
        self.inner = model

        # Per-layer compile (train/models/layer_compile.py), as under Megatron, with transformers' layers. After
        # fully_shard, which (with several processes) swaps each layer's class for an FSDP subclass: the compiled
        # function is the forward that class runs. Only the layer's forward is replaced (an instance attribute), so
        # FSDP2's per-layer hooks (all-gather before, reshard after, the backward hooks on the inputs and outputs)
        # run eagerly around the graph, and the graph reads the gathered parameters FSDP puts on the module (one
        # process has no per-layer hooks: the root's gather covers every layer). Recomputation (transformers'
        # checkpointing around the forward) is untested compiled.
        if cfg.compile_layers and self.cuda and cfg.recompute == "none":
            from train.models.layer_compile import compile_hf_layers

            self.compiled_layers = compile_hf_layers(model, cpp_wrapper=cfg.compile_cpp_wrapper)

        # torch's fused AdamW (one call for all parameters, train/optim.py) takes FSDP's DTensor shards
        self.optimizer, self.params = build_adamw(model, cfg, fused=self.cuda)
        # a minimal image (one merged token) for micro-batches without one, so every rank runs the vision blocks
        v = hf_config.vision_config
        m = v.spatial_merge_size
        width = v.in_channels * v.temporal_patch_size * v.patch_size**2
        self._dummy_vision = (
            torch.zeros(m * m, width, device=world.device),
            torch.tensor([[1, m, m]], dtype=torch.long, device=world.device),
        )

    # ---------------------------------------------------------------- one step

    @property
    def collective_train_forward(self) -> bool:
        """With other ranks every training forward runs, also a padding-only one: FSDP's all-gathers need every
        rank (eval forwards need none: `evaluating()` gathers the parameters first)."""
        return self.world.world_size > 1

    def _start_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def _before_forward(self, mb, num_micro_batches: int, last: bool) -> None:
        """One process has no one to reduce with: FSDP's per-micro-batch reduction (a copy of every gradient into a
        float32 buffer, the one-rank "reduce-scatter", a divide by 1, an add into the shard) is ~4 passes over the
        gradients per micro-batch and a Python hook per layer (H200, 2B: ~128 ms of GPU time a step). Without sync,
        FSDP accumulates each micro-batch's bf16 gradient into one float32 gradient per parameter (the same sums
        as before, in the same order) and reduces once, in the last backward. Several ranks reduce every
        micro-batch: the reduce-scatter overlaps the backward, and no rank holds unsharded float32 gradients."""
        if self.world.world_size == 1:
            self.model.set_requires_gradient_sync(last)

    def _finish_step(self) -> tuple[bool, float]:
        """Gradients were reduce-scattered in the backward (each one, or the last alone on one process): the global
        norm of the shards, clip, step."""
        from torch.distributed.tensor import DTensor

        if not self._reshard_after_forward:
            for m in self.fsdp_modules:  # the shards change in the step below: the next forward gathers them anew
                m.reshard()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()  # the shards' partial norms, all-reduced
        return clip_and_step(self.optimizer, self.params, self.cfg.clip_grad, norm)

    def forward(self, args: ForwardArgs, *, training: bool = False) -> torch.Tensor:
        # a training forward without images runs the vision tower on the dummy image (see the module docstring)
        dummy = training and self.collective_train_forward and args.pixel_values is None
        return self.model.geo3k_forward(*args, dummy_vision=self._dummy_vision if dummy else None)

    @contextlib.contextmanager
    def evaluating(self):
        """All-gather every parameter once (a collective: every rank enters this) and keep it gathered, so that
        ranks may run different numbers of eval forwards (see the module docstring); reshard on exit."""
        for m in self.fsdp_modules:
            m.unshard()
            m.set_reshard_after_forward(False, recurse=False)
        try:
            with super().evaluating():
                yield
        finally:
            for m in self.fsdp_modules:
                m.reshard()
                if m is not self.model:  # the root keeps FSDP's own choice (no reshard after forward)
                    m.set_reshard_after_forward(self._reshard_after_forward, recurse=False)

    # ---------------------------------------------------------------- checkpoints

    def save(self, ckpt: Path) -> None:
        """Every rank writes its shards of the model and optimizer state (DCP, collective)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(Path(ckpt) / DCP_DIR))

    def load(self, ckpt: Path) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        path = Path(ckpt) / DCP_DIR
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"{ckpt} has no {DCP_DIR}/ (FSDP state): was it saved by the megatron backend? Resume with --backend megatron")
        model_state, optim_state = get_state_dict(self.model, self.optimizer)  # the layout to load into
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def full_model_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full model state (transformers names) of an FSDP checkpoint, read in one process, for export."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = Path(ckpt) / DCP_DIR
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"{ckpt} has no {DCP_DIR}/.metadata: is it a geo3k FSDP checkpoint?")
    reader = dcp.FileSystemReader(str(path))
    metadata = reader.read_metadata().state_dict_metadata
    state = {
        key[len("model.") :]: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    dcp.load({"model": state}, storage_reader=reader, no_dist=not dist.is_initialized())
    return state
