"""Megatron-Core Qwen-VL against transformers on a GPU: logits, per-token loss and gradients of one packed micro-batch.

    python3 bench/validate_megatron_gpu.py --shards .cache/gpu/geo3k-like-512 > $OUT/megatron-gpu.log   # gpu_run.sh validate
    .venv/bin/python bench/validate_megatron_gpu.py --shards .cache/bench/geo3k-like-512 --preset tiny-qwen3-vl --variants fp32

Random weights of the preset's architecture, saved by transformers (bf16, as published checkpoints are), are loaded
by the Megatron engine (through train.models.convert), which runs the loader's first packed micro-batch, and by
transformers (SDPA), which runs each of its samples alone with its own M-RoPE positions. Per variant (fp32, bf16,
bf16+compiled: train.compile_layers): the relative error ||megatron - transformers|| / ||transformers|| of the logits
and of the per-token loss, and a backward (a finite gradient norm, gradients into the ViT). fp32 first: its
transformers logits are the truth for the bf16 rows. Pass: fp32 within 1e-4; bf16 no further from that truth than
1.1x transformers' own bf16 logits (a 28-layer random model's bf16 floor is ~3e-2: docs/validation.md).
"""

from __future__ import annotations

import argparse
import inspect
import math
import platform
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def rel(a, b) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return (torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b)).item()


def hf_logits(hf, mb, image_token: int, merge: int) -> list[torch.Tensor]:
    """transformers' logits of each sample of the packed micro-batch, run alone."""
    cu, grids, out, img = mb.cu_seqlens.tolist(), mb.image_grid_thw, [], 0
    cu_patches = [0] + grids.prod(-1).cumsum(0).tolist()  # where each image's patches start
    for s, e in zip(cu, cu[1:]):
        if e > mb.num_real_tokens:
            break  # the padding segment
        ids = mb.input_ids[s:e]
        n_img, first = int((ids == image_token).sum()), img
        while n_img > 0:
            n_img -= int(grids[img].prod()) // merge**2
            img += 1
        p0, p1 = cu_patches[first], cu_patches[img]
        kw = {"pixel_values": mb.pixel_values[p0:p1].to(hf.dtype), "image_grid_thw": grids[first:img].to(ids.device)} if img > first else {}
        if "mm_token_type_ids" in inspect.signature(hf.forward).parameters:  # transformers >= 5.2x
            kw["mm_token_type_ids"] = (ids == image_token).int()[None]
        out.append(hf(input_ids=ids[None], **kw).logits[0])
    return out


def run_variant(variant: str, hf_config, ckpt: str, mb_host, world, lines: list[str], truth: dict) -> bool:
    from shared.config import load_config
    from train.engine_megatron import MegatronEngine
    from train.models.source import resolve_source

    bf16, compiled = variant.startswith("bf16"), variant.endswith("+compiled")
    dtype = torch.bfloat16 if bf16 else torch.float32
    engine = MegatronEngine(hf_config, load_config(None, [f"train.bf16={bf16}", f"train.compile_layers={compiled}"]).train, world,
                            init_from=resolve_source(ckpt, pretrained=True))
    hf = getattr(transformers, hf_config.architectures[0]).from_pretrained(ckpt, dtype=dtype, attn_implementation="sdpa").to(world.device).eval()
    mb, n = mb_host.to(world.device, pixel_dtype=dtype), mb_host.num_real_tokens
    with torch.no_grad():
        engine.model.eval()
        mg = engine.logits(mb)[:n].reshape(n, -1).float()
        mg_loss = engine.per_token_loss(mb).reshape(-1)[mb.loss_positions]
        parts = hf_logits(hf, mb, hf_config.image_token_id, hf_config.vision_config.spatial_merge_size)
        ref = torch.cat(parts).float()
    ref_loss = torch.nn.functional.cross_entropy(ref[mb.loss_positions], mb.labels[mb.loss_positions], reduction="none")
    overall, loss_rel, cu = rel(mg, ref), rel(mg_loss, ref_loss), mb.cu_seqlens.tolist()
    per_sample = [rel(mg[cu[i]:cu[i + 1]], p) for i, p in enumerate(parts)]
    lines += [f"\n## {variant}", f"logits rel err {overall:.2e} (per sample {min(per_sample):.2e}-{max(per_sample):.2e}, max |diff| "
              f"{(mg - ref).abs().max().item():.2e}); per-token loss rel err {loss_rel:.2e}; mean loss megatron "
              f"{mg_loss.mean().item():.4f}, transformers {ref_loss.mean().item():.4f}"]
    passed = overall <= 1e-4 and loss_rel <= 1e-4
    if not bf16:
        truth["fp32"] = ref.cpu()
    elif "fp32" in truth:
        floor, ours = rel(ref, truth["fp32"]), rel(mg, truth["fp32"])
        lines.append(f"noise floor: transformers bf16 vs transformers fp32 {floor:.2e}; megatron bf16 vs transformers fp32 {ours:.2e}")
        passed = ours <= 1.1 * floor
    if compiled and variant.removesuffix("+compiled") in truth:
        lines.append(f"compiled vs eager megatron: logits rel err {rel(mg, truth[variant.removesuffix('+compiled')]):.2e}")
    truth[variant] = mg.cpu()
    engine.model.train()  # backward: gradients exist and are finite all the way into the vision tower
    engine.per_token_loss(mb).sum().backward()
    # Megatron's DDP accumulates into main_grad on GPUs; the CPU path into .grad
    grads = {k: p.main_grad if getattr(p, "main_grad", None) is not None else p.grad for k, p in engine.inner.named_parameters()}
    grad_norm = torch.stack([g.float().norm() for g in grads.values() if g is not None]).norm().item()
    vision = grads["vision.model.patch_embed.proj.weight"] is not None and grads["vision.model.patch_embed.proj.weight"].abs().sum().item() > 0
    ok = passed and math.isfinite(grad_norm) and vision
    lines += [f"backward: grad norm {grad_norm:.3e}, vision grads {'yes' if vision else 'NO'}", f"{'PASS' if ok else 'FAIL'}: {variant}"]
    del engine, hf
    if world.device.type == "cuda":
        torch.cuda.empty_cache()
    return ok


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shards", type=Path, required=True, help="a split folder made for the preset's processor")
    p.add_argument("--preset", default="qwen3-vl-2b", help="preset name or checkpoint folder (architecture only)")
    p.add_argument("--variants", default="fp32,bf16,bf16+compiled", help="comma list of fp32, bf16, bf16+compiled; fp32 first")
    args = p.parse_args()
    from train.data import DataConfig, build_loader
    from train.distributed import destroy, init_distributed
    from train.models import load_hf_config

    world, hf_config = init_distributed(), load_hf_config(args.preset)
    mb = next(iter(build_loader(args.shards, DataConfig(global_batch_size=64, num_workers=0)))).micro_batches[0]
    lines = [f"# Megatron-Core Qwen-VL vs transformers: {args.preset}, random weights; command: python {' '.join(sys.argv)}",
             f"device {torch.cuda.get_device_name() if world.device.type == 'cuda' else platform.machine()}; torch {torch.__version__}, "
             f"transformers {transformers.__version__}; micro-batch of {len(mb.keys)} samples, {mb.num_real_tokens} tokens, {mb.num_patches} patches"]
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        transformers.AutoModelForImageTextToText.from_config(hf_config, dtype=torch.bfloat16).save_pretrained(tmp)
        truth: dict = {}
        results = []
        print("\n".join(lines), flush=True)
        for v in args.variants.split(","):  # each variant's lines as soon as they stand (a GPU call has a time limit)
            printed = len(lines)
            results.append(run_variant(v, hf_config, tmp, mb, world, lines, truth))
            print("\n".join(lines[printed:]), flush=True)
    destroy()
    sys.exit(0 if all(results) else 1)


if __name__ == "__main__":
    main()
