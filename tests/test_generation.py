"""KV-cached greedy generation (train/models/kv_cache.py, train/evaluate.py) gives token for token what the
uncached path gives (every new token re-runs the packed prompts) and what transformers' `generate(do_sample=False)`
gives on the same weights: tiny random models of both families (Qwen3-VL with deepstack, Qwen2.5-VL with window
attention), fp32 on CPU, prompts with real diagrams from shards, through the Megatron engine. The cache is made
small enough that the prompts split into several decode batches, and the prefill budget small enough that a
batch prefills in several packed chunks. The same under tensor parallelism (TP=2, and TP=2 with sequence
parallelism, whose decode rows are padded to a multiple of 2), two processes over gloo.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
import torch

from tests.conftest import make_config

NEW_TOKENS = 8
NUM_PROMPTS = 5


def _qwen25_config():
    from transformers import Qwen2_5_VLConfig

    from train.models import load_hf_config

    ref = load_hf_config("qwen2.5-vl-3b").to_dict()
    text = dict(vocab_size=ref["text_config"]["vocab_size"], hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32768,
                rope_parameters=dict(rope_type="default", rope_theta=1e6, mrope_section=[2, 3, 3]))
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                  temporal_patch_size=2, out_hidden_size=64, window_size=56, fullatt_block_indexes=[1])
    ids = {k: ref[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")}
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)


FAMILIES = {"qwen3_vl": "qwen3-vl-2b", "qwen2_5_vl": "qwen2.5-vl-3b"}  # family -> the processor of its shards


@pytest.fixture(scope="module")
def setups(demo_data, tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """family -> (checkpoint folder, test shards made by that family's processor)."""
    from transformers import AutoModelForImageTextToText

    from preprocess.pipeline import run_preprocess
    from tests.models_fixtures import randomize_
    from train.models import load_hf_config

    out = {}
    for family, processor in FAMILIES.items():
        root = tmp_path_factory.mktemp(family)
        cfg = load_hf_config("tiny-qwen3-vl") if family == "qwen3_vl" else _qwen25_config()
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForImageTextToText.from_config(cfg, dtype=torch.float32)
        randomize_(model, seed=3, std=0.1)
        model.save_pretrained(str(root / "ckpt"))
        pc = make_config(root / "shards", {"test": str(demo_data / "test.parquet")},
                         **{"model.name_or_path": processor, "source.max_rows": str(NUM_PROMPTS)})
        run_preprocess(pc, progress=False)
        out[family] = (root / "ckpt", root / "shards" / "geo3k" / "test")
    return out


def _engine(ckpt: Path, world, **train):
    from shared.config import TrainConfig
    from train.engine_megatron import MegatronEngine
    from train.models.source import resolve_source

    src = resolve_source(str(ckpt), pretrained=True)
    engine = MegatronEngine(src.hf_config, TrainConfig(bf16=False, **train), world, init_from=src)
    engine.model.eval()
    return engine


def _prompts(shards: Path, pad_to_multiple_of: int = 1):
    from shared.manifest import ShardSet
    from train.data import PackingSpec
    from train.evaluate import prompt_of

    ss = ShardSet(shards)
    return [prompt_of(s) for s in ss.iter_samples()], PackingSpec.from_processor_identity(ss.processor, pad_to_multiple_of)


def _generate(engine, prompts, spec, world, *, use_cache: bool, stop_id=None):
    from train.evaluate import generate_greedy

    longest = max(p.num_tokens for p in prompts)
    # a cache of two rows and a prefill budget of one prompt: several decode batches and prefill chunks
    return generate_greedy(engine, prompts, spec, max_new_tokens=NEW_TOKENS, stop_id=stop_id, budget=longest + 1,
                           world=world, pixel_dtype=torch.float32, use_cache=use_cache,
                           kv_cache_positions=2 * (longest + NEW_TOKENS))


def _one_process_world():
    from tests.megatron_cpu import init_megatron_cpu
    from train.distributed import World

    init_megatron_cpu()
    return World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, dp=1, dp_rank=0, tp_rank=0)


def _transformers_greedy(ckpt: Path, prompts, spec) -> list[list[int]]:
    from transformers import AutoModelForImageTextToText

    from train.data import pack_samples

    hf = AutoModelForImageTextToText.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # every answer NEW_TOKENS long, as ours with stop_id=None
    hf.generation_config.pad_token_id = 0
    out = []
    for p in prompts:
        mb = pack_samples([p], spec)
        ids = mb.input_ids[None]
        # mm_token_type_ids marks the image tokens, as transformers' processor does: the M-RoPE positions need it
        with torch.no_grad():
            seq = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=mb.pixel_values.float(),
                              image_grid_thw=mb.image_grid_thw, mm_token_type_ids=(ids == spec.image_token_id).int(),
                              do_sample=False, max_new_tokens=NEW_TOKENS)
        out.append(seq[0, ids.shape[1]:].tolist())
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_cached_equals_uncached_equals_transformers(setups, family):
    ckpt, shards = setups[family]
    world = _one_process_world()
    engine = _engine(ckpt, world)
    prompts, spec = _prompts(shards)
    assert len(prompts) == NUM_PROMPTS and all(p.num_patches for p in prompts)
    cached = _generate(engine, prompts, spec, world, use_cache=True)
    uncached = _generate(engine, prompts, spec, world, use_cache=False)
    ref = _transformers_greedy(ckpt, prompts, spec)
    print(f"{family}: cached {cached}\nuncached {uncached}\ntransformers {ref}")
    assert all(len(g) == NEW_TOKENS for g in cached)
    assert len({tuple(g) for g in cached}) > 1, "the prompts must get different answers for the test to mean much"
    assert cached == uncached == ref
    # a stop token ends each answer where it first appears (and is kept), in both paths
    stop = cached[0][NEW_TOKENS // 2]
    stopped = _generate(engine, prompts, spec, world, use_cache=True, stop_id=stop)
    assert stopped == _generate(engine, prompts, spec, world, use_cache=False, stop_id=stop)
    for full, cut in zip(cached, stopped):
        assert cut == (full[: full.index(stop) + 1] if stop in full else full)


def _tp_worker(rank: int, port: int, ckpt: str, shards: str, queue) -> None:
    try:
        os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        torch.set_num_threads(1)
        from train.distributed import init_distributed

        world = init_distributed(tp=2)
        results = {}
        for name, sp in (("tp2", False), ("tp2sp", True)):
            engine = _engine(Path(ckpt), world, tensor_parallel=2, sequence_parallel=sp)
            prompts, spec = _prompts(Path(shards), pad_to_multiple_of=2 if sp else 1)
            results[name] = (_generate(engine, prompts, spec, world, use_cache=True),
                             _generate(engine, prompts, spec, world, use_cache=False))
        if rank == 0:
            queue.put(results)
        torch.distributed.destroy_process_group()
    except Exception as e:  # surface the worker's error in the test
        queue.put(f"rank {rank}: {type(e).__name__}: {e}")
        raise


def test_tensor_parallel_generation_equals_one_process(setups):
    from tests.megatron_cpu import run_ranks

    ckpt, shards = setups["qwen3_vl"]
    world = _one_process_world()
    prompts, spec = _prompts(shards)
    one = _generate(_engine(ckpt, world), prompts, spec, world, use_cache=True)
    got = run_ranks(_tp_worker, 2, str(ckpt), str(shards), timeout=300)
    assert isinstance(got, dict), got
    for name, (cached, uncached) in got.items():
        assert cached == uncached == one, name
