"""Qwen-VL models on Megatron-Core: varlen attention, M-RoPE, the vision tower, conversion.

Importing `train.models` itself is cheap (no Megatron import); the submodules that need Megatron-Core
(`qwen_vl`, `convert` loaders) import it when used.

`ARCHITECTURES` is the registry of supported transformers model types; presets (the original recipe's
models, by name) live in shared/presets/<name>/config.json.
"""

from __future__ import annotations

# transformers model_type -> what it is built from. A plain dict on purpose: one place to look.
ARCHITECTURES = {
    "qwen2_5_vl": "Qwen2.5-VL: QKV bias, contiguous M-RoPE, window-attention ViT",
    "qwen3_vl": "Qwen3-VL dense: QK-norm, interleaved M-RoPE, deepstack",
    "qwen3_vl_moe": "Qwen3-VL MoE: as qwen3_vl, MLPs through Megatron-Core's MoE layers",
}


def load_hf_config(name_or_path: str):
    """A transformers config from a checkpoint directory, a preset name or a hub id."""
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
