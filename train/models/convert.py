"""Hugging Face <-> Megatron-Core checkpoints for the Qwen-VL models.

Three layers, each a set of pure tensor functions that tests can check without processes:

1. `hf_to_megatron` / `megatron_to_hf`: a transformers state dict (the names and layouts of the
   safetensors files) <-> the *full* (tensor-parallel size 1) state dict of `QwenVLModel`.
   Layout facts:
   - Megatron fuses q, k, v into `linear_qkv`, grouped per key/value head: for each of the
     `num_query_groups` groups, its `heads/groups` query heads, then its key head, then its value head
     (rows of head_dim each). Biases (Qwen2.5) follow the same order.
   - Megatron's `linear_fc1` is `[gate; up]` stacked along the output dimension (SwiGLU takes chunk 0
     as the gate).
   - MoE experts are fused 3-D tensors. transformers' own layout (what `save_pretrained` writes):
     `mlp.experts.gate_up_proj` [E, 2*I, hidden] (gate rows first) and `mlp.experts.down_proj`
     [E, hidden, I], i.e. stacked nn.Linear weights; the Megatron model's GroupedExperts
     (train/models/experts.py) holds the same tensors under the same names. The hub's
     Qwen3-VL-MoE files hold the transpose ([E, hidden, 2*I], [E, I, hidden]); like transformers,
     we transpose only when the shape is not already the expected one.
   - The vision tower keeps transformers' names under `model.visual.` -> `vision.model.`.
   - Files use the hub's names: nested (`model.language_model.`, `model.visual.`) for Qwen3-VL, flat
     (`model.layers.`, `visual.`) for Qwen2.5-VL; both are read, and each is written as its hub has it.
2. `split_tensor_parallel` / `merge_tensor_parallel`: full <-> per-rank Megatron state dicts.
   Column-parallel weights split along dim 0 (qkv by whole groups, fc1 as gate and up halves
   separately), row-parallel along dim 1, the vocabulary along dim 0, the experts' I dimension (dim 1 of
   gate_up_proj as gate and up halves, dim 2 of down_proj), everything else replicated.
   `split_expert_parallel` / `merge_expert_parallel`: the experts (dim 0 of the expert tensors) over
   expert-parallel ranks.
3. File I/O: `load_hf_checkpoint` (directory or hub id) -> model on this rank; `export_hf` writes a
   transformers directory (safetensors + config.json) from full Megatron weights.

A round trip HF -> Megatron -> HF only moves and concatenates tensors, so it is bit-exact.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch

# ---------------------------------------------------------------------------------------------------
# names
# ---------------------------------------------------------------------------------------------------

HF_LM = "model.language_model."
HF_VISION = "model.visual."
MG_LM = "language_model."
MG_DEC = "language_model.decoder.layers."
MG_VISION = "vision.model."

# Hub checkpoints written before transformers 4.52 use flat names; map them to the nested layout.
_LEGACY_PREFIXES = (
    ("visual.", HF_VISION),
    ("model.layers.", HF_LM + "layers."),
    ("model.embed_tokens.", HF_LM + "embed_tokens."),
    ("model.norm.", HF_LM + "norm."),
)


def normalize_hf_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.items():
        if not key.startswith((HF_LM, HF_VISION, "lm_head.")):
            for old, new in _LEGACY_PREFIXES:
                if key.startswith(old):
                    key = new + key[len(old):]
                    break
        out[key] = value
    return out


def to_disk_keys(hf_state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Names as transformers writes and the hub publishes them: Qwen2.5-VL keeps the flat layout
    (`model.layers.`, `visual.`; transformers renames on load), Qwen3-VL the nested one."""
    if hf_config.model_type != "qwen2_5_vl":
        return hf_state
    out = {}
    for key, value in hf_state.items():
        if key.startswith(HF_LM):
            key = "model." + key[len(HF_LM):]
        elif key.startswith(HF_VISION):
            key = "visual." + key[len(HF_VISION):]
        out[key] = value
    return out


def _dims(hf_config):
    text = hf_config.text_config
    hd = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return text.num_attention_heads, text.num_key_value_heads, hd


def _tied(hf_config) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def _moe_layers(hf_config) -> set[int]:
    from train.models import moe_layer_pattern

    pattern = moe_layer_pattern(hf_config.text_config)
    return {i for i, is_moe in enumerate(pattern or []) if is_moe}


# ---------------------------------------------------------------------------------------------------
# 1. HF <-> full Megatron
# ---------------------------------------------------------------------------------------------------


def fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int, num_groups: int, hd: int) -> torch.Tensor:
    """[nh*hd, ...], [ng*hd, ...], [ng*hd, ...] -> Megatron's grouped [ng*(nh/ng + 2)*hd, ...]."""
    rest = q.shape[1:]
    q = q.reshape(num_groups, num_heads // num_groups * hd, *rest)
    k = k.reshape(num_groups, hd, *rest)
    v = v.reshape(num_groups, hd, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def unfuse_qkv(qkv: torch.Tensor, num_heads: int, num_groups: int, hd: int):
    rest = qkv.shape[1:]
    per_group = num_heads // num_groups * hd
    grouped = qkv.reshape(num_groups, per_group + 2 * hd, *rest)
    q, k, v = grouped.split([per_group, hd, hd], dim=1)
    return q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)


def hf_to_megatron(hf_state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """transformers state dict -> full Megatron `QwenVLModel` state dict (tensors are not copied)."""
    hf = normalize_hf_keys(hf_state)
    nh, ng, hd = _dims(hf_config)
    text = hf_config.text_config
    moe = _moe_layers(hf_config)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def take(key):
        used.add(key)
        return hf[key]

    for key in hf:
        if key.startswith(HF_VISION):
            out[MG_VISION + key[len(HF_VISION):]] = take(key)
    out[MG_LM + "embedding.word_embeddings.weight"] = take(HF_LM + "embed_tokens.weight")
    out[MG_LM + "decoder.final_layernorm.weight"] = take(HF_LM + "norm.weight")
    if not _tied(hf_config):
        out[MG_LM + "output_layer.weight"] = take("lm_head.weight")
    elif "lm_head.weight" in hf:
        used.add("lm_head.weight")  # a tied checkpoint may still store the copy

    for i in range(text.num_hidden_layers):
        src, dst = f"{HF_LM}layers.{i}.", f"{MG_DEC}{i}."
        attn = src + "self_attn."
        out[dst + "input_layernorm.weight"] = take(src + "input_layernorm.weight")
        out[dst + "pre_mlp_layernorm.weight"] = take(src + "post_attention_layernorm.weight")
        out[dst + "self_attention.linear_qkv.weight"] = fuse_qkv(
            take(attn + "q_proj.weight"), take(attn + "k_proj.weight"), take(attn + "v_proj.weight"), nh, ng, hd
        )
        if attn + "q_proj.bias" in hf:
            out[dst + "self_attention.linear_qkv.bias"] = fuse_qkv(
                take(attn + "q_proj.bias"), take(attn + "k_proj.bias"), take(attn + "v_proj.bias"), nh, ng, hd
            )
        if attn + "q_norm.weight" in hf:
            out[dst + "self_attention.q_layernorm.weight"] = take(attn + "q_norm.weight")
            out[dst + "self_attention.k_layernorm.weight"] = take(attn + "k_norm.weight")
        out[dst + "self_attention.linear_proj.weight"] = take(attn + "o_proj.weight")
        mlp = src + "mlp."
        if i in moe:
            out[dst + "mlp.router.weight"] = take(mlp + "gate.weight")
            inter = text.moe_intermediate_size
            gate_up = _expert_layout(take(mlp + "experts.gate_up_proj"), (2 * inter, text.hidden_size))
            down = _expert_layout(take(mlp + "experts.down_proj"), (text.hidden_size, inter))
            out[dst + "mlp.experts.gate_up_proj"] = gate_up  # GroupedExperts holds transformers' layout
            out[dst + "mlp.experts.down_proj"] = down
        else:
            out[dst + "mlp.linear_fc1.weight"] = torch.cat([take(mlp + "gate_proj.weight"), take(mlp + "up_proj.weight")])
            out[dst + "mlp.linear_fc2.weight"] = take(mlp + "down_proj.weight")

    unused = sorted(set(hf) - used)
    if unused:
        raise ValueError(f"{len(unused)} checkpoint tensors have no place in the model, e.g. {unused[:5]}")
    return out


def _expert_layout(t: torch.Tensor, per_expert: tuple[int, int]) -> torch.Tensor:
    """[E, *per_expert] as is; the hub's transposed [E, *reversed(per_expert)] transposed back."""
    if tuple(t.shape[1:]) == per_expert:
        return t
    if tuple(t.shape[1:]) == per_expert[::-1]:
        return t.transpose(1, 2)
    raise ValueError(f"expert tensor of shape {tuple(t.shape)} fits neither [E, {per_expert}] nor its transpose")


def megatron_to_hf(mg_state: dict[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """Full Megatron `QwenVLModel` state dict -> transformers state dict (the on-disk names)."""
    mg = {k: v for k, v in mg_state.items() if not k.endswith("_extra_state") and v is not None}
    nh, ng, hd = _dims(hf_config)
    text = hf_config.text_config
    moe = _moe_layers(hf_config)
    out: dict[str, torch.Tensor] = {}
    for key, value in mg.items():
        if key.startswith(MG_VISION):
            out[HF_VISION + key[len(MG_VISION):]] = value
    out[HF_LM + "embed_tokens.weight"] = mg[MG_LM + "embedding.word_embeddings.weight"]
    out[HF_LM + "norm.weight"] = mg[MG_LM + "decoder.final_layernorm.weight"]
    if not _tied(hf_config):
        out["lm_head.weight"] = mg[MG_LM + "output_layer.weight"]
    for i in range(text.num_hidden_layers):
        src, dst = f"{MG_DEC}{i}.", f"{HF_LM}layers.{i}."
        attn = dst + "self_attn."
        out[dst + "input_layernorm.weight"] = mg[src + "input_layernorm.weight"]
        out[dst + "post_attention_layernorm.weight"] = mg[src + "pre_mlp_layernorm.weight"]
        q, k, v = unfuse_qkv(mg[src + "self_attention.linear_qkv.weight"], nh, ng, hd)
        out[attn + "q_proj.weight"], out[attn + "k_proj.weight"], out[attn + "v_proj.weight"] = q, k, v
        if src + "self_attention.linear_qkv.bias" in mg:
            q, k, v = unfuse_qkv(mg[src + "self_attention.linear_qkv.bias"], nh, ng, hd)
            out[attn + "q_proj.bias"], out[attn + "k_proj.bias"], out[attn + "v_proj.bias"] = q, k, v
        if src + "self_attention.q_layernorm.weight" in mg:
            out[attn + "q_norm.weight"] = mg[src + "self_attention.q_layernorm.weight"]
            out[attn + "k_norm.weight"] = mg[src + "self_attention.k_layernorm.weight"]
        out[attn + "o_proj.weight"] = mg[src + "self_attention.linear_proj.weight"]
        mlp = dst + "mlp."
        if i in moe:
            out[mlp + "gate.weight"] = mg[src + "mlp.router.weight"]
            out[mlp + "experts.gate_up_proj"] = mg[src + "mlp.experts.gate_up_proj"]
            out[mlp + "experts.down_proj"] = mg[src + "mlp.experts.down_proj"]
        else:
            gate, up = mg[src + "mlp.linear_fc1.weight"].chunk(2, dim=0)
            out[mlp + "gate_proj.weight"], out[mlp + "up_proj.weight"] = gate, up
            out[mlp + "down_proj.weight"] = mg[src + "mlp.linear_fc2.weight"]
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------------------------------------------
# 2. tensor parallelism (pure functions)
# ---------------------------------------------------------------------------------------------------

_COLUMN = re.compile(r"(linear_qkv\.(weight|bias)|output_layer\.weight|word_embeddings\.weight)$")
_ROW = re.compile(r"(linear_proj|linear_fc2)\.weight$")
_FC1 = re.compile(r"linear_fc1\.weight$")  # [gate; up]: split each half
_EXPERTS = re.compile(r"\.experts\.(gate_up_proj|down_proj)$")

# kind -> (dimension split, whether the dimension is [gate; up] halves split separately)
_SPLIT_DIMS = {"column": (0, False), "row": (1, False), "fc1": (0, True), "experts_fc1": (1, True), "experts_fc2": (2, False)}


def is_expert_key(key: str) -> bool:
    return bool(_EXPERTS.search(key))


def _split_kind(key: str) -> str:
    if key.startswith(MG_VISION):
        return "replicated"  # the vision tower is replicated on every rank
    m = _EXPERTS.search(key)
    if m:
        return "experts_fc1" if m.group(1) == "gate_up_proj" else "experts_fc2"
    if _FC1.search(key):
        return "fc1"
    if _COLUMN.search(key):
        return "column"
    if _ROW.search(key):
        return "row"
    return "replicated"


def split_tensor_parallel(full: dict[str, torch.Tensor], tp_size: int, hf_config=None) -> list[dict[str, torch.Tensor]]:
    """Full Megatron state dict -> one state dict per tensor-parallel rank.

    The qkv rows are grouped per key/value head, so a plain split along dim 0 hands each rank whole
    groups; this needs num_key_value_heads % tp_size == 0 (checked when hf_config is given).
    """
    if hf_config is not None:
        _, ng, _ = _dims(hf_config)
        if ng % tp_size:
            raise ValueError(f"num_key_value_heads={ng} is not divisible by tensor_model_parallel_size={tp_size}")
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(tp_size)]
    for key, value in full.items():
        kind = _split_kind(key)
        if kind == "replicated":
            parts = [value] * tp_size
        else:
            dim, halves = _SPLIT_DIMS[kind]
            if halves:  # rank r gets [gate_r; up_r]
                gate, up = value.chunk(2, dim=dim)
                parts = [torch.cat([g, u], dim=dim) for g, u in zip(_chunk(gate, tp_size, dim, key), _chunk(up, tp_size, dim, key))]
            else:
                parts = _chunk(value, tp_size, dim, key)
        for rank, part in enumerate(parts):
            ranks[rank][key] = part.contiguous()
    return ranks


def merge_tensor_parallel(ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Per-rank Megatron state dicts -> the full state dict (inverse of split_tensor_parallel)."""
    full = {}
    for key in ranks[0]:
        parts = [r[key] for r in ranks]
        kind = _split_kind(key)
        if kind == "replicated":
            full[key] = parts[0]
            continue
        dim, halves = _SPLIT_DIMS[kind]
        if halves:
            split = [p.chunk(2, dim=dim) for p in parts]
            full[key] = torch.cat([h[0] for h in split] + [h[1] for h in split], dim=dim)
        else:
            full[key] = torch.cat(parts, dim=dim)
    return full


def split_expert_parallel(experts: dict[str, torch.Tensor], ep_size: int) -> list[dict[str, torch.Tensor]]:
    """Expert tensors (all experts, [E, ...]) -> per expert-parallel rank, E / ep_size consecutive experts each
    (rank r holds experts r*E/ep .. (r+1)*E/ep - 1, as Megatron's MoE layer numbers its local experts)."""
    ranks: list[dict[str, torch.Tensor]] = [{} for _ in range(ep_size)]
    for key, value in experts.items():
        for rank, part in enumerate(_chunk(value, ep_size, 0, key)):
            ranks[rank][key] = part.contiguous()
    return ranks


def merge_expert_parallel(ranks: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {key: torch.cat([r[key] for r in ranks], dim=0) for key in ranks[0]}


def _chunk(t: torch.Tensor, n: int, dim: int, key: str) -> list[torch.Tensor]:
    if t.shape[dim] % n:
        raise ValueError(f"{key}: size {t.shape[dim]} along dim {dim} is not divisible by tensor_model_parallel_size={n}")
    return list(t.chunk(n, dim=dim))


# ---------------------------------------------------------------------------------------------------
# 3. files
# ---------------------------------------------------------------------------------------------------


def resolve_checkpoint_dir(name_or_path: str) -> Path:
    """A local directory as is; otherwise a hub id, downloaded (safetensors and json files only)."""
    path = Path(name_or_path)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name_or_path, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt"]))


def read_safetensors_dir(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {path}; export the checkpoint with safe_serialization")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def max_relative_differences(got: dict, ref: dict, init: dict) -> tuple[tuple[float, str], tuple[float, str]]:
    """Two trainings of one start checkpoint `init`, compared tensor by tensor: ((worst relative L2 difference of
    a tensor, its name), (the same for a tensor's update, trained - init)). Adam turns rounding into update
    differences first, so the update figure is the stricter one."""
    if not set(got) == set(ref) == set(init):
        raise ValueError(f"the state dicts hold different tensors: {sorted(set(got) ^ set(ref) | set(ref) ^ set(init))[:5]}")
    tensor = max((((got[k] - ref[k]).norm() / ref[k].norm()).item(), k) for k in ref)
    update = max(((((got[k] - init[k]) - (ref[k] - init[k])).norm() / (ref[k] - init[k]).norm().clamp_min(1e-30)).item(), k) for k in ref)
    return tensor, update


def shard_for_rank(full: dict[str, torch.Tensor], hf_config, *, tp_rank: int, tp_size: int, ep_rank: int = 0, ep_size: int = 1) -> dict[str, torch.Tensor]:
    """The full Megatron state dict -> the part of tensor-parallel rank tp_rank and expert-parallel rank ep_rank."""
    shard = split_tensor_parallel(full, tp_size, hf_config)[tp_rank] if tp_size > 1 else dict(full)
    if ep_size > 1:
        experts = {k: v for k, v in shard.items() if is_expert_key(k)}
        shard.update(split_expert_parallel(experts, ep_size)[ep_rank])
    return shard


def load_hf_checkpoint(model, name_or_path: str, *, tp_rank: int = 0, tp_size: int = 1, ep_rank: int = 0, ep_size: int = 1) -> None:
    """Loads a transformers checkpoint (directory or hub id) into `model`, this rank's shard."""
    from train.models import load_hf_config

    path = resolve_checkpoint_dir(name_or_path)
    hf_config = load_hf_config(str(path))
    full = hf_to_megatron(read_safetensors_dir(path), hf_config)
    load_megatron_state(model, shard_for_rank(full, hf_config, tp_rank=tp_rank, tp_size=tp_size, ep_rank=ep_rank, ep_size=ep_size))


def load_megatron_state(model, state: dict[str, torch.Tensor]) -> None:
    """`load_state_dict` that tolerates only Megatron's `_extra_state` entries being absent."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("_extra_state")]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in state.items():
        if own[key].shape != value.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(own[key].shape)}")
    model.load_state_dict(state, strict=False)


def megatron_state(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if not k.endswith("_extra_state") and v is not None}


def export_hf(
    full_state: dict[str, torch.Tensor],
    hf_config,
    out_dir: str | os.PathLike,
    *,
    dtype: torch.dtype | None = None,
    max_shard_bytes: int = 5 * 1024**3,
) -> Path:
    """Writes a transformers directory: model*.safetensors (+ index when sharded) and config.json.

    `full_state` is the full (tensor-parallel size 1) Megatron state dict, e.g. `merge_tensor_parallel`
    of all ranks. The processor files (tokenizer, preprocessor config, chat template) are the
    trainer's to add.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf_state = to_disk_keys(megatron_to_hf(full_state, hf_config), hf_config)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key in sorted(hf_state):
        t = hf_state[key].detach().cpu().contiguous()
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(out / name), metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(t.numel() * t.element_size() for t in hf_state.values())
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )
    config = hf_config.__class__.from_dict(hf_config.to_dict())
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(str(out))
    return out
