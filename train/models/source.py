"""Where a model comes from: the config it is built from and the weights it starts with.

A preset (shared/presets/<name>/config.json) is a transcription of a model's config: it serves random init and
the offline processor. Whenever weights are loaded, the model is built from the config that sits beside those
weights, so a checkpoint's tensors always go into the architecture they were trained in:

- a transformers folder (config.json + *.safetensors);
- a hub id, or the hub id a preset stands for (`qwen3-vl-2b` -> Qwen/Qwen3-VL-2B-Instruct), through the
  Hugging Face cache (offline when HF_HUB_OFFLINE=1 or the Hub cannot be reached);
- a geo3k run folder (its newest complete checkpoint) or one checkpoint folder (step-*/, hf_config.json).

Where the preset the model stands for disagrees with the checkpoint's config, the checkpoint wins and
`ModelSource.differences` says what differed (the trainer logs it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.errors import UserError


class ModelSourceError(UserError, ValueError):
    pass


@dataclass(frozen=True)
class ModelSource:
    name: str
    """What the user named (model.name_or_path, or geo3k eval's MODEL)."""
    hf_config: Any
    """The transformers config the model is built from."""
    weights: Path | None = None
    """A transformers folder or a geo3k checkpoint folder; None for random init."""
    preset: str | None = None
    """The preset the model stands for (its processor serves offline), if any."""
    differences: list[str] = field(default_factory=list)

    @property
    def is_geo3k_checkpoint(self) -> bool:
        return self.weights is not None and (self.weights / "trainer_state.json").exists()

    def describe(self) -> str:
        if self.weights is None:
            return f"{self.name} (random init, config {'preset ' + self.preset if self.preset else self.name})"
        return f"{self.name} (weights and config.json from {self.weights})"


# Keys that say how a config was written or how transformers should run it, not what the model is.
_BOOKKEEPING = {
    "_name_or_path", "transformers_version", "torch_dtype", "dtype", "architectures", "use_cache",
    "_attn_implementation_autoset", "output_attentions", "output_hidden_states", "return_dict",
}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if k in _BOOKKEEPING:
            continue
        if isinstance(v, dict) and k in ("text_config", "vision_config", "rope_parameters", "rope_scaling"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(preset: dict[str, Any], checkpoint: dict[str, Any]) -> list[str]:
    """'key: preset -> checkpoint' for every model setting where the two configs disagree."""
    a, b = _flat(preset), _flat(checkpoint)
    absent = "(absent)"
    return [f"{k}: {a.get(k, absent)!r} -> {b.get(k, absent)!r}" for k in sorted(set(a) | set(b)) if a.get(k, absent) != b.get(k, absent)]


def checkpoint_of(path: Path) -> Path | None:
    """The geo3k checkpoint a folder is (step-*/ with trainer_state.json) or holds (a run folder: its newest
    complete one); None for any other folder."""
    from train.checkpoints import incomplete_reason, resolve_latest

    if (path / "trainer_state.json").exists():
        why = incomplete_reason(path)
        if why is not None:
            raise ModelSourceError(f"the checkpoint {path} is {why}: name another one, or its run folder")
        return path
    if (path / "checkpoints").is_dir():
        ckpt, _ = resolve_latest(path)
        if ckpt is None:
            raise ModelSourceError(f"the run folder {path} holds no complete checkpoint yet")
        return ckpt
    return None


def download(hub_id: str) -> Path:
    """The local folder of a hub checkpoint: from the Hugging Face cache, else downloaded (weights, configs,
    processor files)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(hub_id, allow_patterns=["*.safetensors", "*.json", "*.jinja", "*.txt"]))
    except Exception as e:
        raise ModelSourceError(
            f"cannot get the checkpoint {hub_id!r} ({type(e).__name__}): it is not in the Hugging Face cache "
            f"and the Hub is unreachable; download it where there is network (hf download {hub_id}) into HF_HOME, or "
            f"set model.name_or_path to a local folder"
        ) from None


def resolve_source(name_or_path: str, *, pretrained: bool) -> ModelSource:
    """The config and weights `name_or_path` stands for (weights only when `pretrained`)."""
    from transformers import AutoConfig

    from shared.presets import HUB_IDS, resolve_preset
    from train.models import load_hf_config

    path = Path(name_or_path)
    if path.is_dir():
        ckpt = checkpoint_of(path)
        if ckpt is not None:
            hf_config = AutoConfig.for_model(**json.loads((ckpt / "hf_config.json").read_text()))
            return ModelSource(name_or_path, hf_config, ckpt if pretrained else None)
        if not (path / "config.json").exists():
            raise ModelSourceError(f"{path} has no config.json: name a transformers model folder, a geo3k run folder or a checkpoint")
        return ModelSource(name_or_path, AutoConfig.from_pretrained(str(path)), path if pretrained else None)
    preset = resolve_preset(name_or_path)
    if not pretrained:
        return ModelSource(name_or_path, load_hf_config(name_or_path), None, preset)
    hub_id = HUB_IDS.get(preset, name_or_path) if preset else name_or_path
    if preset and preset == name_or_path.strip() and preset not in HUB_IDS:
        raise ModelSourceError(
            f"the preset {preset!r} has no pretrained weights: set train.random_init=true, or set model.name_or_path "
            "to a checkpoint folder or hub id"
        )
    weights = download(hub_id)
    if not (weights / "config.json").exists():
        raise ModelSourceError(f"{hub_id} ({weights}) has no config.json")
    hf_config = AutoConfig.from_pretrained(str(weights))
    differences = []
    if preset:
        # both through transformers, so that defaults and renamed keys (rope_scaling -> rope_parameters) match
        differences = config_differences(load_hf_config(preset).to_dict(), hf_config.to_dict())
    return ModelSource(name_or_path, hf_config, weights, preset, differences)


def full_megatron_state(source: ModelSource) -> dict:
    """The full (unsplit) Megatron-layout state dict of a source's weights."""
    from train.models.convert import hf_to_megatron, read_safetensors_dir

    if source.is_geo3k_checkpoint:
        state = json.loads((source.weights / "trainer_state.json").read_text())
        if state.get("backend", "megatron") == "fsdp":
            from train.engine_fsdp import full_model_state

            return hf_to_megatron(full_model_state(source.weights), source.hf_config)
        from train.engine_megatron import merged_model_state

        return merged_model_state(source.weights, source.hf_config)
    return hf_to_megatron(read_safetensors_dir(source.weights), source.hf_config)
