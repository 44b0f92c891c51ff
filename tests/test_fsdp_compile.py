"""The FSDP backend's speed-ups on CPU: compiled transformers layers under FSDP2, one process's gathers kept for the
step, fused AdamW as an option.

The engine compiles only on GPUs, so the test calls `compile_hf_layers` on a CPU engine's FSDP-sharded model
itself. As in tests/test_layer_compile.py, a stand-in custom op takes the place of torch's `varlen_attn` (our exact
CPU attention loops over segments in Python, a graph break); this one also takes `max_seqlen` and checks it, as
`varlen_attn` takes it on GPUs: the Python ints that change with every micro-batch (transformers' `max_length_q/k`,
the vision blocks' `max_seqlen`) must reach the op as the micro-batch's own values, without a graph per value.
"""

from __future__ import annotations

import inspect
from types import SimpleNamespace

import pytest
import torch

from tests import models_fixtures as fx
from tests.test_layer_compile import _standin_bwd
from train.models import attention


@torch.library.custom_op("geo3k_test_fsdp::varlen_attn", mutates_args=())
def _attn_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_seqlen: int, causal: bool,
              scale: float) -> torch.Tensor:
    longest = int((cu[1:] - cu[:-1]).max())
    assert max_seqlen == longest, f"attention got max_seqlen {max_seqlen} for segments of at most {longest} tokens"
    return attention._sdpa_loop(q, k, v, cu, causal, scale)


@_attn_fwd.register_fake
def _(q, k, v, cu, max_seqlen, causal, scale):
    return torch.empty_like(q)


def _setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:4])
    ctx.causal, ctx.scale = inputs[5], inputs[6]


def _backward(ctx, g):
    q, k, v, cu = ctx.saved_tensors
    dq, dk, dv = _standin_bwd(g, q, k, v, cu, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None, None, None


_attn_fwd.register_autograd(_backward, setup_context=_setup)


def varlen_attn_standin(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, scale=None, window_size=(-1, -1)):
    """torch 2.11's varlen_attn signature (the parts this code uses)."""
    causal = tuple(window_size) == (-1, 0)
    return _attn_fwd(query, key, value, cu_seq_q, max_q, causal, float(scale if scale is not None else query.shape[-1] ** -0.5))


@pytest.fixture
def standin_varlen(monkeypatch):
    monkeypatch.setattr(attention, "_TORCH_VARLEN", (varlen_attn_standin, frozenset(inspect.signature(varlen_attn_standin).parameters)))
    monkeypatch.setattr(attention, "available_backends", lambda device, dtype: ["torch_varlen", "sdpa"])
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _engine(cfg, checkpoint, **train):
    from shared.config import TrainConfig
    from tests.megatron_cpu import init_cpu_group
    from train.distributed import World
    from train.engine_fsdp import FSDPEngine
    from train.models.source import resolve_source

    init_cpu_group()
    world = World(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), tp=1, dp=1, dp_rank=0, tp_rank=0)
    return FSDPEngine(cfg, TrainConfig(bf16=False, **train), world, init_from=resolve_source(str(checkpoint), pretrained=True))


def _micro_batch(hf, seed, grids):
    """A packed micro-batch of one sample per image grid, as the data path gives it (positions shipped)."""
    samples = [fx.make_sample(seed + i, [g]) for i, g in enumerate(grids)]
    batch = fx.pack(samples, [fx.rope_positions(hf, s) for s in samples])
    labels = batch["input_ids"].roll(-1).clone()
    labels[::3] = -100
    return SimpleNamespace(
        **batch, labels=labels, num_images=len(grids), num_real_tokens=len(labels),
        loss_positions=(labels != -100).nonzero().squeeze(1),
        image_positions=(batch["input_ids"] == fx.IMAGE_TOKEN).nonzero().squeeze(1),
    )


def _grads(engine):
    return {n: p.grad.full_tensor() for n, p in engine.model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("per_block", [False, True])  # one process's single group; several processes' per-layer groups
def test_compiled_hf_layers_under_fsdp_equal_eager(per_block, standin_varlen, tmp_path, monkeypatch):
    """Qwen3-VL (deepstack) under FSDP2: compiled layers give the eager loss and gradients on micro-batches of
    two lengths, sample counts and longest samples, with no graph break and no new graph for the second; also
    with FSDP's hooks around each compiled layer, as several processes shard (here forced on one)."""
    from torch._dynamo.utils import counters

    from train import engine_fsdp
    from train.models.layer_compile import compile_hf_layers

    real = engine_fsdp.shard_model
    monkeypatch.setattr(engine_fsdp, "shard_model", lambda *a, **k: real(*a, **{**k, "per_block": per_block}))
    cfg, hf = fx.random_hf_model("qwen3_vl", seed=3, save_to=tmp_path)
    eager, compiled = _engine(cfg, tmp_path), _engine(cfg, tmp_path)
    assert len(compiled.fsdp_modules) == (1 + cfg.text_config.num_hidden_layers + cfg.vision_config.depth if per_block else 1)
    assert compile_hf_layers(compiled.model) == (cfg.text_config.num_hidden_layers, cfg.vision_config.depth)
    batches = [_micro_batch(hf, 10, [(1, 4, 4), (1, 8, 4)]), _micro_batch(hf, 20, [(1, 4, 8), (1, 4, 4), (1, 8, 8)])]
    assert len(set(len(b.input_ids) for b in batches)) == 2 and len(set(b.max_seqlen for b in batches)) == 2
    counters.clear()
    graphs = []
    for mb in batches:
        # lr 0: the second micro-batch meets the same weights in both engines (the step itself is torch's)
        out_e = eager.train_step([mb], num_loss_tokens=len(mb.loss_positions), lr=0.0)
        out_c = compiled.train_step([mb], num_loss_tokens=len(mb.loss_positions), lr=0.0)
        graphs.append(counters["stats"]["unique_graphs"])
        torch.testing.assert_close(out_c["loss_sum"], out_e["loss_sum"], rtol=1e-5, atol=0)
        grads_e, grads_c = _grads(eager), _grads(compiled)
        assert set(grads_c) == set(grads_e), "the compiled model must train the same parameters"
        for name, g in grads_e.items():
            torch.testing.assert_close(grads_c[name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)
    assert not counters["graph_break"], f"graph breaks in compiled layers: {dict(counters['graph_break'])}"
    assert graphs[0] > 0 and graphs[1] == graphs[0], f"graphs after each micro-batch: {graphs} (a new length recompiled)"


def test_one_process_keeps_gathered_weights_within_a_step_only(tmp_path):
    """At world size 1 a layer stays gathered from its forward through its backward to the step's end; after the
    step the next forward sees the new weights (FSDP would reuse a stale gathered copy), in eval too."""
    from torch.distributed.tensor import DTensor

    from train.engine import forward_args
    from train.engine_fsdp import build_hf_model, packed_forward
    from train.models.vision import linear_patch_embed

    cfg, hf = fx.random_hf_model("qwen3_vl", seed=4, save_to=tmp_path)
    engine = _engine(cfg, tmp_path, lr=1e-2)
    batches = [_micro_batch(hf, 30, [(1, 4, 4), (1, 8, 4)]), _micro_batch(hf, 40, [(1, 4, 8)])]
    before = engine.eval_loss(batches[0])

    def gathered() -> bool:  # FSDP registers the gathered parameter on the module, the DTensor shard otherwise
        return not isinstance(engine.model.model.language_model.layers[0].mlp.up_proj.weight, DTensor)

    engine._start_step()
    loss = engine.forward(forward_args(batches[0], labels=True), training=True)
    assert gathered()
    loss.backward()
    assert gathered()
    engine._finish_step()  # an optimizer step at the configured lr
    assert not gathered()
    after = [engine.eval_loss(batches[0])]
    engine.train_step(batches, num_loss_tokens=sum(len(b.loss_positions) for b in batches), lr=1e-2)
    with engine.evaluating():
        after.append(engine.eval_loss(batches[0]))
    after.append(engine.eval_loss(batches[0]))
    # the stepped weights (read last: reading the state dict reshards) in a plain, unsharded model of the same code
    plain = build_hf_model(cfg, None, 0)
    linear_patch_embed(plain.model.visual)
    plain.load_state_dict({k: v.full_tensor() for k, v in engine.model.state_dict().items()})
    with torch.no_grad():
        expected = packed_forward(plain, *forward_args(batches[0], labels=True))
    assert not torch.equal(after[0], before) and not torch.equal(after[1], after[0])
    torch.testing.assert_close(after[1], expected, rtol=1e-6, atol=0)
    torch.testing.assert_close(after[2], expected, rtol=1e-6, atol=0)


def test_one_process_shards_the_model_as_one_group_and_takes_the_per_layer_steps(tmp_path, monkeypatch):
    """At world size 1 the engine shards the root alone (no FSDP hooks around each layer); two steps of two
    micro-batches give the losses, gradients and weights of the per-layer sharding that several ranks use."""
    from train import engine_fsdp

    cfg, hf = fx.random_hf_model("qwen3_vl", seed=7, save_to=tmp_path)
    steps = [[_micro_batch(hf, 90 + 10 * i + j, [(1, 4, 4), (1, 8, 4)][j:]) for j in range(2)] for i in range(2)]
    results = []
    real = engine_fsdp.shard_model
    for per_block in (False, True):
        if per_block:
            monkeypatch.setattr(engine_fsdp, "shard_model", lambda *a, **k: real(*a, **{**k, "per_block": True}))
        engine = _engine(cfg, tmp_path, lr=1e-2)
        losses = [engine.train_step(mbs, num_loss_tokens=sum(len(mb.loss_positions) for mb in mbs), lr=1e-2)["loss_sum"]
                  for mbs in steps]
        results.append((len(engine.fsdp_modules), losses, _grads(engine),
                        {n: p.detach().full_tensor() for n, p in engine.model.named_parameters()}))
    (groups, losses, grads, params), (groups_pb, losses_pb, grads_pb, params_pb) = results
    assert groups == 1 and groups_pb == 1 + cfg.text_config.num_hidden_layers + cfg.vision_config.depth
    assert [float(x) for x in losses] == [float(x) for x in losses_pb]
    assert set(grads) == set(grads_pb) and set(params) == set(params_pb)
    for name, g in grads_pb.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-6, atol=1e-7, msg=name)
    for name, p in params_pb.items():
        torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-7, msg=name)


def test_build_adamw_fused_flag(tmp_path):
    """fused=False (the default) keeps torch's default AdamW; fused=True steps FSDP's DTensor shards the same."""
    from torch.distributed.tensor import distribute_tensor

    from shared.config import TrainConfig
    from train.optim import build_adamw

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    default, params = build_adamw(model, TrainConfig())
    assert [g["fused"] for g in default.param_groups] == [None, None]  # as before the flag
    assert len(params) == 4 and [len(g["params"]) for g in default.param_groups] == [1, 3]
    assert all(g["fused"] for g in build_adamw(model, TrainConfig(), fused=True)[0].param_groups)

    cfg, hf = fx.random_hf_model("qwen3_vl", seed=5, save_to=tmp_path)
    engine = _engine(cfg, tmp_path, lr=1e-2)
    mb = _micro_batch(hf, 50, [(1, 4, 4)])
    start = {n: p.detach().full_tensor().clone() for n, p in engine.model.named_parameters()}
    engine.train_step([mb], num_loss_tokens=len(mb.loss_positions), lr=1e-2)
    expected = {n: p.detach().full_tensor().clone() for n, p in engine.model.named_parameters()}
    with torch.no_grad():  # back to the start, with a fused optimizer (fresh state, as the first one had)
        for n, p in engine.model.named_parameters():
            p.copy_(distribute_tensor(start[n], p.device_mesh, p.placements))
    engine.optimizer, engine.params = build_adamw(engine.model, engine.cfg, fused=True)
    engine.train_step([mb], num_loss_tokens=len(mb.loss_positions), lr=1e-2)
    for n, p in engine.model.named_parameters():
        torch.testing.assert_close(p.detach().full_tensor(), expected[n], rtol=1e-6, atol=1e-7, msg=n)


def test_one_process_reduces_gradients_once_per_step(tmp_path, monkeypatch):
    """At world size 1 the gradients of several micro-batches accumulate unreduced and are reduced in the last
    backward alone: one FSDP reduction per parameter group a step instead of one per micro-batch, and the same
    gradients and step as reducing in every backward (FSDP's default, which several ranks keep)."""
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group

    cfg, hf = fx.random_hf_model("qwen3_vl", seed=6, save_to=tmp_path)
    batches = [_micro_batch(hf, 60, [(1, 4, 4), (1, 8, 4)]), _micro_batch(hf, 70, [(1, 4, 8)]), _micro_batch(hf, 80, [(1, 8, 8)])]
    tokens = sum(len(b.loss_positions) for b in batches)
    reductions = []
    real_reduce = _fsdp_param_group.foreach_reduce
    monkeypatch.setattr(_fsdp_param_group, "foreach_reduce", lambda *a, **k: reductions.append(1) or real_reduce(*a, **k))

    results = []
    for once in (True, False):
        engine = _engine(cfg, tmp_path, lr=1e-2)
        if not once:  # the default of FSDP: every backward reduces
            engine._before_forward = lambda mb, n, last: None
        reductions.clear()
        out = engine.train_step(batches, num_loss_tokens=tokens, lr=1e-2)
        results.append((out, len(reductions), _grads(engine), {n: p.detach().full_tensor() for n, p in engine.model.named_parameters()}))
    (out1, n1, grads1, params1), (out3, n3, grads3, params3) = results
    groups = len(engine.fsdp_modules)
    assert (n1, n3) == (groups, 3 * groups), f"reductions a step: {n1} once, {n3} every micro-batch, {groups} groups"
    torch.testing.assert_close(out1["loss_sum"], out3["loss_sum"], rtol=0, atol=0)
    assert out1["grad_norm"] == pytest.approx(out3["grad_norm"], rel=1e-6)
    for name, g in grads3.items():
        torch.testing.assert_close(grads1[name], g, rtol=1e-6, atol=1e-7, msg=name)
    for name, p in params3.items():
        torch.testing.assert_close(params1[name], p, rtol=1e-6, atol=1e-7, msg=name)


def test_bf16_gradients_accumulated_without_sync_equal_reducing_every_backward(monkeypatch):
    """The GPU policy (bf16 compute, float32 reduction): FSDP accumulating the micro-batches' bf16 gradients into
    float32 and reducing once gives bit for bit the gradients of reducing (into float32 shards) in every backward,
    also with the engine's accumulation (engine_fsdp.vectorised_grad_accumulation) in place of FSDP's `+=`."""
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    from tests.megatron_cpu import init_cpu_group
    from train import engine_fsdp, grad_accum

    init_cpu_group()
    calls = []
    real = grad_accum.accumulate_
    monkeypatch.setattr(grad_accum, "accumulate_", lambda dst, src: calls.append(1) or real(dst, src))
    grads = []
    for once, ours in ((True, False), (False, False), (True, True)):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in (model[0], model[2]):
            fully_shard(layer, mp_policy=mp, reshard_after_forward=False)
        fully_shard(model, mp_policy=mp)
        if ours:
            assert engine_fsdp.vectorised_grad_accumulation([m for m in model.modules() if isinstance(m, FSDPModule)]) == 4
        for i in range(4):
            if once:
                model.set_requires_gradient_sync(i == 3)
            model(torch.randn(5, 16, generator=torch.Generator().manual_seed(i))).float().square().sum().backward()
        grads.append([p.grad.full_tensor() for p in model.parameters()])
    assert all(g.dtype == torch.float32 for g in grads[0])
    assert len(calls) == 4 * 3  # micro-batches 2-4 summed into the first one's float32 gradient, 4 parameters
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("family", ["qwen3_vl", "qwen2_5_vl"])
def test_bf16_sharding_casts_at_the_root_only_and_equals_the_bf16_model(family):
    """The engine's sharding (engine_fsdp.shard_model) in bf16: the root casts the pixels; the blocks get the model's
    own activations as they are (bf16 hidden states, the vision tower's fp32 rotary cos/sin), so FSDP's forward is
    bit for bit transformers' own model cast to bf16, with no input in fp32 reaching a decoder layer."""
    import copy

    from torch.distributed.device_mesh import init_device_mesh

    from tests.megatron_cpu import init_cpu_group
    from train.engine_fsdp import shard_model

    init_cpu_group()
    _, hf = fx.random_hf_model(family, seed=5)
    reference = copy.deepcopy(hf)
    for p in reference.parameters():  # the parameters only, as FSDP's policy: buffers (rotary inv_freq) stay fp32
        p.data = p.data.to(torch.bfloat16)
    shard_model(hf, init_device_mesh("cpu", (1,)), bf16=True, reshard_after_forward=False)
    seen = {}

    def record(module, args, kwargs):
        tensors = [t for t in [*args, *kwargs.values()] for t in (t if isinstance(t, tuple) else (t,))
                   if isinstance(t, torch.Tensor) and t.is_floating_point()]
        seen.setdefault(type(module).__name__, set()).update(t.dtype for t in tensors)

    for name in hf._no_split_modules:
        for m in hf.modules():
            if name in (c.__name__ for c in type(m).__mro__):  # fully_shard made it an FSDP subclass of it
                m.register_forward_pre_hook(record, with_kwargs=True)
    sample = fx.make_sample(7, [(1, 8, 8), (1, 4, 8)])
    positions = fx.rope_positions(hf, sample)
    got = fx.hf_logits(hf, sample, positions)
    expected = fx.hf_logits(reference, sample, positions)
    assert torch.equal(got, expected)
    decoder = [k for k in seen if "Decoder" in k]
    vision = [k for k in seen if "Vision" in k]
    assert decoder and vision, seen
    assert all(seen[k] == {torch.bfloat16} for k in decoder), seen
    assert all(seen[k] == {torch.bfloat16, torch.float32} for k in vision), seen  # hidden states, cos/sin


def test_skipping_guards_after_warm_up_keeps_the_training_step_exact(standin_varlen, tmp_path):
    """train.compile_skip_guards_after: from the named step on, the training forwards and backwards run with only
    the guards that pick between cached graphs. Against an engine that checks every guard, over steps of new
    lengths and an eval in between (a no-grad graph in the cache, which a training call must not pick), the losses
    and gradients stay equal; the stance holds inside the training step only."""
    from train.models import layer_compile
    from train.models.layer_compile import compile_hf_layers

    cfg, hf = fx.random_hf_model("qwen3_vl", seed=4, save_to=tmp_path)
    checked, skipping = _engine(cfg, tmp_path), _engine(cfg, tmp_path, compile_skip_guards_after=1)
    stances = []
    for e in (checked, skipping):
        e.compiled_layers = compile_hf_layers(e.model)
    first_layer = next(m for m in skipping.inner.modules() if type(m).__name__.endswith("TextDecoderLayer"))
    first_layer.register_forward_pre_hook(lambda m, a: stances.append(layer_compile._skip_guards))
    grids = [[(1, 4, 4), (1, 8, 4)], [(1, 4, 8), (1, 4, 4), (1, 8, 8)], [(1, 8, 8)], [(1, 4, 4), (1, 4, 8)]]
    batches = [_micro_batch(hf, 10 * i, g) for i, g in enumerate(grids)]
    for i, mb in enumerate(batches):
        out = [e.train_step([mb], num_loss_tokens=len(mb.loss_positions), lr=1e-2) for e in (checked, skipping)]
        torch.testing.assert_close(out[1]["loss_sum"], out[0]["loss_sum"], rtol=1e-5, atol=0)
        grads = [_grads(e) for e in (checked, skipping)]
        assert set(grads[1]) == set(grads[0]) and grads[0]
        for name, g in grads[0].items():
            torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-4 * g.abs().max().item(), msg=name)
        if i == 0:
            for e in (checked, skipping):
                with e.evaluating():
                    e.eval_loss(batches[1])
    assert stances == [False, False, True, True, True], stances  # step 1 and the eval check every guard
    assert not layer_compile._skip_guards


def test_skipped_guards_still_pick_graphs_by_size_range_and_grad_mode():
    """What train.compile_skip_guards_after relies on in torch, through the wrapper every compiled layer has: with
    guard evaluation skipped a call still selects among its cached graphs by the symbolic-size guards (Inductor's
    size ranges) and by grad mode (aot_eager: a graph traced without grad has no backward), and a size that no
    cached graph fits is compiled, with every guard, where torch alone would raise."""
    from train.models import layer_compile

    def f(x, w):
        return (x * w).sum() * (2 if x.shape[0] > 8 else 3)

    torch._dynamo.reset()
    f_compiled = torch.compile(f, dynamic=True, backend="aot_eager")
    wrapped = layer_compile._skipping_guards_when_asked(f_compiled)
    w = torch.ones((), requires_grad=True)
    for n in (10, 11, 12):
        wrapped(torch.ones(n), w)
    with torch.no_grad():
        wrapped(torch.ones(13), w)
    with layer_compile.skipping_guards():
        assert [wrapped(torch.ones(n), w).detach().item() for n in (14, 9)] == [28.0, 18.0]
        assert wrapped(torch.ones(15), w).requires_grad
        with torch.no_grad():
            assert not wrapped(torch.ones(15), w).requires_grad
        with pytest.raises(RuntimeError, match="skip_guard_eval_unsafe"):  # torch alone: no graph for size <= 8
            with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                f_compiled(torch.ones(4), w)
        assert wrapped(torch.ones(4), w).detach().item() == 12.0  # the wrapper compiles it
        assert wrapped(torch.ones(3), w).detach().item() == 9.0
    assert not layer_compile._skip_guards
    torch._dynamo.reset()
