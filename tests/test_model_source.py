"""Pretrained weights go into the architecture of their own config.json, not the preset's (train/models/source.py).

The checkpoint: a tiny Qwen3-VL written by transformers whose config differs from the tiny-qwen3-vl preset in
the settings a transcription gets wrong silently (3 decoder layers instead of 2, another rope_theta, another
rms_norm_eps, untied embeddings). Through the trainer's own path, the Megatron model built for it gives
transformers' logits on the first training batch; `geo3k train` trains it, its first step's loss is transformers'
loss on that batch, and the export's config.json carries the checkpoint's values. The same checkpoint in a local
Hugging Face cache under a known hub id (offline) is found there, wins over the preset and the log says where
they differed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, geo3k

LAYERS, THETA, EPS = 3, 250_000.0, 1e-5


@pytest.fixture(scope="module")
def custom_checkpoint(tmp_path_factory) -> Path:
    from transformers import AutoModelForImageTextToText

    from shared.presets import load_processor
    from tests.models_fixtures import randomize_
    from train.models import load_hf_config

    cfg = load_hf_config("tiny-qwen3-vl")
    text = cfg.text_config
    text.num_hidden_layers = LAYERS
    text.rms_norm_eps = EPS
    text.rope_parameters = {**text.rope_parameters, "rope_theta": THETA}
    cfg.tie_word_embeddings = text.tie_word_embeddings = False
    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
    randomize_(model, seed=2, std=0.05)
    out = tmp_path_factory.mktemp("custom") / "tiny-custom"
    model.save_pretrained(str(out))
    load_processor("tiny-qwen3-vl").processor.save_pretrained(str(out))
    return out


def _assert_custom(cfg: dict) -> None:
    text = cfg["text_config"]
    assert text["num_hidden_layers"] == LAYERS and text["rms_norm_eps"] == EPS
    assert (text.get("rope_parameters") or text.get("rope_scaling") or {}).get("rope_theta", text.get("rope_theta")) == THETA
    assert cfg["tie_word_embeddings"] is False


def _train_config(demo_shards: Path, name: str, out: Path, steps: int):
    from shared.config import load_config

    return load_config(REPO / "examples" / "tiny-cpu.yaml", [
        f"model.name_or_path={name}", "train.random_init=false", f"train.shards={demo_shards / 'train'}",
        f"train.output_dir={out}", "train.global_batch_size=4", f"train.train_iters={steps}", "train.save_interval=0",
        "train.eval_interval=0",
    ])


def _hf_reference(model, mb) -> tuple[torch.Tensor, float]:
    """(logits of every real token, summed per-token loss) from transformers, each packed sample alone."""
    from shared.presets import load_processor

    vision_start = load_processor("tiny-qwen3-vl").identity["special_ids"]["vision_start"]
    cu = mb.cu_seqlens.tolist()
    grids, pixels = mb.image_grid_thw, mb.pixel_values
    logits, loss, image, patch = [], 0.0, 0, 0
    for a, b in zip(cu[:-1], cu[1:]):
        ids = mb.input_ids[a:b]
        if b > mb.num_real_tokens:  # the padding tail
            break
        n = int((ids == vision_start).sum())
        kw = {}
        if n:
            g = grids[image : image + n]
            p = int(g.prod(dim=1).sum())
            kw = dict(pixel_values=pixels[patch : patch + p], image_grid_thw=g)
            image, patch = image + n, patch + p
        with torch.no_grad():
            out = model(input_ids=ids[None], position_ids=mb.position_ids[:, None, a:b], **kw).logits[0].float()
        logits.append(out)
        labels = mb.labels[a:b]
        keep = labels != -100
        loss += float(torch.nn.functional.cross_entropy(out[keep], labels[keep], reduction="sum"))
    return torch.cat(logits), loss


def test_trainer_builds_the_checkpoint_architecture(demo_shards, custom_checkpoint, tmp_path):
    from transformers import AutoModelForImageTextToText

    from train.trainer import Trainer

    trainer = Trainer(_train_config(demo_shards, str(custom_checkpoint), tmp_path / "inproc", 1))
    try:
        _assert_custom(trainer.hf_config.to_dict())
        inner = trainer.engine.inner
        assert len(inner.language_model.decoder.layers) == LAYERS
        assert not inner.share_embeddings_and_output_weights
        assert inner.language_model.rotary_pos_emb.theta == THETA
        step = next(iter(trainer.loader))
        hf = AutoModelForImageTextToText.from_pretrained(str(custom_checkpoint), dtype=torch.float32).eval()
        with trainer.engine.evaluating():
            got = [trainer.engine.logits(mb)[: mb.num_real_tokens].float() for mb in step.micro_batches if mb.num_real_tokens]
        refs = [_hf_reference(hf, mb) for mb in step.micro_batches if mb.num_real_tokens]
    finally:
        trainer.close()
    for logits, (ref, _) in zip(got, refs):
        diff = (logits - ref).abs().max().item()
        print(f"logits before step 1 vs transformers: max |diff| {diff:.2e}")
        assert logits.shape == ref.shape and diff <= 1e-4

    # `geo3k train` on the same data: its first step (the same batch) has transformers' loss; the export is the
    # checkpoint's architecture
    run = tmp_path / "run"
    geo3k(*_cli_args(demo_shards, str(custom_checkpoint), run), cwd=tmp_path)
    first = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"train"' in x][0]
    ref_loss = sum(loss for _, loss in refs) / step.num_loss_tokens
    assert first["step"] == 1 and abs(first["loss"] - ref_loss) <= 1e-5 * ref_loss, (first["loss"], ref_loss)
    geo3k("export", str(run), "--out", str(tmp_path / "export"), cwd=tmp_path)
    _assert_custom(json.loads((tmp_path / "export" / "config.json").read_text()))


def _cli_args(demo_shards: Path, name: str, run: Path) -> list[str]:
    return ["train", "-c", str(REPO / "examples" / "tiny-cpu.yaml"), "--set", f"model.name_or_path={name}",
            "--set", "train.random_init=false", "--set", f"train.shards={demo_shards / 'train'}",
            "--set", f"train.output_dir={run}", "--set", "train.global_batch_size=4", "--set", "train.train_iters=2",
            "--set", "train.save_interval=2", "--set", "train.eval_interval=0"]


def _hub_cache(home: Path, hub_id: str, folder: Path) -> None:
    """`folder` as the cached snapshot of `hub_id` in the Hugging Face cache under `home` (HF_HOME)."""
    repo = home / "hub" / f"models--{hub_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / "0123456789abcdef")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")


def test_known_hub_id_from_the_local_cache_wins_over_its_preset(demo_shards, custom_checkpoint, tmp_path, monkeypatch):
    # the hub id the qwen3-vl-2b preset stands for, holding the tiny checkpoint: the preset says 28 layers
    hub_id = "Qwen/Qwen3-VL-2B-Instruct"
    _hub_cache(tmp_path / "hf", hub_id, custom_checkpoint)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run = tmp_path / "run"
    proc = geo3k(*_cli_args(demo_shards, hub_id, run), cwd=tmp_path)
    assert "differs from the preset qwen3-vl-2b" in proc.stdout, proc.stdout[-3000:]
    lines = set(proc.stdout.splitlines())
    assert {"  text_config.num_hidden_layers: 28 -> 3", "  tie_word_embeddings: True -> False"} <= lines, proc.stdout[-3000:]
    geo3k("export", str(run), "--out", str(tmp_path / "export"), cwd=tmp_path)
    _assert_custom(json.loads((tmp_path / "export" / "config.json").read_text()))


def test_resolve_source(custom_checkpoint, tmp_path, monkeypatch):
    from train.models.source import ModelSourceError, resolve_source

    from huggingface_hub import constants

    _hub_cache(tmp_path / "hf", "someone/tiny-custom", custom_checkpoint)
    # in this process huggingface_hub has read HF_HOME already: point its constants at the cache
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    src = resolve_source("someone/tiny-custom", pretrained=True)
    _assert_custom(src.hf_config.to_dict())
    assert src.weights.name == "0123456789abcdef" and src.preset is None and not src.differences
    # random init: the preset's transcription, no weights
    src = resolve_source("tiny-qwen3-vl", pretrained=False)
    assert src.weights is None and src.hf_config.text_config.num_hidden_layers == 2
    with pytest.raises(ModelSourceError, match="has no pretrained weights"):
        resolve_source("tiny-qwen3-vl", pretrained=True)
    with pytest.raises(ModelSourceError, match="not in the Hugging Face cache"):
        resolve_source("someone/absent", pretrained=True)
    with pytest.raises(ModelSourceError, match="has no config.json"):
        resolve_source(str(tmp_path), pretrained=True)
