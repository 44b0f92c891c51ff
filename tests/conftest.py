"""Shared fixtures: small shard sets made once per test session from the demo data and the real samples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import load_config

REPO = Path(__file__).resolve().parents[1]
# The ten real Geo3K problems live beside the checkout (../shared/geo3k_sample), never in the repo.
SAMPLE_DIR = Path(os.environ.get("GEO3K_SAMPLE_DIR", REPO.parent / "shared" / "geo3k_sample"))


def geo3k(*args: str, cwd: Path, threads: int = 2, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the real `geo3k` CLI in a subprocess (its own process group, as a user runs it); assert success.
    `env`: variables to set on top of this process's (PYTHONPATH included)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "geo3k", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"geo3k {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def from_checkpoint_args(demo_shards: Path, init: Path, out: Path, steps: int, *extra: str) -> list[str]:
    """`geo3k train` on the demo shards from the checkpoint folder `init` (tiny-cpu.yaml otherwise): batches of
    4, a constant learning rate, a checkpoint every step (all kept) and eval at the end."""
    return [
        "train",
        "-c", str(REPO / "examples" / "tiny-cpu.yaml"),
        "--set", f"model.name_or_path={init}",
        "--set", "train.random_init=false",
        "--set", f"train.shards={demo_shards / 'train'}",
        "--set", f"train.eval_shards={demo_shards / 'test'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.global_batch_size=4",
        "--set", f"train.train_iters={steps}",
        "--set", "train.save_interval=1",
        "--set", "train.keep_checkpoints=0",
        "--set", f"train.eval_interval={steps}",
        "--set", "train.eval_samples=2",
        "--set", "train.warmup_fraction=0",
        "--set", "train.min_lr=1e-3",  # = train.lr of tiny-cpu.yaml: a constant rate
        *extra,
    ]


def resume_from(run: Path, step: int, into: Path) -> None:
    """`into` as a run folder that holds `run`'s checkpoint of `step` as its latest (a run killed after it)."""
    import shutil

    name = f"step-{step:07d}"
    (into / "checkpoints").mkdir(parents=True)
    shutil.copytree(run / "checkpoints" / name, into / "checkpoints" / name)
    (into / "checkpoints" / "latest").write_text(name)


def train_losses(run: Path) -> dict[int, float]:
    """step -> training loss, from a run folder's metrics.jsonl."""
    import json

    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if r["kind"] == "train"}


def assert_trained_run(run: Path, steps: int) -> None:
    """What every backend's 20-step end-to-end run (checkpoints and eval every 10 steps) must show: a loss for
    each step, falling by more than 0.5 from the first five steps to the last five, checkpoints at steps 10 and
    20, and a finite eval loss (and image gain) at both."""
    import json

    import numpy as np

    losses = train_losses(run)
    assert sorted(losses) == list(range(1, steps + 1))
    assert np.mean([losses[s] for s in range(16, 21)]) < np.mean([losses[s] for s in range(1, 6)]) - 0.5
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000010", "step-0000020"]
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [e["step"] for e in evals] == [10, 20] and all(np.isfinite(e["loss"]) for e in evals)
    # the vision-reliance metric at every eval: the blanked-image loss, a different number
    for e in evals:
        assert e["image_gain"] != 0 and abs(e["image_gain"] - (e["loss_blank_images"] - e["loss"])) <= 1e-9, e


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Keep the processor cache of the tests out of the user's home."""
    os.environ.setdefault("GEO3K_CACHE", str(tmp_path_factory.mktemp("geo3k-cache")))


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    from preprocess.demo import write_demo_data

    out = tmp_path_factory.mktemp("demo")
    write_demo_data(out / "data", num_train=48, num_test=12, seed=0)
    return out / "data"


def make_config(out_dir: Path, files: dict[str, str], **extra: str):
    overrides = [f"shards.output_dir={out_dir}", "preprocess.workers=1", "preprocess.fetch.cache_dir="]
    overrides += [f"{k}={v}" for k, v in extra.items()]
    cfg = load_config(None, overrides)
    cfg.source.files = files
    cfg.source.splits = list(files)
    return cfg


@pytest.fixture(scope="session")
def demo_shards(demo_data, tmp_path_factory) -> Path:
    """data_shards-like root with geo3k/{train,test} made from the demo data (Qwen3-VL-2B processor)."""
    from preprocess.pipeline import run_preprocess

    out = tmp_path_factory.mktemp("demo-shards")
    cfg = make_config(
        out,
        {"train": str(demo_data / "train.parquet"), "test": str(demo_data / "test.parquet")},
        **{"shards.samples_per_shard": "8"},
    )
    run_preprocess(cfg, progress=False)
    return out / "geo3k"


@pytest.fixture(scope="session")
def sample_shards(tmp_path_factory) -> Path:
    """The ten real Geo3K problems of ../shared/geo3k_sample as a shard set (split 'train')."""
    from preprocess.pipeline import run_preprocess

    if not (SAMPLE_DIR / "problems.jsonl").exists():
        pytest.fail(f"{SAMPLE_DIR} is missing: set GEO3K_SAMPLE_DIR to the geo3k_sample folder")
    out = tmp_path_factory.mktemp("sample-shards")
    cfg = make_config(
        out,
        {"train": str(SAMPLE_DIR / "problems.jsonl")},
        **{"source.image_key": "image", "source.image_root": str(SAMPLE_DIR / "images"), "shards.samples_per_shard": "4"},
    )
    run_preprocess(cfg, progress=False)
    return out / "geo3k" / "train"


def random_checkpoint(preset: str, out: Path) -> Path:
    """A random model of `preset` written by transformers' save_pretrained, with its processor (which export
    copies). Its norm weights and MoE routers and experts are random too (not ones and zeros), so a weight whose
    gradient is reduced wrongly changes the result."""
    import torch
    from transformers import AutoModelForImageTextToText

    from shared.presets import load_processor
    from train.models import load_hf_config

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_config(load_hf_config(preset), dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif ".experts." in name or name.endswith("mlp.gate.weight"):
                p.copy_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(str(out))
    load_processor(preset).processor.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The one starting point of runs that must train the same tiny-qwen3-vl."""
    return random_checkpoint("tiny-qwen3-vl", tmp_path_factory.mktemp("init") / "tiny")


@pytest.fixture(scope="session")
def tiny_moe_checkpoint(tmp_path_factory) -> Path:
    """The one starting point of runs that must train the same tiny-qwen3-vl-moe."""
    return random_checkpoint("tiny-qwen3-vl-moe", tmp_path_factory.mktemp("init-moe") / "tiny-moe")


@pytest.fixture(scope="session")
def one_sample_eval(demo_data, tmp_path_factory) -> Path:
    """An eval split of a single problem: fewer samples than ranks, so one rank has nothing to evaluate."""
    from preprocess.pipeline import run_preprocess

    out = tmp_path_factory.mktemp("one-eval")
    cfg = make_config(out, {"test": str(demo_data / "test.parquet")}, **{"source.max_rows": "1"})
    run_preprocess(cfg, progress=False)
    return out / "geo3k" / "test"


# The slowest files first: the two workers of scripts/test.sh take whole files in this order, so a long file
# started last would run alone at the end.
_SLOW_FIRST = (
    "test_train_moe.py", "test_parallel_layouts.py", "test_train_fsdp.py", "test_durability.py", "test_train_e2e.py", "test_ray.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order
