"""Qwen-VL models on Megatron-Core: varlen attention, M-RoPE, the vision tower, conversion.

Importing `train.models` itself is cheap (no Megatron import); the submodules that need Megatron-Core
(`qwen_vl`, `convert` loaders) import it when used.

Presets (the original recipe's models, by name) live in shared/presets/<name>/config.json; where a model's
config and weights come from is train/models/source.py.
"""

from __future__ import annotations


def load_hf_config(name_or_path: str):
    """A transformers config from a checkpoint directory, a preset name or a hub id (a preset's transcribed config
    for the hub ids presets stand for: random init; weights bring their own config, see source.py)."""
    from pathlib import Path

    from transformers import AutoConfig

    if Path(name_or_path).is_dir():
        return AutoConfig.from_pretrained(name_or_path)
    # Preset folders are read directly: shared.presets pulls in the data stack (zstandard, ...), which
    # a GPU-only environment need not have.
    preset_dir = Path(__file__).resolve().parents[2] / "shared" / "presets" / name_or_path
    if (preset_dir / "config.json").exists():
        return AutoConfig.from_pretrained(str(preset_dir))
    try:
        from shared.presets import PRESET_DIR, resolve_preset
    except ImportError:
        preset = None
    else:
        preset = resolve_preset(name_or_path)
    if preset is not None:
        return AutoConfig.from_pretrained(str(PRESET_DIR / preset))
    return AutoConfig.from_pretrained(name_or_path)


def moe_layer_pattern(text) -> list[int] | None:
    """1 for a MoE layer, 0 for a dense one, as transformers decides it (None: dense model). Here rather than in
    qwen_vl.py: converting an FSDP checkpoint for export needs it, and no Megatron-Core."""
    num_experts = getattr(text, "num_experts", 0) or 0
    if num_experts == 0:
        return None
    step = getattr(text, "decoder_sparse_step", 1) or 1
    dense = set(getattr(text, "mlp_only_layers", []) or [])
    return [int(i not in dense and (i + 1) % step == 0) for i in range(text.num_hidden_layers)]
