"""Model FLOPs of a training step, for MFU as the field reports it.

The FLOPs the step needs: 6 x (matmul parameters active per token: MoE layers count their router and the top-k
experts only; embeddings excluded) x tokens, plus causal attention (QK^T and AV: 2·s²·width per layer forward for
a sample of length s, x3 with backward), plus the LM head where it is computed (6·hidden·vocab per position: the
loss positions only, except under sequence parallelism, which runs it on every token), plus the vision encoder per
patch (6 x its matmul parameters, and 4·n²·width per layer forward for an image of n patches, x3) and the patch
merger per merged token. Recomputation is not counted (it is hardware work, not model work).

MFU = model FLOPs / (time x the card's datasheet dense bf16 peak) (`datasheet_peak_tflops`: 989 TFLOP/s for
H100/H200 SXM); the measured matmul rate (`measure_peak_tflops`, ~760-790 on an H200) is logged beside it.
Qwen2.5-VL's windowed vision layers are counted as full attention over the image: a slight overestimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


# dense bf16 tensor-core peak (no sparsity), TFLOP/s, by a substring of torch.cuda.get_device_name()
DATASHEET_BF16_TFLOPS = {"H200": 989.4, "H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0,
                         "H800": 989.4, "H20": 148.0, "A100": 312.0, "A800": 312.0, "L40S": 362.1, "B200": 2250.0}


def datasheet_peak_tflops(device: torch.device) -> tuple[float | None, str]:
    """(the card's datasheet dense bf16 TFLOP/s, its name); None for a CPU or a card not in the table."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    for key, tflops in DATASHEET_BF16_TFLOPS.items():
        if key in name:
            return tflops, name
    if name.strip().endswith("H100"):  # the SXM part reports plain "NVIDIA H100"
        return 989.4, name
    return None, name


@dataclass
class StepFlops:
    lm_params: float  # matmul parameters per token, LM head excluded
    lm_layers: int
    lm_attn_width: int
    vit_params: float  # per patch
    vit_layers: int
    vit_width: int
    merger_params: float  # per merged token
    merge_unit: int  # patches per merged token
    head_params: float  # hidden x vocab: the LM head, per position where it runs

    @classmethod
    def from_hf_config(cls, hf_config) -> "StepFlops":
        t, v = hf_config.text_config, hf_config.vision_config
        h, heads = t.hidden_size, t.num_attention_heads
        kv = getattr(t, "num_key_value_heads", heads)
        hd = getattr(t, "head_dim", None) or h // heads
        attn = h * heads * hd * 2 + h * kv * hd * 2
        if getattr(t, "num_experts", None):
            mlp_layers = set(getattr(t, "mlp_only_layers", []) or [])
            moe = 3 * h * t.moe_intermediate_size * t.num_experts_per_tok + h * t.num_experts  # experts + router
            dense = 3 * h * t.intermediate_size
            mlp_total = sum(dense if i in mlp_layers else moe for i in range(t.num_hidden_layers))
        else:
            mlp_total = 3 * h * t.intermediate_size * t.num_hidden_layers
        lm = attn * t.num_hidden_layers + mlp_total
        vh = getattr(v, "hidden_size", None) or v.embed_dim
        vmlp = getattr(v, "intermediate_size", 4 * vh)
        gated = hf_config.model_type == "qwen2_5_vl"
        patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
        vit = v.depth * (4 * vh * vh + (3 if gated else 2) * vh * vmlp) + patch_in * vh
        m = v.spatial_merge_size**2
        out = getattr(v, "out_hidden_size", h)
        merger = (vh * m) ** 2 + vh * m * out
        n_deep = len(getattr(v, "deepstack_visual_indexes", None) or [])
        return cls(
            lm_params=float(lm),
            lm_layers=t.num_hidden_layers,
            lm_attn_width=heads * hd,
            vit_params=float(vit),
            vit_layers=v.depth,
            vit_width=vh,
            merger_params=float(merger * (1 + n_deep)),
            merge_unit=m,
            head_params=float(h * t.vocab_size),
        )

    def micro_batch(self, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor, num_real_tokens: int, head_positions: int) -> float:
        """FLOPs of one micro-batch; head_positions: where the LM head runs (the loss positions, or every token
        under sequence parallelism)."""
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).double().cpu()
        real = float(num_real_tokens)
        sq = float((lens**2).sum())  # padding is its own segment; its share is small and not subtracted
        flops = 6 * self.lm_params * real + 6 * self.lm_layers * self.lm_attn_width * sq + 6 * self.head_params * head_positions
        if image_grid_thw is not None and image_grid_thw.numel():
            n = image_grid_thw.double().cpu().prod(dim=1)
            flops += 6 * self.vit_params * float(n.sum()) + 12 * self.vit_layers * self.vit_width * float((n**2).sum())
            flops += 6 * self.merger_params * float(n.sum()) / self.merge_unit
        return flops


def measure_peak_tflops(device: torch.device, size: int = 8192, reps: int = 20) -> float | None:
    """The card's bf16 matmul rate, measured (random data, median of timed products after warm-up)."""
    if device.type != "cuda":
        return None
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    del a, b
    torch.cuda.empty_cache()
    return 2 * size**3 / times[len(times) // 2] / 1e12
