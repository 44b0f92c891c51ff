"""The eval's vision-reliance metric: image_gain = eval loss with every image blanked - eval loss.

Through the real eval path (train.evaluate.eval_loss over the demo test shards, the FSDP engine on a tiny
random Qwen3-VL on CPU): pixels that reach the model move the loss, so the gain is not 0; an engine made to
ignore its pixels (every micro-batch blanked before its forward) gives exactly 0. That a *trained* model's gain
is clearly positive needs a model that has learnt to read diagrams, which a CPU test cannot train in its time
budget; `geo3k train` logs the figure at every eval (metrics.jsonl, TensorBoard, the eval line), and the
end-to-end tests check it is there.
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
