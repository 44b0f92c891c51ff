"""Checkpoint conversion as pure tensor functions: HF <-> Megatron layouts and tensor-parallel shards."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests import models_fixtures as fx
from train.models import convert


@pytest.fixture(scope="module", params=["qwen3_vl", "qwen2_5_vl", "qwen3_vl_moe"])
def hf_state(request):
    cfg = fx.tiny_config(request.param, tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fx.hf_model_class(request.param)(cfg)
    fx.randomize_(model, seed=3)
    # In-memory names are the nested layout; expert tensors as transformers holds them.
    return cfg, {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_hf_megatron_hf_is_identity(hf_state):
    cfg, hf = hf_state
    back = convert.megatron_to_hf(convert.hf_to_megatron(hf, cfg), cfg)
    assert sorted(back) == sorted(hf)
    for key in hf:
        assert torch.equal(back[key], hf[key]), key


def test_qkv_fusion_is_grouped_per_kv_head(hf_state):
    cfg, hf = hf_state
    nh, ng, hd = cfg.text_config.num_attention_heads, cfg.text_config.num_key_value_heads, 16
    mg = convert.hf_to_megatron(hf, cfg)
    qkv = mg["language_model.decoder.layers.0.self_attention.linear_qkv.weight"]
    q = hf["model.language_model.layers.0.self_attn.q_proj.weight"]
    k = hf["model.language_model.layers.0.self_attn.k_proj.weight"]
    per = nh // ng
    rows = qkv.reshape(ng, per + 2, hd, -1)
    for g in range(ng):
        assert torch.equal(rows[g, :per].reshape(per * hd, -1), q[g * per * hd:(g + 1) * per * hd])
        assert torch.equal(rows[g, per], k[g * hd:(g + 1) * hd])


def test_tensor_parallel_split_semantics_and_merge(hf_state):
    cfg, hf = hf_state
    full = convert.hf_to_megatron(hf, cfg)
    tp = 2
    ranks = convert.split_tensor_parallel(full, tp, cfg)
    p = "language_model.decoder.layers.0."
    text = cfg.text_config
    nh, ng, hd = text.num_attention_heads, text.num_key_value_heads, 16
    for r, shard in enumerate(ranks):
        # qkv: rank r holds whole groups r*ng/tp ... with their own q, k, v heads
        gs = slice(r * ng // tp, (r + 1) * ng // tp)
        hs = slice(r * nh // tp * hd, (r + 1) * nh // tp * hd)
        ks = slice(gs.start * hd, gs.stop * hd)
        a = "model.language_model.layers.0.self_attn."
        want = convert.fuse_qkv(hf[a + "q_proj.weight"][hs], hf[a + "k_proj.weight"][ks], hf[a + "v_proj.weight"][ks],
                                nh // tp, ng // tp, hd)
        assert torch.equal(shard[p + "self_attention.linear_qkv.weight"], want)
        # row-parallel output projection: input columns of this rank's heads
        assert torch.equal(shard[p + "self_attention.linear_proj.weight"], hf[a + "o_proj.weight"][:, hs])
        # vocabulary split and the replicated vision tower
        v = text.vocab_size // tp
        assert torch.equal(shard["language_model.embedding.word_embeddings.weight"],
                           hf["model.language_model.embed_tokens.weight"][r * v:(r + 1) * v])
        assert torch.equal(shard["language_model.output_layer.weight"], hf["lm_head.weight"][r * v:(r + 1) * v])
        assert torch.equal(shard["vision.model.patch_embed.proj.weight"], hf["model.visual.patch_embed.proj.weight"])
    # fc1 of a dense layer: rank r = [gate_r; up_r]
    dense = 1 if cfg.model_type == "qwen3_vl_moe" else 0
    m = f"model.language_model.layers.{dense}.mlp."
    inter = text.intermediate_size // tp
    for r, shard in enumerate(ranks):
        fc1 = shard[f"language_model.decoder.layers.{dense}.mlp.linear_fc1.weight"]
        assert torch.equal(fc1, torch.cat([hf[m + "gate_proj.weight"][r * inter:(r + 1) * inter],
                                           hf[m + "up_proj.weight"][r * inter:(r + 1) * inter]]))
    merged = convert.merge_tensor_parallel(ranks)
    assert sorted(merged) == sorted(full)
    for key in full:
        assert torch.equal(merged[key], full[key]), key


def test_split_refuses_indivisible_groups(hf_state):
    cfg, hf = hf_state
    with pytest.raises(ValueError, match="num_key_value_heads"):
        convert.split_tensor_parallel(convert.hf_to_megatron(hf, cfg), 4, cfg)


def test_hub_expert_layout_is_transposed_back():
    cfg = fx.tiny_config("qwen3_vl_moe", tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fx.hf_model_class("qwen3_vl_moe")(cfg)
    fx.randomize_(model, seed=4)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hub = {k: (v.transpose(1, 2).contiguous() if ".experts." in k else v) for k, v in hf.items()}
    a, b = convert.hf_to_megatron(hf, cfg), convert.hf_to_megatron(hub, cfg)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_legacy_flat_names_are_read():
    cfg = fx.tiny_config("qwen2_5_vl", tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fx.hf_model_class("qwen2_5_vl")(cfg)
    hf = model.state_dict()
    flat = convert.to_disk_keys(hf, cfg)
    assert "visual.patch_embed.proj.weight" in flat and "model.layers.0.mlp.up_proj.weight" in flat
    a, b = convert.hf_to_megatron(hf, cfg), convert.hf_to_megatron(flat, cfg)
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_expert_tensor_and_expert_parallel_splits():
    """Experts under TP: every expert's I dimension sliced (gate and up alike); under EP: whole experts."""
    cfg = fx.tiny_config("qwen3_vl_moe", tie=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = fx.hf_model_class("qwen3_vl_moe")(cfg)
    fx.randomize_(model, seed=5)
    hf = {k: v.detach().clone() for k, v in model.state_dict().items()}
    full = convert.hf_to_megatron(hf, cfg)
    key = "language_model.decoder.layers.0.mlp.experts."
    gate_up, down = hf["model.language_model.layers.0.mlp.experts.gate_up_proj"], hf["model.language_model.layers.0.mlp.experts.down_proj"]
    assert torch.equal(full[key + "gate_up_proj"], gate_up) and torch.equal(full[key + "down_proj"], down)
    inter = cfg.text_config.moe_intermediate_size
    for r, shard in enumerate(convert.split_tensor_parallel(full, 2, cfg)):
        half = slice(r * inter // 2, (r + 1) * inter // 2)
        want = torch.cat([gate_up[:, :inter][:, half], gate_up[:, inter:][:, half]], dim=1)
        assert torch.equal(shard[key + "gate_up_proj"], want)
        assert torch.equal(shard[key + "down_proj"], down[:, :, half])
    experts = {k: v for k, v in full.items() if convert.is_expert_key(k)}
    assert sorted(experts) == sorted(f"language_model.decoder.layers.{i}.mlp.experts.{n}" for i in (0, 2) for n in ("gate_up_proj", "down_proj"))
    ranks = convert.split_expert_parallel(experts, 2)
    e = cfg.text_config.num_experts // 2
    assert torch.equal(ranks[1][key + "gate_up_proj"], gate_up[e:])
    merged = convert.merge_expert_parallel(ranks)
    assert all(torch.equal(merged[k], experts[k]) for k in experts)
    shard = convert.shard_for_rank(full, cfg, tp_rank=1, tp_size=2, ep_rank=1, ep_size=2)
    assert torch.equal(shard[key + "down_proj"], down[e:, :, inter // 2:])
