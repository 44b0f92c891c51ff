"""`geo3k inspect`: every mode on the demo shards and the ten real Geo3K problems (CPU, a few seconds).

    .venv/bin/python -m pytest tests/test_inspect.py -q
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from geo3k.cli import app
from geo3k.inspect import InspectError
from geo3k.inspect.sample import MARK_CLOSE, MARK_OPEN, format_sample, unpatchify, view_sample
from shared.manifest import ShardSet

from tests.conftest import SAMPLE_DIR, make_config

runner = CliRunner()


def inspect(*args: str, ok: bool = True) -> str:
    result = runner.invoke(app, ["inspect", *map(str, args)])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def inspect_json(*args: str, ok: bool = True) -> dict:
    return json.loads(inspect(*args, "--json", ok=ok))


@pytest.fixture(scope="module", params=["demo-train", "demo-test", "sample"])
def shard_set(request, demo_shards, sample_shards) -> Path:
    return {"demo-train": demo_shards / "train", "demo-test": demo_shards / "test", "sample": sample_shards}[request.param]


# ---------------------------------------------------------------- batching: the training plan


def _training_epoch(split: Path, dp_size: int = 1, **cfg) -> dict:
    """Epoch 0 as the training loader plans it (DataConfig with the trainer's seed default, train.seed=1234)."""
    from train.data import DataConfig, build_loader

    steps = build_loader(split, DataConfig(num_workers=0, seed=1234, **cfg), 0, dp_size).plan(0).steps
    return {
        "steps": len(steps),
        "micro_batches": sum(s.num_micro_batches for s in steps),
        "packed_tokens": sum(s.num_tokens for s in steps),
        "dropped": 0 if not steps else len(ShardSet(split).index()) - sum(s.num_samples for s in steps),
        "max_samples_per_micro_batch": max(len(b) for s in steps for rank in s.micro_batches for b in rank),
    }


def test_batching_is_the_training_loaders_plan(demo_shards):
    split = demo_shards / "train"  # 48 samples
    for gbs, nproc, budget in ((16, 1, 4096), (20, 2, 2048), (48, 4, 8192)):
        args = ("--set", f"train.global_batch_size={gbs}", "--nproc", str(nproc), "--budget", str(budget))
        b = inspect_json(split, *args)["batching"]
        want = _training_epoch(split, nproc, max_tokens_per_gpu=budget, global_batch_size=gbs)
        assert {k: b[k] for k in want} == want, (gbs, nproc, budget)
        assert (b["budget"], b["global_batch_size"], b["data_parallel"], b["over_budget"]) == (budget, gbs, nproc, 0)
        assert b["fill_ratio"] == pytest.approx(want["packed_tokens"] / (want["micro_batches"] * nproc * budget), abs=1e-4)
        text = inspect(split, *args)
        assert f"{b['micro_batches']} micro-batch" in text and f"{b['steps']} step" in text
        assert (f"{b['dropped']} samples left out of the epoch by drop_last" in text) == bool(b["dropped"])
    assert b["dropped"] == 0 and _training_epoch(split, 1, global_batch_size=20)["dropped"] == 8


def test_batching_counts_what_training_refuses(demo_shards, sample_shards):
    text = inspect(sample_shards)  # 10 samples, train.global_batch_size 128 by default
    assert "0 micro-batches per epoch: 10 samples, fewer than one global batch of 128" in text
    assert "lower train.global_batch_size" in text
    lengths = ShardSet(demo_shards / "train").index().column("num_tokens").to_pylist()
    budget = sorted(lengths)[len(lengths) // 2]
    b = inspect_json(demo_shards / "train", "--budget", str(budget), "--set", "train.global_batch_size=8")["batching"]
    assert b["over_budget"] == sum(n > budget for n in lengths) > 0
    assert "samples are longer than the budget: training refuses them" in inspect(demo_shards / "train", "--budget", str(budget))
    with pytest.raises(InspectError, match="multiple of train.tensor_parallel=2"):
        inspect(sample_shards, "--nproc", "3", "--set", "train.tensor_parallel=2")


# ---------------------------------------------------------------- summary


def test_summary_counts_match_the_manifest(shard_set):
    m = json.loads((shard_set / "manifest.json").read_text())
    d = inspect_json(shard_set)
    assert d["samples"] == d["manifest_samples"] == m["counts"]["written"] == sum(s["samples"] for s in m["shards"])
    assert d["shards"] == len(m["shards"])
    assert d["bytes"] == m["counts"]["bytes"]
    assert d["rows"] == m["counts"]["rows"] == d["samples"] + d["rejected"]
    assert d["fingerprint"] == m["fingerprint"]
    assert (d["tokens"]["total"], d["tokens"]["image"], d["tokens"]["loss"]) == (
        m["counts"]["tokens"],
        m["counts"]["image_tokens"],
        m["counts"]["loss_tokens"],
    )
    lengths = ShardSet(shard_set).index().column("num_tokens").to_pylist()
    assert d["tokens"]["min"] == min(lengths) and d["tokens"]["max"] == max(lengths)
    assert d["tokens"]["min"] <= d["tokens"]["median"] <= d["tokens"]["p95"] <= d["tokens"]["max"]
    assert d["processor"]["preset"] == m["processor"]["preset"]
    assert d["processor"]["chat_template_sha256"] == m["processor"]["chat_template_sha256"]
    b = d["batching"]
    assert b["budget"] == 4096 and b["global_batch_size"] == 128 and b["over_budget"] == 0

    text = inspect(shard_set)
    assert m["fingerprint"] in text
    assert f"samples      {d['samples']:,} of {m['counts']['rows']:,} source rows" in text
    assert "  batching     4,096 tokens/GPU: 0 micro-batches per epoch" in text  # fewer samples than one global batch


def test_summary_budget_changes_the_batching(demo_shards):
    small = inspect_json(demo_shards / "train", "--budget", "320", "--set", "train.global_batch_size=16")["batching"]
    large = inspect_json(demo_shards / "train", "--budget", "8192", "--set", "train.global_batch_size=16")["batching"]
    assert small["budget"] == 320 and small["micro_batches"] > large["micro_batches"]


def test_summary_counts_rejects_by_reason(tmp_path):
    from preprocess.pipeline import run_preprocess

    cfg = make_config(
        tmp_path,
        {"train": str(SAMPLE_DIR / "problems.jsonl")},
        **{"source.image_key": "image", "source.image_root": str(SAMPLE_DIR / "images"), "preprocess.max_tokens": "200"},
    )
    run_preprocess(cfg, progress=False)
    split = tmp_path / "geo3k" / "train"
    m = json.loads((split / "manifest.json").read_text())
    assert m["counts"]["rejected"].get("too-long")  # the three big diagrams exceed 200 tokens
    d = inspect_json(split)
    assert d["rejects_by_reason"] == m["counts"]["rejected"]
    assert d["samples"] + d["rejected"] == 10
    text = inspect(split)
    assert f"rejected: too-long {m['counts']['rejected']['too-long']}" in text
    assert "e.g. too-long: row" in text


# ---------------------------------------------------------------- one sample


def test_sample_marks_the_answer_and_only_the_answer(shard_set):
    ss = ShardSet(shard_set)
    for i in range(min(ss.num_samples, 4)):
        d = inspect_json(shard_set, "--sample", str(i))
        answer = d["answer"]
        # the loss covers the answer and its closing <|im_end|>, nothing else
        assert d["loss_text"] == f"{answer}<|im_end|>"
        assert [s["text"] for s in d["segments"] if s["loss"]] == [f"{answer}<|im_end|>"]
        assert d["segments"][-1] == {"kind": "text", "text": "\n", "num_tokens": 1, "loss": False}
        assert sum(s["num_tokens"] for s in d["segments"]) == d["num_tokens"]

        text = inspect(shard_set, "--sample", str(i))
        assert text.count(MARK_OPEN) == text.count(MARK_CLOSE) == 2  # the legend line and the one span
        assert f"{MARK_OPEN}{answer}<|im_end|>{MARK_CLOSE}" in text
        assert "<|image_pad|>" not in text and "\x1b[" not in text
        for im in d["images"]:
            t, h, w = im["grid"]
            assert f"<image {im['image']}: grid {t}x{h}x{w}, {im['num_tokens']} tokens>" in text
            assert im["num_tokens"] == t * h * w // 4


def test_sample_by_key_equals_by_index(sample_shards):
    by_index = inspect_json(sample_shards, "--sample", "3")
    by_key = inspect_json(sample_shards, "--sample", by_index["key"])
    assert by_key == by_index and by_index["index"] == 3


def test_sample_colour_on_a_terminal_only(sample_shards):
    d, _ = view_sample(sample_shards, 0)
    coloured, plain = format_sample(d, color=True), format_sample(d, color=False)
    assert "\x1b[1;32m" + d["loss_text"] + "\x1b[0m" in coloured
    assert MARK_CLOSE not in coloured
    assert "\x1b[" not in plain and MARK_OPEN + d["loss_text"] + MARK_CLOSE in plain


# ---------------------------------------------------------------- images


def _processor_resized(path: Path, image_processor) -> np.ndarray:
    """The source picture as the processor resizes it (its own resize step: smart_resize + bicubic)."""
    import torch

    src = np.array(Image.open(path).convert("RGB"))
    t = torch.from_numpy(src).permute(2, 0, 1)[None]
    factor = image_processor.patch_size * image_processor.merge_size
    out = image_processor.resize(t, size=image_processor.size, resample=image_processor.resample, factor=factor)
    return out[0].permute(1, 2, 0).numpy()


def test_unpatchify_inverts_the_processor_patchify():
    import torch
    from shared.presets import load_processor

    ip = load_processor("qwen2.5-vl-3b").processor.image_processor  # patch 14 here, 16 in Qwen3-VL
    p, m = ip.patch_size, ip.merge_size
    img = torch.randint(0, 256, (1, 3, 6 * p, 4 * p), dtype=torch.uint8)
    rows, gh, gw = ip.patchify(img, patch_size=p, merge_size=m, temporal_patch_size=ip.temporal_patch_size)
    patches = rows[0].reshape(gh * gw, 3, ip.temporal_patch_size, p, p)[:, :, 0].numpy()
    assert np.array_equal(unpatchify(patches, (1, gh, gw), m), img[0].permute(1, 2, 0).numpy())


def test_save_image_gives_back_the_diagram(sample_shards, tmp_path):
    from shared.presets import load_processor

    ss = ShardSet(sample_shards)
    ip = load_processor(ss.processor["preset"]).processor.image_processor
    for i in range(ss.num_samples):
        out = tmp_path / f"s{i}.png"
        d = inspect_json(sample_shards, "--sample", str(i), "--save-image", out)
        assert d["saved_images"] == [{"image": 1, "path": str(out), "width": d["images"][0]["pixels"][1], "height": d["images"][0]["pixels"][0]}]
        got = np.array(Image.open(out))
        want = _processor_resized(SAMPLE_DIR / "images" / d["images"][0]["source"]["source"], ip)
        assert got.shape == want.shape
        assert np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() <= 1.0


def test_save_image_on_demo_shards(demo_shards, tmp_path):
    from shared.presets import load_processor

    ss = ShardSet(demo_shards / "train")
    ip = load_processor(ss.processor["preset"]).processor.image_processor
    out = tmp_path / "demo.png"
    d = inspect_json(demo_shards / "train", "--sample", "5", "--save-image", out)
    src = d["images"][0]["source"]["source"].removeprefix("file://")
    want = _processor_resized(Path(src), ip)
    got = np.array(Image.open(out))
    assert got.shape == want.shape and np.abs(got.astype(np.int16) - want.astype(np.int16)).mean() <= 1.0
    assert f"wrote {out}" in inspect(demo_shards / "train", "--sample", "5", "--save-image", out)


# ---------------------------------------------------------------- verify


def test_verify_passes(shard_set):
    d = inspect_json(shard_set, "--verify")
    assert d["ok"] and d["problems"] == []
    assert d["records"] == d["manifest_samples"] == ShardSet(shard_set).num_samples
    assert inspect(shard_set, "--verify").startswith("ok: ")


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def test_verify_catches_a_flipped_byte(demo_shards, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(demo_shards / "train", bad)
    shards = sorted(bad.glob("shard-*.tar"))
    _flip_byte(shards[1], shards[1].stat().st_size // 2)  # in some record's data
    _flip_byte(shards[3], 600)  # in the first record's .npy header region
    d = inspect_json(bad, "--verify", ok=False)
    assert not d["ok"] and d["bad_shards"] == [shards[1].name, shards[3].name]
    text = inspect(bad, "--verify", ok=False)
    assert text.startswith("FAILED")
    for s in (shards[1], shards[3]):
        assert f"{s.name}: sha256" in text
    for s in shards[:1] + shards[2:3] + shards[4:]:
        assert s.name not in text


def test_verify_names_missing_and_stray_shards(sample_shards, tmp_path):
    bad = tmp_path / "train"
    shutil.copytree(sample_shards, bad)
    shards = sorted(bad.glob("shard-*.tar"))
    shards[0].unlink()
    shutil.copy(shards[1], bad / "shard-000099.tar")
    d = inspect_json(bad, "--verify", ok=False)
    by_shard = {p["shard"]: p["problem"] for p in d["problems"]}
    assert "missing" in by_shard[shards[0].name]
    assert "stray" in by_shard["shard-000099.tar"]


# ---------------------------------------------------------------- plot


def test_plot_writes_a_png(demo_shards, tmp_path):
    out = tmp_path / "lengths.png"
    d = inspect_json(demo_shards / "train", "--plot", out, "--budget", "2048")
    assert d["plot"]["path"] == str(out) and d["plot"]["budget"] == 2048
    assert d["plot"]["samples"] == d["samples"]
    with Image.open(out) as im:
        assert im.format == "PNG" and im.width > 500 and im.height > 300
    assert f"wrote {out}" in inspect(demo_shards / "train", "--verify", "--plot", out)


# ---------------------------------------------------------------- errors


def _geo3k(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "geo3k", *map(str, args)], capture_output=True, text=True, env={**os.environ, "GEO3K_DEBUG": ""}, timeout=120
    )


def test_the_geo3k_script_runs_the_cli():
    """pyproject.toml's `geo3k` script is the main() that `python -m geo3k` runs."""
    import importlib
    import re

    from geo3k import cli

    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    module, name = re.search(r'^geo3k = "([\w.]+):(\w+)"$', pyproject, re.M).groups()
    assert getattr(importlib.import_module(module), name) is cli.main


def test_errors_are_one_line_with_exit_code_2(sample_shards, demo_shards, tmp_path):
    newer = tmp_path / "newer"
    shutil.copytree(sample_shards, newer)
    m = json.loads((newer / "manifest.json").read_text())
    m["format_version"] = 99
    (newer / "manifest.json").write_text(json.dumps(m))
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = {
        tmp_path / "nope": "is not a folder",
        empty: "has no manifest.json: it is not a shard set",
        demo_shards: "it holds split folders",  # the dataset folder, not a split
        newer: "format version 99",
    }
    for path, words in cases.items():
        r = _geo3k("inspect", path)
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
        assert words in r.stderr
    r = _geo3k("inspect", sample_shards, "--save-image", tmp_path / "x.png")
    assert r.returncode == 2 and "--sample" in r.stderr and r.stderr.count("\n") == 1
