"""The FLOP model: model FLOPs of a training step and MFU as the field reports it (one model: the trainer's
logged MFU and the benchmarks' both count with this module).

The FLOPs the step needs: 6 x (matmul parameters active per token: MoE layers count their router and the top-k
experts only; embeddings excluded) x tokens, plus causal attention (QK^T and AV: 2·s²·width per layer forward for
a sample of length s, x3 with backward), plus the LM head where it is computed (6·hidden·vocab per position: the
loss positions only, as `QwenVLLanguageModel._postprocess` and the FSDP engine's chunked loss run it, except under
sequence parallelism, where Megatron runs it on every token), plus the vision encoder per patch (6 x its matmul
parameters, and 4·n²·width per layer forward for an image of n patches, x3) and the patch merger per merged
token. Recomputation is not counted (it is hardware work, not model work). Qwen2.5-VL's windowed vision layers
are counted as full attention over the image: a slight overestimate.

MFU = model FLOPs / (time x the card's datasheet dense bf16 peak), the peak looked up by the card's name in
`DATASHEET_BF16_TFLOPS` (989.4 TFLOP/s for H100 SXM and H200). A card not in the table gets no MFU, and says so;
the bf16 matmul rate measured at start-up (~760-790 TFLOP/s on an H100 or H200) gives the secondary
`mfu_measured_peak`, which reads ~1.28x higher on those cards.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Dense bf16 tensor-core peaks (no sparsity) from the vendors' datasheets, TFLOP/s, keyed by a part of
# torch.cuda.get_device_name(); the longest key found in the name wins ("H100 PCIe" before "H100",
# "GH200" before "H200", "L40S" before "L40" before "L4"). The SXM H100 reports "NVIDIA H100 80GB HBM3".
DATASHEET_BF16_TFLOPS = {
    "H100": 989.4, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H200": 989.4, "H200 NVL": 835.0, "GH200": 989.4,
    "H800": 989.4, "H800 PCIe": 756.0, "H20": 148.0, "A100": 312.0, "A800": 312.0,
    "L40S": 362.1, "L40": 181.0, "L4": 121.0, "B200": 2250.0, "GB200": 2500.0,
}


def datasheet_peak_tflops(card: str) -> float | None:
    """The datasheet dense bf16 TFLOP/s of a card, by its torch.cuda.get_device_name(); None if not in the table."""
    keys = [k for k in DATASHEET_BF16_TFLOPS if k in card]
    return DATASHEET_BF16_TFLOPS[max(keys, key=len)] if keys else None


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


@dataclass
class Peaks:
    """The two denominators of MFU on one card: its datasheet peak (MFU proper) and its measured matmul rate."""

    card: str
    datasheet: float | None
    measured: float | None

    @classmethod
    def of(cls, device: torch.device) -> "Peaks":
        if device.type != "cuda":
            return cls("cpu", None, None)
        name = torch.cuda.get_device_name(device)
        return cls(name, datasheet_peak_tflops(name), measure_peak_tflops(device))

    def mfu(self, tflops_per_gpu: float) -> dict[str, float | None]:
        return {"mfu": tflops_per_gpu / self.datasheet if self.datasheet else None,
                "mfu_measured_peak": tflops_per_gpu / self.measured if self.measured else None}

    def describe(self) -> str:
        measured = f"; bf16 matmul measured at {self.measured:.0f} TFLOP/s (mfu_measured_peak)" if self.measured else ""
        if self.datasheet:
            return f"{self.card}: MFU against its datasheet dense bf16 peak, {self.datasheet:g} TFLOP/s{measured}"
        if self.card == "cpu":
            return "no MFU on a CPU"
        return f"{self.card} is not in train/flops.py DATASHEET_BF16_TFLOPS: no MFU (add the card's dense bf16 peak){measured}"


@dataclass
class StepFlops:
    lm_params: float  # matmul parameters active per token, LM head excluded
    lm_layers: int
    lm_attn_width: int
    vit_params: float  # per patch
    vit_layers: int
    vit_width: int
    merger_params: float  # per merged token
    merge_unit: int  # patches per merged token
    head_params: float  # hidden x vocab: the LM head, per position where it runs
    head_on_every_token: bool = False
    """The LM head runs on every token (Megatron under sequence parallelism), not only at the loss positions."""

    @classmethod
    def from_hf_config(cls, hf_config, head_on_every_token: bool = False) -> "StepFlops":
        t, v = hf_config.text_config, hf_config.vision_config
        h, heads = t.hidden_size, t.num_attention_heads
        kv = getattr(t, "num_key_value_heads", heads)
        hd = getattr(t, "head_dim", None) or h // heads
        attn = h * heads * hd * 2 + h * kv * hd * 2
        dense = 3 * h * t.intermediate_size
        if getattr(t, "num_experts", None):
            dense_layers = set(getattr(t, "mlp_only_layers", None) or [])
            step = getattr(t, "decoder_sparse_step", 1) or 1
            moe = 3 * h * t.moe_intermediate_size * t.num_experts_per_tok + h * t.num_experts  # top-k experts + router
            mlp_total = sum(moe if i not in dense_layers and (i + 1) % step == 0 else dense for i in range(t.num_hidden_layers))
        else:
            mlp_total = dense * t.num_hidden_layers
        vh = getattr(v, "hidden_size", None) or v.embed_dim
        vmlp = getattr(v, "intermediate_size", 4 * vh)
        gated = hf_config.model_type == "qwen2_5_vl"
        patch_in = v.in_channels * v.temporal_patch_size * v.patch_size**2
        m = v.spatial_merge_size**2
        merger = (vh * m) ** 2 + vh * m * getattr(v, "out_hidden_size", h)
        return cls(
            lm_params=float(attn * t.num_hidden_layers + mlp_total),
            lm_layers=t.num_hidden_layers,
            lm_attn_width=heads * hd,
            vit_params=float(v.depth * (4 * vh * vh + (3 if gated else 2) * vh * vmlp) + patch_in * vh),
            vit_layers=v.depth,
            vit_width=vh,
            merger_params=float(merger * (1 + len(getattr(v, "deepstack_visual_indexes", None) or []))),
            merge_unit=m,
            head_params=float(h * t.vocab_size),
            head_on_every_token=head_on_every_token,
        )

    def micro_batch(self, cu_seqlens: torch.Tensor, image_grid_thw: torch.Tensor | None, num_real_tokens: int, head_positions: int) -> float:
        """FLOPs of one micro-batch; head_positions: where the LM head runs."""
        lens = (cu_seqlens[1:] - cu_seqlens[:-1]).double().cpu()
        sq = float((lens**2).sum())  # padding is its own segment; its share is small and not subtracted
        flops = 6 * self.lm_params * num_real_tokens + 6 * self.lm_layers * self.lm_attn_width * sq + 6 * self.head_params * head_positions
        if image_grid_thw is not None and image_grid_thw.numel():
            n = image_grid_thw.double().cpu().prod(dim=1)
            flops += 6 * self.vit_params * float(n.sum()) + 12 * self.vit_layers * self.vit_width * float((n**2).sum())
            flops += 6 * self.merger_params * float(n.sum()) / self.merge_unit
        return flops

    def step(self, micro_batches) -> float:
        """FLOPs of the packed micro-batches of one step (train.data PackedBatch: the LM head at the loss positions,
        or on every token when head_on_every_token)."""
        return sum(self.micro_batch(mb.cu_seqlens, mb.image_grid_thw, mb.num_real_tokens,
                                    mb.num_tokens if self.head_on_every_token else mb.num_loss_tokens) for mb in micro_batches)
