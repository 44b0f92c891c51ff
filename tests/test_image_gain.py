"""The eval's vision-reliance metric: image_gain = eval loss with every image blanked - eval loss.

Through the real eval path (train.evaluate.eval_loss over the demo test shards, the FSDP engine on a tiny
random Qwen3-VL on CPU): pixels that reach the model move the loss, so the gain is not 0; an engine made to
ignore its pixels (every micro-batch blanked before its forward) gives exactly 0. And through `geo3k train`: a
tiny model trained for 40 steps on problems whose answer is only in the image (the same question; a red
picture means 7, a blue one 3) answers every test problem and shows a large positive gain, while its loss
without the images stays at what guessing costs.
"""

from __future__ import annotations

import torch

from train.data import DataConfig


def test_image_gain_is_zero_only_when_pixels_are_ignored(demo_shards, tmp_path):
    from shared.config import TrainConfig
    from tests.megatron_cpu import init_cpu_group
    from train.distributed import World
    from train.engine_fsdp import FSDPEngine
    from train.evaluate import blank_images, eval_loss
    from train.models import load_hf_config

    init_cpu_group()
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, dp=1, dp_rank=0, tp_rank=0)
    engine = FSDPEngine(load_hf_config("tiny-qwen3-vl"), TrainConfig(bf16=False, seed=3), world, init_from=None)
    data = DataConfig(max_tokens_per_gpu=4096, global_batch_size=4)
    test = demo_shards / "test"

    seen = eval_loss(engine, test, data, world, torch.float32, image_gain=True)
    assert seen["loss_blank_images"] != seen["loss"]
    assert abs(seen["image_gain"]) > 1e-6
    assert seen["image_gain"] == seen["loss_blank_images"] - seen["loss"]

    forward = engine.eval_loss
    engine.eval_loss = lambda mb: forward(blank_images(mb))  # the pixels never reach the model
    blind = eval_loss(engine, test, data, world, torch.float32, image_gain=True)
    assert blind["image_gain"] == 0.0
    # blanking is what the blind engine does to every batch: its loss is the first run's blank loss
    assert abs(blind["loss"] - seen["loss_blank_images"]) <= 1e-6 * seen["loss"]


def test_a_model_that_reads_its_images_has_a_large_gain(tmp_path):
    import json

    from PIL import Image

    from preprocess.pipeline import run_preprocess
    from tests.conftest import REPO, geo3k, make_config

    colours = {"red": ((220, 30, 30), "7"), "blue": ((30, 30, 220), "3")}
    (tmp_path / "images").mkdir()
    for name, (rgb, _) in colours.items():
        Image.new("RGB", (64, 64), rgb).save(tmp_path / "images" / f"{name}.png")
    for split, n in (("train", 32), ("test", 8)):
        with open(tmp_path / f"{split}.jsonl", "w") as f:
            for i in range(n):
                name = list(colours)[i % 2]
                f.write(json.dumps({"id": i, "problem": "<image>Which number is this?", "answer": colours[name][1], "image": f"{name}.png"}) + "\n")
    cfg = make_config(tmp_path / "shards", {s: str(tmp_path / f"{s}.jsonl") for s in ("train", "test")},
                      **{"source.image_key": "image", "source.image_root": str(tmp_path / "images")})
    run_preprocess(cfg, progress=False)
    shards, run = tmp_path / "shards" / "geo3k", tmp_path / "run"
    geo3k("train", "-c", str(REPO / "examples" / "tiny-cpu.yaml"), "--set", f"train.shards={shards / 'train'}",
          "--set", f"train.eval_shards={shards / 'test'}", "--set", f"train.output_dir={run}", "--set", "train.global_batch_size=8",
          "--set", "train.epochs=10", "--set", "train.train_iters=null", "--set", "train.lr=1e-2", "--set", "train.min_lr=1e-3",
          "--set", "train.warmup_fraction=0", "--set", "train.eval_interval=40", "--set", "train.save_interval=0",
          "--set", "train.save_last=false", "--set", "train.eval_samples=8", "--set", "train.eval_max_new_tokens=2", cwd=tmp_path, threads=1)
    (ev,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    print(f"after 40 steps: loss {ev['loss']:.4f}, blank-image loss {ev['loss_blank_images']:.4f}, accuracy {ev['accuracy']:.2f}")
    assert ev["step"] == 40 and ev["accuracy"] == 1.0
    # answer + <|im_end|> per problem: without the image the answer token is at best a coin toss (ln 2 / 2 per
    # token); measured: loss 0.14, blank-image loss 1.71
    assert ev["loss"] < 0.3 and ev["loss_blank_images"] > max(0.35, 5 * ev["loss"]) and ev["image_gain"] > 0.5
