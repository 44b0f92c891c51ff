"""Validate the Megatron-Core Qwen-VL model against transformers on a GPU, on a packed Geo3K-like batch.

    # on a GPU machine (megatron-core installed), the Qwen3-VL-2B architecture with random weights:
    python bench/validate_megatron_gpu.py --log docs/validation/megatron-gpu.log
    # CPU smoke test with a tiny config (run this before spending GPU time):
    python bench/validate_megatron_gpu.py --tiny --variants fp32,bf16

What it does, per variant (fp32; bf16 with the fastest attention kernel; bf16 with the per-sample SDPA
kernel that transformers also uses, to separate the kernel's rounding from the rest):
1. Random weights for the preset's architecture in transformers, saved with `save_pretrained` (bf16,
   like the published checkpoints) and loaded back with `from_pretrained`.
2. The same checkpoint imported into the Megatron model (train.models.convert).
3. A packed micro-batch of Geo3K-like samples (one image of 300-600 px each, 100-600 tokens each,
   M-RoPE positions from transformers' `get_rope_index` per sample) through the Megatron model;
   each sample alone through transformers (SDPA).
4. Logits relative error ||a - b|| / ||b|| per sample and overall, max |diff|, the per-token loss's
   relative error, and a backward pass (finite gradient norm). Pass: relative error <= 1e-2 (bf16),
   1e-4 (fp32). bf16 rows also give the noise floor: transformers bf16 vs transformers fp32.

Prints a table and writes it to --log.
"""

from __future__ import annotations

import argparse
import inspect
import math
import os
import platform
import socket
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOLERANCE = {torch.bfloat16: 1e-2, torch.float32: 1e-4}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="qwen3-vl-2b", help="preset name or checkpoint directory (architecture only)")
    p.add_argument("--tiny", action="store_true", help="tiny random config on CPU: a smoke test of this script")
    p.add_argument("--variants", default="fp32,bf16,bf16:sdpa",
                   help="comma-separated runs: fp32, bf16, or bf16:<backend> to force an attention backend "
                        "(flash_attn, torch_varlen, sdpa); fp32 first gives the bf16 runs their noise floor")
    p.add_argument("--num-samples", type=int, default=8, help="samples packed into the micro-batch")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget of the packed micro-batch")
    p.add_argument("--num-layers", type=int, default=None,
                   help="keep only this many LLM layers (a CPU run of a real preset's config path)")
    p.add_argument("--vision-depth", type=int, default=None,
                   help="keep only this many ViT layers (deepstack moves to the first ones)")
    p.add_argument("--kernel-floor", action="store_true",
                   help="also run transformers with eager attention: its own distance from itself (SDPA) per dtype")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log", default=None, help="write the report here as well")
    return p.parse_args()


def tiny_config():
    from transformers import Qwen3VLConfig

    return Qwen3VLConfig(
        text_config=dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=8192, bos_token_id=None,
                         eos_token_id=None, rope_parameters=dict(rope_type="default", rope_theta=5e6,
                                                                 mrope_section=[4, 2, 2], mrope_interleaved=True)),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=16, spatial_merge_size=2,
                           temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=64,
                           deepstack_visual_indexes=[0, 1]),
        image_token_id=500, vision_start_token_id=501, vision_end_token_id=502, video_token_id=503,
        tie_word_embeddings=True)


# ---------------------------------------------------------------------------------------------------
# Geo3K-like samples
# ---------------------------------------------------------------------------------------------------


def make_samples(cfg, num_samples: int, max_tokens: int, seed: int, tiny: bool):
    """Samples of one image each (300-600 px sides, resized to the 32-px grid as the processor does)
    and 60-400 text tokens around it, packed until the budget is reached."""
    g = torch.Generator().manual_seed(seed)
    vc = cfg.vision_config
    unit = vc.patch_size * vc.spatial_merge_size
    in_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    text_vocab = min(cfg.text_config.vocab_size, 151643) - (12 if tiny else 0)
    samples, total = [], 0
    for _ in range(num_samples):
        side = (lambda: int(torch.randint(100, 200, (1,), generator=g))) if tiny else (
            lambda: int(torch.randint(300, 601, (1,), generator=g)))
        h, w = max(unit, round(side() / unit) * unit), max(unit, round(side() / unit) * unit)
        grid = (1, h // vc.patch_size, w // vc.patch_size)
        num_img_tokens = grid[1] * grid[2] // vc.spatial_merge_size**2
        pre = int(torch.randint(20, 60, (1,), generator=g))
        post = int(torch.randint(40, 340, (1,), generator=g))
        ids = (torch.randint(0, text_vocab, (pre,), generator=g).tolist() + [cfg.vision_start_token_id]
               + [cfg.image_token_id] * num_img_tokens + [cfg.vision_end_token_id]
               + torch.randint(0, text_vocab, (post,), generator=g).tolist())
        if total + len(ids) > max_tokens:
            break
        total += len(ids)
        pixels = torch.randn(grid[0] * grid[1] * grid[2], in_dim, generator=g)
        samples.append(dict(input_ids=torch.tensor(ids), grid_thw=torch.tensor([grid]), pixel_values=pixels,
                            image_px=(h, w)))
    return samples


def rope_positions(hf_model, s):
    inner = hf_model.model
    kwargs = dict(image_grid_thw=s["grid_thw"])
    params = inspect.signature(inner.get_rope_index).parameters
    if "mm_token_type_ids" in params:
        kwargs["mm_token_type_ids"] = (s["input_ids"] == hf_model.config.image_token_id).int()[None]
    pos, _ = inner.get_rope_index(s["input_ids"][None], **kwargs)
    return pos[:, 0]


def pack(samples, positions, device):
    lens = [len(s["input_ids"]) for s in samples]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    return dict(
        input_ids=torch.cat([s["input_ids"] for s in samples]).to(device),
        position_ids=torch.cat(positions, dim=1).to(device),
        cu_seqlens=cu,
        max_seqlen=max(lens),
        pixel_values=torch.cat([s["pixel_values"] for s in samples]).to(device),
        image_grid_thw=torch.cat([s["grid_thw"] for s in samples]).to(device),
    )


# ---------------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------------


def init_parallel(device):
    from megatron.core import parallel_state, tensor_parallel

    if not torch.distributed.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    if device.type == "cuda":
        tensor_parallel.model_parallel_cuda_manual_seed(0)


def rel(a, b):
    a, b = a.float(), b.float()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def hf_logits(hf, samples, positions, device) -> torch.Tensor:
    """transformers' logits, each sample alone, concatenated in packing order."""
    refs = []
    for s, p in zip(samples, positions):
        out = hf(input_ids=s["input_ids"][None].to(device), position_ids=p[:, None].to(device),
                 pixel_values=s["pixel_values"].to(device), image_grid_thw=s["grid_thw"].to(device))
        refs.append(out.logits[0])
    return torch.cat(refs)


def kernel_floor(hf_cls, ckpt, dtype, samples, positions, device, ref) -> str:
    """How far transformers moves *itself* in this dtype when only its attention kernel changes (eager
    matmul-softmax instead of SDPA; the same arithmetic, other rounding): the closest any second
    implementation can be expected to come to its logits."""
    other = hf_cls.from_pretrained(ckpt, dtype=dtype, attn_implementation="eager").to(device).eval()
    with torch.no_grad():
        logits = hf_logits(other, samples, positions, device)
    del other
    return f"kernel floor: transformers {str(dtype).split('.')[-1]} with eager attention vs with SDPA {rel(logits, ref):.2e}"


def run_variant(cfg, ckpt, samples, variant, device, lines, truth, with_kernel_floor=False):
    """One comparison. variant: "fp32", "bf16" or "bf16:<attention backend>", each optionally with "+compiled"
    (decoder layers and vision blocks compiled whole, train/models/layer_compile.py; compared with the same
    variant uncompiled too when that ran first).

    `truth` holds transformers' fp32 logits (set by the fp32 variant, which runs first): bf16 rows
    also report both models' distance to it, i.e. how far bf16 itself moves the reference.
    """
    import transformers

    from train.models import convert
    from train.models.attention import select_backend
    from train.models.qwen_vl import build_model

    base = variant.removesuffix("+compiled")
    compiled = base != variant
    dtype_name, _, backend = base.partition(":")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    if backend:
        os.environ["GEO3K_ATTN_BACKEND"] = backend
    else:
        os.environ.pop("GEO3K_ATTN_BACKEND", None)
    hf_cls = getattr(transformers, cfg.architectures[0]) if getattr(cfg, "architectures", None) else \
        transformers.AutoModelForImageTextToText
    t0 = time.time()
    hf = hf_cls.from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    positions = [rope_positions(hf, s) for s in samples]
    overrides = dict(params_dtype=dtype, bf16=dtype == torch.bfloat16, perform_initialization=False,
                     use_cpu_initialization=device.type == "cpu")
    with torch.device(device):
        mg = build_model(cfg, **overrides).eval()
    convert.load_hf_checkpoint(mg, str(ckpt))
    mg.to(device)
    if compiled:
        from train.models.layer_compile import compile_layers

        compile_layers(mg)
    load_s = time.time() - t0

    batch = pack(samples, positions, device)
    ids = batch["input_ids"]
    labels = torch.full_like(ids, -100)
    labels[:-1] = ids[1:]
    labels[ids == cfg.image_token_id] = -100
    labels[batch["cu_seqlens"][1:].long() - 1] = -100
    backend = select_backend(device, dtype)

    with torch.no_grad():
        sync(device)
        t0 = time.time()
        mg_logits = mg(**batch)
        sync(device)
        mg_s = time.time() - t0
        mg_loss = mg(**batch, labels=labels)
        t0 = time.time()
        ref = hf_logits(hf, samples, positions, device)
        sync(device)
        hf_s = time.time() - t0
    ref_loss = torch.nn.functional.cross_entropy(ref.float(), labels, ignore_index=-100, reduction="none")

    cu = batch["cu_seqlens"].tolist()
    lines.append(f"\n## {variant}  (attention backend: {backend}; load {load_s:.1f} s; "
                 f"forward: megatron packed {mg_s * 1e3:.0f} ms, transformers per sample {hf_s * 1e3:.0f} ms)")
    lines.append("rel err = ||megatron - transformers|| / ||transformers||, logits of the same dtype")
    lines.append(f"{'sample':>6} {'tokens':>6} {'img px':>9} {'img tok':>7} {'rel err':>9} {'max|diff|':>9}")
    for i, s in enumerate(samples):
        a, b = mg_logits[cu[i]:cu[i + 1]], ref[cu[i]:cu[i + 1]]
        n_img = int((s["input_ids"] == cfg.image_token_id).sum())
        lines.append(f"{i:>6} {cu[i + 1] - cu[i]:>6} {s['image_px'][0]:>4}x{s['image_px'][1]:<4} {n_img:>7} "
                     f"{rel(a, b):>9.2e} {(a.float() - b.float()).abs().max().item():>9.2e}")
    overall = rel(mg_logits, ref)
    loss_rel = rel(mg_loss, ref_loss)
    lines.append(f"{'all':>6} {len(ids):>6} {'':>9} {'':>7} {overall:>9.2e} "
                 f"{(mg_logits.float() - ref.float()).abs().max().item():>9.2e}")
    n_loss = (labels != -100).sum().item()
    lines.append(f"per-token loss rel err {loss_rel:.2e}; mean loss megatron {mg_loss.sum().item() / n_loss:.4f} "
                 f"vs transformers {ref_loss.sum().item() / n_loss:.4f}")
    if dtype == torch.float32 and "fp32" not in truth:
        truth["fp32"] = ref.float().cpu()
    elif "fp32" in truth:
        t = truth["fp32"]
        lines.append(f"noise floor: transformers {dtype_name} vs transformers fp32 {rel(ref.cpu(), t):.2e}; "
                     f"megatron {dtype_name} vs transformers fp32 {rel(mg_logits.cpu(), t):.2e}")
    if with_kernel_floor and not compiled:
        lines.append(kernel_floor(hf_cls, ckpt, dtype, samples, positions, device, ref))
    if compiled and f"megatron {base}" in truth:
        lines.append(f"compiled vs eager megatron ({base}): logits rel err {rel(mg_logits.cpu(), truth[f'megatron {base}']):.2e}")
    elif not compiled:
        truth[f"megatron {base}"] = mg_logits.float().cpu()

    # backward: gradients exist and are finite all the way into the vision tower
    mg.train()
    loss = mg(**batch, labels=labels).sum() / n_loss
    loss.backward()
    norms = [p.grad.float().norm() for p in mg.parameters() if p.grad is not None]
    grad_norm = torch.stack(norms).norm().item()
    vis_grad = mg.vision.model.patch_embed.proj.weight.grad
    ok_grad = math.isfinite(grad_norm) and vis_grad is not None and vis_grad.abs().sum().item() > 0
    lines.append(f"backward: grad norm {grad_norm:.3e} over {len(norms)} tensors, vision grads {'yes' if ok_grad else 'NO'}"
                 + (f" (uncompiled: {truth[f'grad norm {base}']:.3e})" if compiled and f"grad norm {base}" in truth else ""))
    if not compiled:
        truth[f"grad norm {base}"] = grad_norm
    if device.type == "cuda":
        lines.append(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
        torch.cuda.reset_peak_memory_stats()
    passed = overall <= TOLERANCE[dtype] and loss_rel <= TOLERANCE[dtype] and ok_grad
    lines.append(f"{'PASS' if passed else 'FAIL'}: logits rel err {overall:.2e} <= {TOLERANCE[dtype]:.0e}")
    del hf, mg, ref, mg_logits
    os.environ.pop("GEO3K_ATTN_BACKEND", None)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return passed


def _attention_variants(device):
    """(label, backend) for every varlen backend here, aten_flash with both GQA modes. The variant's environment
    (GEO3K_ATEN_FLASH_GQA) is set while the caller works on it and removed after."""
    from train.models.attention import available_backends

    for backend in available_backends(device, torch.bfloat16):
        if backend == "sdpa":
            continue
        modes = [("aten_flash", "native"), ("aten_flash/expand", "expand")] if backend == "aten_flash" else [(backend, None)]
        for label, gqa in modes:
            if gqa:
                os.environ["GEO3K_ATEN_FLASH_GQA"] = gqa
            try:
                yield label, backend
            finally:
                os.environ.pop("GEO3K_ATEN_FLASH_GQA", None)


def kernel_check(device):
    """Each available varlen backend vs the per-segment SDPA loop, bf16, forward and backward; then each
    backend's cost per call at the 2B model's shapes (host time to launch forward + backward, and GPU time)."""
    from train.models.attention import varlen_attention

    out = ["\n## varlen kernels vs per-segment SDPA (bf16, 16 q heads / 8 kv heads, head_dim 128)"]
    g = torch.Generator(device=device).manual_seed(0)
    lens = [300, 517, 0, 1200, 64]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)
    T = sum(lens)
    for label, backend in _attention_variants(device):
        for causal in (True, False):
            try:
                q = torch.randn(T, 16, 128, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
                k = torch.randn(T, 8, 128, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
                v = torch.randn(T, 8, 128, device=device, dtype=torch.bfloat16, generator=g, requires_grad=True)
                a = varlen_attention(q, k, v, cu, max(lens), causal=causal, backend=backend)
                grads_a = torch.autograd.grad(a.float().square().sum(), (q, k, v))
                b = varlen_attention(q, k, v, cu, max(lens), causal=causal, backend="sdpa")
                grads_b = torch.autograd.grad(b.float().square().sum(), (q, k, v))
                gmax = max(rel(x, y) for x, y in zip(grads_a, grads_b))
                out.append(f"{label:>17} causal={causal!s:5}: out rel err {rel(a, b):.2e}, grad rel err {gmax:.2e}")
            except Exception as e:  # noqa: BLE001 - reported, the model run decides
                out.append(f"{label:>17} causal={causal!s:5}: ERROR {type(e).__name__}: {e}")
    out.extend(kernel_timing(device))
    return out


def kernel_timing(device, calls: int = 28):
    """Per call, fwd + bwd: host ms (launch, no sync inside the loop) and GPU ms, at the LLM's shapes
    (4,096 tokens in 8 samples, 16/8 heads of 128, causal) and the ViT's (16k patches in 8 images, 16 heads
    of 64). A backend whose host time exceeds its GPU time keeps the GPU waiting in a host-bound step."""
    from train.models.attention import varlen_attention

    shapes = {"LLM": (4096, 16, 8, 128, True), "ViT": (16384, 16, 16, 64, False)}
    out = [f"\n## varlen cost per call (bf16; {calls} calls of forward + backward, as the layers of one micro-batch)",
           "| backend | shape | host ms / call | wall ms / call (host or GPU, the slower) |", "|---|---|---|---|"]
    for label, backend in _attention_variants(device):
        for name, (T, hq, hkv, d, causal) in shapes.items():
            try:
                cu = torch.arange(0, T + 1, T // 8, dtype=torch.int32, device=device)
                q = torch.randn(T, hq, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                k = torch.randn(T, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                v = torch.randn(T, hkv, d, device=device, dtype=torch.bfloat16, requires_grad=True)
                grad = torch.randn(T, hq, d, device=device, dtype=torch.bfloat16)

                def run(n):
                    for _ in range(n):
                        varlen_attention(q, k, v, cu, T // 8, causal=causal, backend=backend).backward(grad)

                run(3)
                sync(device)
                t0 = time.perf_counter()
                run(calls)
                host = time.perf_counter() - t0
                sync(device)
                total = time.perf_counter() - t0
                out.append(f"| {label} | {name} | {1e3 * host / calls:.3f} | {1e3 * total / calls:.3f} |")
            except Exception as e:  # noqa: BLE001
                out.append(f"| {label} | {name} | ERROR {type(e).__name__}: {e} | |")
    return out


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def main():
    args = parse_args()
    import transformers

    from train.models import load_hf_config

    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    init_parallel(device)
    torch.manual_seed(args.seed)
    cfg = tiny_config() if args.tiny else load_hf_config(args.preset)
    if args.num_layers:
        cfg.text_config.num_hidden_layers = args.num_layers
    if args.vision_depth:
        vc = cfg.vision_config
        vc.depth = args.vision_depth
        if getattr(vc, "deepstack_visual_indexes", None):
            vc.deepstack_visual_indexes = list(range(min(len(vc.deepstack_visual_indexes), args.vision_depth)))
    variants = args.variants.split(",")

    lines = ["# Megatron-Core Qwen-VL vs transformers",
             f"command: python {' '.join(sys.argv)}",
             f"architecture: {'tiny' if args.tiny else args.preset} ({cfg.model_type}, "
             f"{cfg.text_config.num_hidden_layers} LLM layers, hidden {cfg.text_config.hidden_size}, "
             f"ViT depth {cfg.vision_config.depth}), random weights",
             f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else platform.processor() or 'cpu'}; "
             f"torch {torch.__version__}, transformers {transformers.__version__}, "
             f"megatron-core {__import__('megatron.core.package_info', fromlist=['x']).__version__}, "
             f"python {platform.python_version()}"]
    if device.type == "cuda":
        lines.extend(kernel_check(device))
    samples = make_samples(cfg, args.num_samples, args.max_tokens, args.seed, args.tiny)
    lines.append(f"packed micro-batch: {len(samples)} samples, {sum(len(s['input_ids']) for s in samples)} tokens")

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.time()
        with torch.device(device):
            hf = transformers.AutoModelForImageTextToText.from_config(cfg, dtype=torch.bfloat16)
        hf.save_pretrained(tmp)
        del hf
        lines.append(f"random checkpoint written in {time.time() - t0:.1f} s")
        results, truth = [], {}
        for variant in variants:
            try:
                results.append(run_variant(cfg, tmp, samples, variant, device, lines, truth, args.kernel_floor))
            except Exception:  # report and go on: one GPU call has to tell as much as it can
                lines.append(f"\n## {variant}: FAILED with\n{traceback.format_exc()}")
                results.append(False)

    report = "\n".join(lines)
    print(report)
    if args.log:
        Path(args.log).parent.mkdir(parents=True, exist_ok=True)
        Path(args.log).write_text(report + "\n")
    torch.distributed.destroy_process_group()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
