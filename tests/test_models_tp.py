"""Tensor parallelism for real: two CPU processes (gloo), each loading its shard from the converter,
run Megatron-Core's tensor-parallel layers; the per-token loss must equal transformers'.

The loss path is used because it needs only all-reduce: Megatron-Core's gathers allocate with
`torch.cuda.current_device()`. For the same reason the MoE model is not run here (its token dispatcher
gathers across tensor-parallel ranks); its expert shards are checked as tensors in test_models_convert.
"""

from __future__ import annotations

import os

import torch

from tests import models_fixtures as fx

FAMILIES = ["qwen3_vl", "qwen2_5_vl"]
TP = 2


def _labels(ids: torch.Tensor) -> torch.Tensor:
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[ids == fx.IMAGE_TOKEN] = -100
    return labels


def _worker(rank: int, port: int, world: int, root: str, queue) -> None:
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
        from megatron.core import parallel_state

        from tests.megatron_cpu import CPU_OVERRIDES
        from train.models import convert, load_hf_config
        from train.models.qwen_vl import build_model

        parallel_state.initialize_model_parallel(tensor_model_parallel_size=world)
        results = {}
        for family in FAMILIES:
            ckpt = os.path.join(root, family)
            cfg = load_hf_config(str(ckpt))
            overrides = dict(CPU_OVERRIDES, tensor_model_parallel_size=world)
            model = build_model(cfg, **overrides).eval()
            convert.load_hf_checkpoint(model, ckpt, tp_rank=rank, tp_size=world)
            batch = torch.load(os.path.join(ckpt, "batch.pt"))
            with torch.no_grad():
                results[family] = model(**batch, labels=_labels(batch["input_ids"])).tolist()
        if rank == 0:
            queue.put(results)
        torch.distributed.destroy_process_group()
    except Exception as e:  # surface the worker's error in the test
        queue.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def test_tp2_loss_equals_transformers(tmp_path):
    from tests.megatron_cpu import run_ranks

    refs = {}
    for family in FAMILIES:
        cfg, hf = fx.random_hf_model(family, seed=5, save_to=tmp_path / family, tie=family != "qwen2_5_vl")
        samples = [fx.make_sample(20, [(1, 4, 6)]), fx.make_sample(21, [(1, 6, 4), (1, 4, 4)])]
        positions = [fx.rope_positions(hf, s) for s in samples]
        batch = fx.pack(samples, positions)
        torch.save(batch, tmp_path / family / "batch.pt")
        logits = torch.cat([fx.hf_logits(hf, s, p) for s, p in zip(samples, positions)])
        labels = _labels(batch["input_ids"])
        labels[batch["cu_seqlens"][1:].long() - 1] = -100
        refs[family] = (torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none"), labels)

    got = run_ranks(_worker, TP, TP, str(tmp_path), timeout=180)
    assert isinstance(got, dict), got
    for family, (ref, labels) in refs.items():
        loss = torch.tensor(got[family])
        # boundary positions: the packed model has a (meaningless) target there, the reference none
        keep = labels != -100
        diff = (loss[keep] - ref[keep]).abs().max().item()
        print(f"{family}: TP=2 per-token loss vs transformers, max |diff| = {diff:.2e}")
        assert diff <= 1e-4, family
