"""Plan an epoch: shuffle, cut into global batches, balance each across ranks, pack each share into micro-batches.

Everything here works on the index (token and patch counts per sample), never on records, and is a pure
function of (sample table, config, epoch, dp_size). Every rank computes the same plan with no communication,
and a resumed run recomputes it: the loader's whole position is (epoch, step).

The plan of one epoch, step by step:

1. **Order.** A permutation of all samples drawn from `numpy.random.default_rng([seed, epoch])`: a full
   shuffle, not a shard-order-plus-buffer approximation, new every epoch, identical on every rank.
2. **Global batches.** Consecutive runs of `global_batch_size` samples of that order. With `drop_last` the
   last partial run is dropped (a different remainder each epoch); without it, it becomes a smaller step.
   Which samples form a step depends only on (seed, epoch, global_batch_size), not on dp_size or the token
   budget, so a run can resume on a different number of GPUs and still see the same steps.
3. **Balance across ranks.** Longest-processing-time greedy: samples by descending cost, each to the rank
   with the least cost so far. Cost is an estimate of training FLOPs (`FlopsModel`: 6 x params per token plus
   the quadratic attention term, for the LLM over tokens and the vision tower over patches) or plain tokens.
   LPT is within 4/3 of the optimal makespan, and with ~128 small samples per step the spread between ranks
   is typically under 1%. Ranks may hold different numbers of samples: the loss is normalised by the global
   count of loss tokens, which every rank gets from the plan (`StepPlan.num_loss_tokens`).
4. **Pack each rank's share.** First-fit decreasing by tokens into bins of `max_tokens_per_gpu` (and at most
   `max_patches_per_gpu` patches when set): whole samples only, never cut. FFD uses at most 11/9 OPT + 1 bins;
   here it almost always hits the lower bound ceil(tokens / budget).
5. **Agree on the micro-batch count.** Every rank must run the same number of forward/backward passes per
   step (pipeline schedules and gradient sync need it). k = the largest count; a rank with fewer bins splits its
   fullest multi-sample bin in two (same work, one more pass) until it has k. Only a rank holding fewer samples
   than k (tiny global batches) gets an empty bin, which the loader turns into a padding-only micro-batch
   (labels all -100, no images).

**Fill.** The real tokens of a step over k x dp x budget. Within a step FFD leaves only the last bin
part-full, so fill is about 1 - 0.5 / (bins per rank per step): at dp = 1, 128 Geo3K-like samples (~45k
tokens, 11 bins of 4096) give ~96-99%; at dp = 8 each rank packs only ~16 samples into 2 bins, so fill vs the
budget falls to ~70-85%. That loss is in budget, not compute: micro-batches are not padded to the budget
(varlen attention costs what the real tokens cost), so the GPU work per real token is the same. Packing the
whole epoch as one stream (no step boundaries) reaches >= 99% (bench/bench_packing.py measures both).

**Limits.** A sample longer than the budget (or with more patches than the cap) cannot be packed: planning
raises `SampleTooLongError` naming it, before training starts. Planning is O(N log N + N x bins) Python per
epoch: milliseconds for Geo3K, about a second for 10^5 samples.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Any

import numpy as np

from shared.errors import UserError

from train.data.config import DataConfig
from train.data.reader import SampleTable


class SampleTooLongError(UserError, ValueError):
    """A sample that cannot fit one micro-batch on its own."""


# ---------------------------------------------------------------- cost model


@dataclass
class FlopsModel:
    """Training FLOPs (forward + backward) of one sample, from the model's shape. Only ratios matter."""

    llm_params: float = 1.4e9
    """Non-embedding parameters active per token (MoE: the routed experts' share only)."""
    llm_layers: int = 28
    llm_attn_width: int = 2048
    """num_attention_heads x head_dim: the width of the QK^T and AV products."""
    vision_params: float = 0.4e9
    vision_layers: int = 24
    vision_width: int = 1024

    @classmethod
    def from_hf_config(cls, config: dict[str, Any]) -> "FlopsModel":
        """From a Qwen-VL config.json (Qwen2.5-VL, Qwen3-VL, Qwen3-VL-MoE)."""
        tc = config.get("text_config", config)
        vc = config["vision_config"]
        h, layers = tc["hidden_size"], tc["num_hidden_layers"]
        heads, kv = tc["num_attention_heads"], tc.get("num_key_value_heads", tc["num_attention_heads"])
        hd = tc.get("head_dim", h // heads)
        attn = h * heads * hd * 2 + h * kv * hd * 2
        if tc.get("num_experts"):
            mlp = 3 * h * tc["moe_intermediate_size"] * tc["num_experts_per_tok"]
        else:
            mlp = 3 * h * tc["intermediate_size"]
        vh = vc.get("hidden_size", vc.get("embed_dim"))
        vdepth = vc["depth"]
        vmlp = vc.get("intermediate_size", 4 * vh)
        vmlp_mats = 3 if "qwen2_5" in str(config.get("model_type", "")) else 2  # 2.5-VL's vision MLP is gated
        return cls(
            llm_params=float(layers * (attn + mlp)),
            llm_layers=layers,
            llm_attn_width=heads * hd,
            vision_params=float(vdepth * (4 * vh * vh + vmlp_mats * vh * vmlp)),
            vision_layers=vdepth,
            vision_width=vh,
        )

    @classmethod
    def for_model(cls, name_or_path: str) -> "FlopsModel":
        from shared.presets import model_config_dict

        return cls.from_hf_config(model_config_dict(name_or_path))

    def sample_flops(self, num_tokens: np.ndarray, num_patches: np.ndarray, num_images: np.ndarray) -> np.ndarray:
        t = np.asarray(num_tokens, dtype=np.float64)
        p = np.asarray(num_patches, dtype=np.float64)
        imgs = np.maximum(np.asarray(num_images, dtype=np.float64), 1.0)
        # causal attention: 2 T^2 d per layer forward, x3 with backward; the vision tower attends within each
        # image without a mask (4 n^2 d, x3), n approximated by the mean patches per image
        llm = 6 * self.llm_params * t + 6 * self.llm_layers * self.llm_attn_width * t * t
        vision = 6 * self.vision_params * p + 12 * self.vision_layers * self.vision_width * p * p / imgs
        return llm + vision


def flops_model_for(name: str | None) -> FlopsModel:
    """The cost model of the model the shards were made for (ShardSet.processor_name; default shape: Qwen3-VL-2B)."""
    from shared.presets import PresetError

    try:
        return FlopsModel.for_model(name) if name else FlopsModel()
    except (PresetError, OSError, KeyError):
        return FlopsModel()  # an unknown local model: only the ratios matter, the default shape is close


# ---------------------------------------------------------------- the pieces


def epoch_order(num_samples: int, seed: int, epoch: int) -> np.ndarray:
    """The sample order of an epoch: a permutation that depends on (seed, epoch) only."""
    return np.random.default_rng([seed, epoch]).permutation(num_samples)


def balance_across_ranks(ids: np.ndarray, costs: np.ndarray, dp_size: int) -> list[list[int]]:
    """LPT greedy: ids by descending cost (ties by id), each to the least-loaded rank (ties: lowest rank)."""
    order = sorted(ids.tolist(), key=lambda i: (-costs[i], i))
    heap = [(0.0, r) for r in range(dp_size)]
    shares: list[list[int]] = [[] for _ in range(dp_size)]
    for i in order:
        load, r = heapq.heappop(heap)
        shares[r].append(i)
        heapq.heappush(heap, (load + float(costs[i]), r))
    return shares


def pack_first_fit_decreasing(
    ids: list[int], num_tokens: np.ndarray, num_patches: np.ndarray, max_tokens: int, max_patches: int | None
) -> list[list[int]]:
    """Whole samples into bins of <= max_tokens tokens (and <= max_patches patches): first-fit decreasing."""
    bins: list[list[int]] = []
    room_t: list[int] = []
    room_p: list[int] = []
    cap_p = max_patches if max_patches is not None else np.iinfo(np.int64).max
    for i in sorted(ids, key=lambda i: (-int(num_tokens[i]), i)):
        t, p = int(num_tokens[i]), int(num_patches[i])
        for b in range(len(bins)):
            if t <= room_t[b] and p <= room_p[b]:
                bins[b].append(i)
                room_t[b] -= t
                room_p[b] -= p
                break
        else:
            bins.append([i])
            room_t.append(max_tokens - t)
            room_p.append(cap_p - p)
    return bins


def split_to_count(bins: list[list[int]], count: int, num_tokens: np.ndarray) -> list[list[int]]:
    """Reach `count` bins by halving the fullest multi-sample bin (greedy 2-way split); then add empty bins."""
    bins = [list(b) for b in bins]
    while len(bins) < count:
        multi = [b for b in range(len(bins)) if len(bins[b]) > 1]
        if not multi:
            bins.append([])
            continue
        b = max(multi, key=lambda b: (sum(int(num_tokens[i]) for i in bins[b]), -b))
        halves: list[list[int]] = [[], []]
        loads = [0, 0]
        for i in sorted(bins[b], key=lambda i: (-int(num_tokens[i]), i)):
            side = 0 if loads[0] <= loads[1] else 1
            halves[side].append(i)
            loads[side] += int(num_tokens[i])
        bins[b] = halves[0]
        bins.insert(b + 1, halves[1])
    return bins


# ---------------------------------------------------------------- the plan


@dataclass
class StepPlan:
    """One optimizer step: which samples each rank packs into which micro-batch."""

    epoch: int
    step: int
    micro_batches: list[list[list[int]]]
    """[rank][micro-batch] -> rows of the SampleTable; every rank has the same number of micro-batches."""
    num_samples: int
    num_tokens: int
    num_loss_tokens: int
    """Over all ranks: the denominator of the per-token loss of this step."""

    @property
    def num_micro_batches(self) -> int:
        return len(self.micro_batches[0])


@dataclass
class EpochPlan:
    epoch: int
    steps: list[StepPlan]


def check_fits(table: SampleTable, cfg: DataConfig) -> None:
    """Raise SampleTooLongError naming every sample that cannot fit one micro-batch."""
    too_long = np.flatnonzero(table.num_tokens > cfg.max_tokens_per_gpu)
    if too_long.size:
        worst = ", ".join(f"{table.keys[i]} ({table.num_tokens[i]} tokens)" for i in too_long[:5])
        raise SampleTooLongError(
            f"{too_long.size} sample(s) exceed max_tokens_per_gpu={cfg.max_tokens_per_gpu}: {worst}. Raise "
            f"train.max_tokens_per_gpu to at least {int(table.num_tokens.max())}, or preprocess again "
            f"with preprocess.max_tokens={cfg.max_tokens_per_gpu} to reject them"
        )
    if cfg.max_patches_per_gpu is not None:
        too_big = np.flatnonzero(table.num_patches > cfg.max_patches_per_gpu)
        if too_big.size:
            worst = ", ".join(f"{table.keys[i]} ({table.num_patches[i]} patches)" for i in too_big[:5])
            raise SampleTooLongError(
                f"{too_big.size} sample(s) exceed max_patches_per_gpu={cfg.max_patches_per_gpu}: {worst}. Raise "
                f"train.max_patches_per_micro_batch to at least {int(table.num_patches.max())}, or lower "
                "model.max_pixels when preprocessing"
            )


def steps_per_epoch(num_samples: int, cfg: DataConfig) -> int:
    full, rest = divmod(num_samples, cfg.global_batch_size)
    return full + (1 if rest and not cfg.drop_last else 0)


def sample_costs(table: SampleTable, cfg: DataConfig, flops: FlopsModel | None) -> np.ndarray:
    if cfg.balance == "tokens":
        return table.num_tokens.astype(np.float64)
    return (flops or FlopsModel()).sample_flops(table.num_tokens, table.num_patches, table.num_images)


def plan_step(
    ids: np.ndarray, table: SampleTable, cfg: DataConfig, dp_size: int, costs: np.ndarray, epoch: int = 0, step: int = 0
) -> StepPlan:
    shares = balance_across_ranks(ids, costs, dp_size)
    per_rank = [
        pack_first_fit_decreasing(share, table.num_tokens, table.num_patches, cfg.max_tokens_per_gpu, cfg.max_patches_per_gpu)
        for share in shares
    ]
    k = max(len(b) for b in per_rank)
    per_rank = [split_to_count(b, k, table.num_tokens) for b in per_rank]
    return StepPlan(
        epoch=epoch,
        step=step,
        micro_batches=per_rank,
        num_samples=int(ids.size),
        num_tokens=int(table.num_tokens[ids].sum()),
        num_loss_tokens=int(table.num_loss_tokens[ids].sum()),
    )


def plan_epoch(table: SampleTable, cfg: DataConfig, epoch: int, dp_size: int, flops: FlopsModel | None = None) -> EpochPlan:
    """The whole epoch for all ranks (each rank takes its row of every step)."""
    if dp_size < 1:
        raise ValueError(f"dp_size must be >= 1, got {dp_size}")
    check_fits(table, cfg)
    costs = sample_costs(table, cfg, flops)
    order = epoch_order(len(table), cfg.seed, epoch)
    gbs = cfg.global_batch_size
    steps = [
        plan_step(order[s * gbs : (s + 1) * gbs], table, cfg, dp_size, costs, epoch, s)
        for s in range(steps_per_epoch(len(table), cfg))
    ]
    return EpochPlan(epoch, steps)
