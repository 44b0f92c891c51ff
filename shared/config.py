"""One config tree for both stages, loaded from pipeline.yaml into dataclasses that check themselves.

    cfg = load_config("pipeline.yaml", overrides=["preprocess.workers=4", "model.name_or_path=qwen2.5-vl-3b"])

Every field can be overridden from the command line with `--set section.field=value` (the value is read as
YAML, so `--set shards.samples_per_shard=64` gives an int and `--set source.splits=[train]` a list). A bad
value raises `ConfigError` naming the field and what to write instead.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from shared.errors import UserError


class ConfigError(UserError, ValueError):
    """A config value that cannot work; the message names the field and the fix."""


def _check(cond: bool, path: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{path}: {msg}")


@dataclass
class SourceConfig:
    """Where the raw Geo3K rows come from."""

    hf_repo: str | None = "chenhegu/geo3k_imgurl"
    """Hugging Face dataset id, fetched with huggingface_hub when `files` does not name the split."""
    files: dict[str, str] = field(default_factory=dict)
    """Local parquet or JSONL file per split ({train: path}); overrides `hf_repo` for that split."""
    splits: list[str] = field(default_factory=lambda: ["train", "test"])
    """Splits to preprocess; each becomes data_shards/<dataset>/<split>/."""
    input_key: str = "problem"
    """Column with the problem text; `<image>` marks where each image goes."""
    label_key: str = "answer"
    """Column with the answer the assistant turn is trained on."""
    image_key: str = "images"
    """Column with the image(s): a list or a single entry of URL, path, file:// URL or {bytes, path}."""
    image_root: str | None = None
    """Folder that relative image paths are read from (default: the source file's own folder)."""
    max_rows: int | None = None
    """Read only the first N rows of each split (smoke runs); None reads all."""

    def validate(self, path: str = "source") -> None:
        _check(bool(self.splits), f"{path}.splits", "list at least one split, e.g. [train, test]")
        for split in self.splits:
            _check(
                split in self.files or bool(self.hf_repo),
                f"{path}.files",
                f"split {split!r} has no file and source.hf_repo is empty: set source.files.{split}=PATH",
            )
        for split, f in self.files.items():
            _check(
                str(f).endswith((".parquet", ".jsonl", ".json")),
                f"{path}.files.{split}",
                f"{f!r} is neither .parquet nor .jsonl",
            )
        _check(self.max_rows is None or self.max_rows > 0, f"{path}.max_rows", "must be positive or null")


@dataclass
class ModelConfig:
    """The model whose processor tokenizes the shards (and, in training, the model trained)."""

    name_or_path: str = "qwen3-vl-2b"
    """A preset name (qwen2.5-vl-3b, qwen3-vl-2b, qwen3-vl-4b, qwen3-vl-8b, qwen3-vl-30b-a3b), a Hugging Face
    hub id (Qwen/Qwen3-VL-2B-Instruct: known ids map to presets offline) or a local model directory."""
    min_pixels: int | None = None
    """Override the image processor's minimum pixels per image (None keeps the model's)."""
    max_pixels: int | None = None
    """Override the image processor's maximum pixels per image (None keeps the model's)."""

    def validate(self, path: str = "model") -> None:
        _check(bool(self.name_or_path), f"{path}.name_or_path", "name a preset, hub id or directory")
        for name in ("min_pixels", "max_pixels"):
            v = getattr(self, name)
            _check(v is None or v > 0, f"{path}.{name}", "must be a positive pixel count or null")
        if self.min_pixels and self.max_pixels:
            _check(self.min_pixels <= self.max_pixels, f"{path}.min_pixels", "must not exceed model.max_pixels")


@dataclass
class FetchConfig:
    """How images are downloaded and decoded."""

    concurrency: int = 16
    """Downloads in flight per worker process."""
    connect_timeout: float = 10.0
    """Seconds to establish a connection."""
    read_timeout: float = 30.0
    """Seconds without a byte before a read gives up; a whole download is cut at 4x this (wall clock)."""
    retries: int = 3
    """Extra attempts after a timeout, connection error, 429 or 5xx (never after another 4xx)."""
    backoff: float = 0.5
    """First retry waits this many seconds, doubling each time."""
    max_bytes: int = 20_000_000
    """Largest image file accepted."""
    max_image_pixels: int = 50_000_000
    """Largest decoded image (width x height) accepted; guards against decompression bombs."""
    cache_dir: str | None = ".cache/geo3k/images"
    """Downloaded files, keyed by URL, so a rerun downloads nothing; null disables."""

    def validate(self, path: str = "preprocess.fetch") -> None:
        _check(self.concurrency >= 1, f"{path}.concurrency", "must be at least 1")
        _check(self.connect_timeout > 0 and self.read_timeout > 0, f"{path}.read_timeout", "timeouts must be > 0")
        _check(self.retries >= 0, f"{path}.retries", "must be >= 0")
        _check(self.backoff >= 0, f"{path}.backoff", f"must be >= 0 seconds (got {self.backoff:g}), e.g. 0.5")
        _check(self.max_bytes > 0, f"{path}.max_bytes", "must be > 0")
        _check(self.max_image_pixels > 0, f"{path}.max_image_pixels", "must be > 0")


@dataclass
class PreprocessConfig:
    """How rows become samples."""

    response_template: str = "{answer}"
    """The assistant turn; `{answer}` is replaced by the label, e.g. 'Answer: \\boxed{{{answer}}}'."""
    system_prompt: str | None = None
    """A system turn; None keeps the chat template's default (Qwen2.5-VL adds one, Qwen3-VL does not)."""
    train_final_newline: bool = False
    """Also put the newline after the answer's closing `<|im_end|>` in the loss mask: the convention of slime,
    Megatron-Bridge, ms-swift, LLaMA-Factory and verl, to reproduce their loss values. Off (this project's
    default): the answer and its `<|im_end|>` only, where generation stops. Changes the shards' fingerprint."""
    max_tokens: int = 4096
    """A sample longer than this is rejected with its length (never cut): it must fit one micro-batch."""
    workers: int = 0
    """Worker processes; 0 means one per core."""
    verify: bool = False
    """Also run every row through the full processor and compare (`--verify`); by default one row in 64 is.
    Only checks: the output is the same either way (a row that differs is written from the processor's result)."""
    fetch: FetchConfig = field(default_factory=FetchConfig)

    def validate(self, path: str = "preprocess") -> None:
        _check("{answer}" in self.response_template, f"{path}.response_template", "must contain {answer}")
        try:
            self.response_template.format(answer="x")
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"{path}.response_template: {e!r}; write literal braces doubled, e.g. '\\boxed{{{{answer}}}}'"
            ) from None
        _check(self.max_tokens >= 64, f"{path}.max_tokens", "must be at least 64")
        _check(self.workers >= 0, f"{path}.workers", "must be >= 0 (0 = all cores)")
        self.fetch.validate(f"{path}.fetch")


@dataclass
class ShardConfig:
    """Where and how shards are written."""

    output_dir: str = "data_shards"
    """Root folder; shards go to <output_dir>/<dataset>/<split>/."""
    samples_per_shard: int = 256
    """Source rows per shard (rejected rows leave a shard a little smaller)."""
    zstd_level: int = 3
    """zstandard level for the pixel data (1-22); higher is smaller and slower to write, not to read. 3: level 10
    took ~1 ms more per sample (a quarter of the per-sample time) for ~9% fewer pixel bytes."""

    def validate(self, path: str = "shards") -> None:
        _check(self.samples_per_shard >= 1, f"{path}.samples_per_shard", "must be at least 1")
        _check(1 <= self.zstd_level <= 22, f"{path}.zstd_level", "must be 1..22")


# train.attention_backend's choices: "auto" and train/models/attention.py's BACKENDS (a test keeps them equal;
# shared/ imports no torch code).
ATTENTION_BACKENDS = ("auto", "fa4", "flash_attn", "aten_flash", "torch_varlen", "cudnn_frontend", "sdpa")


@dataclass
class TrainConfig:
    """`geo3k train`: the recipe of the original Geo3K SFT example, every knob here."""

    backend: str = "megatron"
    """Training engine: megatron (Megatron-Core, default) or fsdp (PyTorch FSDP2 on the transformers model)."""
    shards: str | None = None
    """Training shard set (a split folder); default <shards.output_dir>/<dataset>/train."""
    eval_shards: str | None = None
    """Eval shard set; default <shards.output_dir>/<dataset>/test. Must exist while eval is on (train.eval_interval > 0)."""
    random_init: bool = False
    """Start from random weights of model.name_or_path's architecture (benchmarks, demos) instead of its checkpoint."""
    output_dir: str = "runs/geo3k"
    """Checkpoints, metrics.jsonl, TensorBoard events and the loss curve go here."""
    global_batch_size: int = 128
    """Samples per optimizer step, across all data-parallel ranks."""
    max_tokens_per_gpu: int = 4096
    """Token budget of one packed micro-batch."""
    max_patches_per_micro_batch: int | None = None
    """Optional cap on vision patches per micro-batch (bounds the vision encoder's memory)."""
    epochs: int = 3
    train_iters: int | None = None
    """Stop after this many optimizer steps (default: all steps of `epochs`); the schedule spans them."""
    lr: float = 1e-5
    min_lr: float = 1e-6
    warmup_fraction: float = 0.1
    """Linear warmup over this fraction of the steps, then cosine decay to min_lr."""
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    bf16: bool = True
    """bf16 weights and activations with fp32 master weights in the optimizer; false trains in fp32."""
    grad_reduce_in_fp32: bool = True
    """Megatron backend in bf16: accumulate micro-batch gradients and reduce them over data-parallel ranks in an
    fp32 buffer (Megatron's default); false keeps that buffer in bf16: 2 bytes a parameter less and a third of the
    accumulation traffic, at bf16's precision for the sum (docs/performance.md compares the loss curves)."""
    gradient_accumulation_fusion: bool = True
    """Megatron backend on GPUs: each linear layer's weight-gradient GEMM adds straight into the parameter's main
    gradient (cuBLAS, C += A B with the fp32 buffer as C; Megatron's option of that name, without Apex), and the norms'
    weight gradients are added into it inside the (compiled) backward, instead of bf16 gradients that a hook per
    parameter then adds (train/grad_accum.py). false: the unfused path, to compare."""
    recompute: str = "none"
    """Activation recomputation: none, selective (attention core) or full (every layer)."""
    fused_kernels: bool = True
    """On GPUs, compile RMSNorm, RoPE and SwiGLU into fused kernels (torch.compile; train/models/fused.py)."""
    compile_layers: bool = True
    """On GPUs, compile each decoder layer and each vision block whole (torch.compile; train/models/layer_compile.py):
    one graph per layer kind, shared by all layers, so Python stops launching the forward op by op. Applies with
    recompute none, on both backends (Megatron: tensor_parallel 1; FSDP: transformers' layers, FSDP's per-layer
    hooks, where there are several processes, left eager around each); MoE layers compile their attention half
    only. Elsewhere layers stay eager."""
    compile_cpp_wrapper: bool = False
    """With compile_layers: Inductor's C++ wrapper, so the code that launches each compiled layer's kernels is C++
    instead of Python (less host time per launch, where the GPU waits on the host); the first compile takes longer
    (a C++ build per graph, needs a C++ compiler)."""
    compile_skip_guards_after: int = 0
    """With compile_layers: after this many training steps of the process (a resumed run warms up again), each
    compiled layer's call checks only the guards that pick between its cached graphs (tensor sizes and size ranges,
    dtypes, strides, grad mode, and any that made a graph recompile so far), not every guard (the modules'
    attributes, globals), which saves host time each call (torch.compiler.set_stance's skip_guard_eval_unsafe); a
    call that no cached graph fits compiles one with every guard checked. Unsafe only where a graph depends on
    something outside those guards: a module attribute changed after warm-up would run the old graph. Training
    forwards and backwards only; 0: every guard, always."""
    attention_backend: str = "auto"
    """Varlen attention kernel (train/models/attention.py): auto (the fastest this device and dtype run: flash_attn
    if installed, else aten_flash, torch_varlen, then fa4 on GPUs; sdpa on CPU or in fp32), or one of fa4,
    flash_attn, aten_flash, torch_varlen, cudnn_frontend (cuDNN through `pip install nvidia-cudnn-frontend`,
    never auto's pick), sdpa to compare kernels or to work around a broken one."""
    vision_attention_backend: str = "same"
    """The vision tower's (non-causal) attention kernel: same (as train.attention_backend), auto, or one of the
    names above. Its shapes (head size 64, one segment per image) favour other kernels than the language model's
    (head size 128, causal): FlashAttention-4 ran them 0.74x and 1.17x FlashAttention-2 on an H200."""
    gc_interval: int = 50
    """Python's automatic garbage collection is off while training; a young-generation collection runs every
    N steps instead (train/gc_policy.py; ~5 ms per step on one GPU, more to gain with several, where a pause on
    one rank stalls all). 0 leaves Python's default."""
    tensor_parallel: int = 1
    """Tensor-parallel size: each layer's weights split over this many GPUs (heads, FFN, vocabulary)."""
    sequence_parallel: bool = False
    """Shard activations along the sequence in tensor-parallel regions (needs tensor_parallel > 1)."""
    expert_parallel: int = 1
    """Expert-parallel size (MoE models): the experts of each MoE layer split over this many GPUs, taken from
    the data-parallel ones, tokens exchanged with an all-to-all. Divides the process count / tensor_parallel."""
    moe_grouped_gemm: bool = True
    """MoE models, Megatron backend: all local experts in two grouped GEMMs (torch._grouped_mm); false runs one
    GEMM pair per expert (the reference, ~50x slower on GPUs)."""
    moe_aux_loss: bool = False
    """MoE models: train on the load-balancing loss too, weighted by the model config's router_aux_loss_coef
    (per MoE layer, mean over micro-batches). Off by default, as transformers fine-tunes (it adds the loss only
    with output_router_logits). The expert load and the loss value are logged either way."""
    seed: int = 1234
    save_interval: int = 100
    """Save a checkpoint every N steps (and at the end); 0 saves only at the end."""
    save_last: bool = True
    """Save a checkpoint when training ends (benchmarks turn it off)."""
    keep_checkpoints: int = 2
    """Keep this run's newest N checkpoints, deleting its older ones once a new one is complete (0 keeps all):
    a 2B model's is ~30 GB with Adam."""
    eval_interval: int = 100
    """Evaluate every N steps and at the end, after that step's checkpoint; 0 turns eval off (no eval shards needed)."""
    eval_samples: int | str = 64
    """Test problems answered by greedy generation for the accuracy metric: a count (0: loss only) or "all"
    (the whole test split)."""
    eval_max_new_tokens: int = 64
    eval_kv_cache_positions: int = 131072
    """Greedy answers decode with a KV cache of at most this many positions per GPU (rows x (longest prompt +
    eval_max_new_tokens)): Qwen3-VL-2B keeps 112 KiB per position in bf16, so the default is ~14 GiB."""
    eval_image_gain: bool = True
    """Also the eval loss with every image blanked, logged as image_gain = blank loss - loss (one more forward
    per eval micro-batch): a model that stops seeing its images shows it here first."""
    log_interval: int = 1
    num_workers: int = 2
    """Background loader processes per rank."""
    wandb_project: str | None = None
    """Weights & Biases project, used only when WANDB_API_KEY is set."""

    def validate(self, path: str = "train") -> "TrainConfig":
        _check(self.backend in ("megatron", "fsdp"), f"{path}.backend", "must be megatron or fsdp")
        _check(self.global_batch_size >= 1, f"{path}.global_batch_size", "must be at least 1")
        _check(self.max_tokens_per_gpu >= 64, f"{path}.max_tokens_per_gpu", "must be at least 64")
        _check(self.epochs >= 1, f"{path}.epochs", "must be at least 1")
        _check(self.train_iters is None or self.train_iters >= 1, f"{path}.train_iters", "must be >= 1 or null")
        _check(0 < self.min_lr <= self.lr, f"{path}.min_lr", "must be > 0 and <= train.lr")
        _check(0 <= self.warmup_fraction < 1, f"{path}.warmup_fraction", "must be in [0, 1)")
        _check(self.recompute in ("none", "selective", "full"), f"{path}.recompute", "must be none, selective or full")
        _check(
            self.attention_backend in ATTENTION_BACKENDS,
            f"{path}.attention_backend",
            f"{self.attention_backend!r}: write one of {', '.join(ATTENTION_BACKENDS)}",
        )
        _check(
            self.vision_attention_backend in ("same", *ATTENTION_BACKENDS),
            f"{path}.vision_attention_backend",
            f"{self.vision_attention_backend!r}: write same or one of {', '.join(ATTENTION_BACKENDS)}",
        )
        _check(self.gc_interval >= 0, f"{path}.gc_interval", "must be >= 0 (0: Python's automatic garbage collection)")
        _check(self.tensor_parallel >= 1, f"{path}.tensor_parallel", "must be >= 1")
        _check(self.expert_parallel >= 1, f"{path}.expert_parallel", "must be >= 1")
        _check(
            not self.sequence_parallel or self.tensor_parallel > 1,
            f"{path}.sequence_parallel",
            "needs train.tensor_parallel > 1 (or set it to false)",
        )
        _check(self.clip_grad >= 0, f"{path}.clip_grad", "must be >= 0 (0 disables clipping)")
        _check(self.num_workers >= 0, f"{path}.num_workers", "must be >= 0")
        for name in ("save_interval", "keep_checkpoints", "eval_interval", "log_interval", "compile_skip_guards_after"):
            _check(getattr(self, name) >= 0, f"{path}.{name}", "must be >= 0")
        _check(self.eval_kv_cache_positions > self.eval_max_new_tokens, f"{path}.eval_kv_cache_positions",
               "must exceed eval_max_new_tokens (a prompt and its answer must fit)")
        _check(
            self.eval_samples == "all" or (type(self.eval_samples) is int and self.eval_samples >= 0),
            f"{path}.eval_samples", f"must be a count >= 0 or all, got {self.eval_samples!r}",
        )
        return self


@dataclass
class PipelineConfig:
    """The root of pipeline.yaml."""

    dataset: str = "geo3k"
    """Dataset name: the folder under shards.output_dir."""
    source: SourceConfig = field(default_factory=SourceConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    shards: ShardConfig = field(default_factory=ShardConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> "PipelineConfig":
        _check(
            bool(self.dataset) and "/" not in self.dataset and not self.dataset.startswith("."),
            "dataset",
            "must be a plain folder name such as geo3k",
        )
        self.source.validate()
        self.model.validate()
        self.preprocess.validate()
        self.shards.validate()
        self.train.validate()
        return self

    def train_shards(self) -> Path:
        return Path(self.train.shards) if self.train.shards else self.split_dir("train")

    def eval_shards(self) -> Path:
        return Path(self.train.eval_shards) if self.train.eval_shards else self.split_dir("test")

    def split_dir(self, split: str) -> Path:
        return Path(self.shards.output_dir) / self.dataset / split


# ---------------------------------------------------------------- loading and overrides


def _coerce(tp: Any, value: Any, path: str) -> Any:
    """Turn a YAML value into the annotated type, or say what was expected."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return from_dict(tp, value, path)
    if origin is dict:
        _check(isinstance(value, dict), path, f"expected a mapping, got {value!r}")
        return dict(value)
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        _check(isinstance(value, list), path, f"expected a list, got {value!r}")
        (item,) = get_args(tp) or (Any,)
        return [_coerce(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
    args = get_args(tp)
    if args and type(None) in args:  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "")):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, path)
    if tp is bool:
        _check(isinstance(value, bool), path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), path, f"expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as text
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), path, f"expected a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), path, f"expected text, got {value!r}")
        return str(value)
    return value


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """Build dataclass `cls` from a mapping; unknown keys are errors (a typo must not pass silently)."""
    hints = get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"{where}{unknown[0]}: unknown field; known fields here: {', '.join(sorted(names))}")
    kwargs = {k: _coerce(hints[k], v, f"{path}.{k}" if path else k) for k, v in data.items()}
    return cls(**kwargs)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one `a.b.c=value` to a nested mapping, reading the value as YAML."""
    if "=" not in override:
        raise ConfigError(f"override {override!r}: write it as section.field=value, e.g. preprocess.workers=4")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {p} is not a section")
    try:
        node[parts[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = raw


def _read_yaml(p: Path) -> Any:
    """safe_load with one-line errors that say where and what to do (the CLI prints them without a traceback)."""
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.object[e.start]:#04x} at offset {e.start}): save the file as UTF-8") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read it ({e.strerror})") from None
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as e:
        mark = e.problem_mark
        at = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        raise ConfigError(f"{at}: {e.problem}; pipeline.yaml holds plain values only (no !!python tags): write the value itself") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        hint = "indent with spaces, not tabs" if "\\t" in str(e.problem) or "\t" in str(e.problem) else "fix the YAML syntax there"
        raise ConfigError(f"{at}: YAML error: {e.problem}: {hint}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: YAML error: {' '.join(str(e).split())}") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Read pipeline.yaml (or defaults when path is None), apply overrides, validate."""
    data: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} not found: pass --config PATH or run from the project folder")
        if not p.is_file():
            raise ConfigError(f"config file {p} is not a file: pass --config PATH/pipeline.yaml")
        loaded = _read_yaml(p) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections")
        data = loaded
    for o in overrides:
        apply_override(data, o)
    return from_dict(PipelineConfig, data).validate()


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
