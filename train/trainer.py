"""`geo3k train`: shards in, a trained Hugging Face checkpoint out.

    load config -> lock the run folder -> check shards and the resume point -> start processes
    -> build engine + loader -> [resume] -> loop: step, log, checkpoint every N, eval every N
    -> final checkpoint, final eval, loss curve

Only the shards are read (never the raw data or the processor's image code): rerunning training never
re-tokenizes. The tokenizer is loaded only to print generated answers at eval time.

Everything a user can get wrong is refused before a process group, model or optimizer exists: the layout, the
train and eval shard sets (present, consistent with their manifests, non-empty, every sample within the token
budget, made for this model), another run's files in train.output_dir, a second `geo3k train` on the same
folder, a damaged metrics.jsonl or changed schedule on `--resume`. A step's checkpoint is written before that
step's eval, so an eval that fails costs no training; train/checkpoints.py says why a save can never lose one.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch._dynamo.utils import counters as dynamo_counters

from shared.config import PipelineConfig
from shared.errors import UserError
from shared.manifest import ShardSet
from train.checkpoints import (
    CHECKPOINTS,
    LATEST,
    REPLACED,
    STAGING,
    RunLock,
    atomic_write_text,
    clear_run,
    fsync_dir,
    fsync_tree,
    holds_other_run,
    incomplete_reason,
    new_run_id,
    prune,
    read_state,
    resolve_latest,
    run_id_of,
    step_name,
    write_run_id,
)
from train.data import DataConfig, PackingSpec, SampleTooLongError, build_loader
from train.data.packing import steps_per_epoch
from train.data.reader import verify_shards
from train.distributed import World, barrier, destroy, init_distributed
from train.engine import Engine, build_engine
from train.flops import Peaks, StepFlops
from train.gc_policy import TrainingGC
from train.metrics import MetricsLogger, read_history
from train.models.cudnn_attention import BUILDS as cudnn_builds
from train.optim import lr_at


class TrainError(UserError, RuntimeError):
    """A problem the user can fix (bad shards for this model, nothing to resume, a NaN)."""


# ---------------------------------------------------------------- checks


def check_shards_fit_model(processor: dict[str, Any], hf_config, where: Path) -> None:
    """Refuse shards tokenized for another model: vocabulary, image token ids, patch geometry."""
    ids, spec = processor["special_ids"], processor["pixel_spec"]
    v = hf_config.vision_config
    problems = []
    if ids["image_pad"] != hf_config.image_token_id:
        problems.append(f"image token id {ids['image_pad']} (shards) vs {hf_config.image_token_id} (model)")
    if ids["vision_start"] != getattr(hf_config, "vision_start_token_id", ids["vision_start"]):
        problems.append(f"vision start id {ids['vision_start']} vs {hf_config.vision_start_token_id}")
    if processor["vocab_size"] > hf_config.text_config.vocab_size:
        problems.append(f"tokenizer vocabulary {processor['vocab_size']} > model vocabulary {hf_config.text_config.vocab_size}")
    for name in ("patch_size", "temporal_patch_size"):
        if spec[name] != getattr(v, name):
            problems.append(f"{name} {spec[name]} (shards) vs {getattr(v, name)} (model)")
    if spec["merge_size"] != v.spatial_merge_size:
        problems.append(f"merge size {spec['merge_size']} (shards) vs {v.spatial_merge_size} (model)")
    if problems:
        raise TrainError(
            f"the shards in {where} were made for another model ({processor.get('name_or_path')}): "
            + "; ".join(problems)
            + ". Preprocess again with --set model.name_or_path=<this model>, or train the model they were made for"
        )


def check_layout(tc, hf_config, world_size: int) -> None:
    """Refuse a parallel layout that cannot work, before any process group or model exists (the CLI calls this
    with --nproc before it starts the processes; each process calls it again with the real world size)."""
    tp, ep = tc.tensor_parallel, tc.expert_parallel
    text = hf_config.text_config
    problems = []
    if tc.backend == "fsdp" and (tp > 1 or ep > 1 or tc.sequence_parallel):
        problems.append(
            "train.backend=fsdp shards over data-parallel ranks only: set train.tensor_parallel=1, "
            "train.expert_parallel=1 and train.sequence_parallel=false, or use train.backend=megatron"
        )
    if world_size % (tp * ep):
        problems.append(
            f"train.tensor_parallel={tp} x train.expert_parallel={ep} needs a multiple of {tp * ep} processes, "
            f"not {world_size}: start with --nproc {tp * ep} (or a multiple), or lower them"
        )
    for name, value in (
        ("num_attention_heads", text.num_attention_heads),
        ("num_key_value_heads", text.num_key_value_heads),
        ("intermediate_size", text.intermediate_size),
        ("vocab_size", text.vocab_size),
    ):
        if value % tp:
            problems.append(f"the model's {name} ({value}) is not divisible by train.tensor_parallel={tp}: choose a divisor")
    num_experts = getattr(text, "num_experts", 0) or 0
    if ep > 1 and not num_experts:
        problems.append(f"train.expert_parallel={ep} needs a MoE model; {hf_config.model_type} has no experts: set it to 1")
    elif num_experts % ep:
        problems.append(f"the model's {num_experts} experts do not split over train.expert_parallel={ep}: choose a divisor")
    if num_experts and tp > 1:
        if text.moe_intermediate_size % tp:
            problems.append(f"the model's moe_intermediate_size ({text.moe_intermediate_size}) is not divisible by train.tensor_parallel={tp}")
        if not tc.sequence_parallel and tc.backend == "megatron":
            # Megatron-Core's MoE layer refuses to train under TP without SP (each TP rank would route and
            # compute every token of the replicated sequence)
            problems.append("a MoE model with train.tensor_parallel > 1 needs train.sequence_parallel=true")
    if problems:
        raise TrainError("; ".join(problems))


def memory_plan(cfg: PipelineConfig, hf_config, world_size: int):
    """The per-GPU memory plan of this run (train/memory_plan.py); the image-token share of the training shards
    when they exist (Geo3K-like 0.85 otherwise)."""
    from train.memory_plan import plan

    fraction = 0.85
    try:
        index = ShardSet(cfg.train_shards()).index
        tokens = sum(index.column("num_tokens").to_pylist())
        fraction = sum(index.column("num_image_tokens").to_pylist()) / max(1, tokens)
    except Exception:  # no shards yet (a plan made before preprocessing): the Geo3K-like share
        pass
    return plan(hf_config, cfg.train, world_size, image_token_fraction=fraction)


def check_memory(cfg: PipelineConfig, hf_config, world_size: int, card_bytes: float, say) -> None:
    """Print the plan; refuse a run that cannot fit the card before anything is built."""
    from train.memory_plan import advice

    p = memory_plan(cfg, hf_config, world_size)
    for line in p.lines(card_bytes):
        say(line)
    if not p.fits(card_bytes):
        raise TrainError(
            f"the plan needs {p.total / 2**30:.0f} GiB per GPU, the card has {card_bytes / 2**30:.0f} GiB: "
            f"{advice(p, cfg.train, world_size, hf_config)} (geo3k train --plan shows the plan)"
        )


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


SCHEDULE_FIELDS = ("train_iters", "epochs", "lr", "min_lr", "warmup_fraction", "weight_decay", "adam_beta1",
                   "adam_beta2", "adam_eps", "clip_grad")
"""What the learning-rate schedule and the optimizer's updates are computed from: a resumed run that changes one
changes the run mid-way, so it is refused unless asked for (--allow-schedule-change)."""


def run_steps(tc, loader_steps: int) -> int:
    """The steps a run trains: all of the loader's epochs, cut at train.train_iters."""
    return loader_steps if tc.train_iters is None else min(tc.train_iters, loader_steps)


def check_shard_sets(cfg: PipelineConfig, hf_config, data_cfg: DataConfig) -> tuple[ShardSet, Path | None]:
    """The train and (when eval is on) eval shard sets, refused now rather than at step N: missing, made for another
    model, inconsistent with their manifests, empty, a sample over the token budget; the eval set's shards are
    hashed too (the accuracy pass reads them outside the loader, and a test split is small)."""
    train_dir = cfg.train_shards()
    train_set = ShardSet(train_dir)
    check_shards_fit_model(train_set.processor, hf_config, train_dir)
    try:
        build_loader(train_dir, data_cfg)  # what the real loader checks when it is built; only the index is read
    except SampleTooLongError as e:
        raise TrainError(f"training shards {train_dir}: {e}") from None
    if not cfg.train.eval_interval:
        return train_set, None
    eval_dir = cfg.eval_shards()
    if not eval_dir.exists():
        raise TrainError(
            f"the eval shards {eval_dir} do not exist: preprocess the test split, point train.eval_shards at a split "
            "folder, or set train.eval_interval=0 to train without eval"
        )
    eval_set = ShardSet(eval_dir)
    check_shards_fit_model(eval_set.processor, hf_config, eval_dir)
    if not eval_set.num_samples:
        raise TrainError(f"the eval shards {eval_dir} hold no samples: preprocess the test split again, or set train.eval_interval=0")
    from dataclasses import replace

    try:
        build_loader(eval_dir, replace(data_cfg, global_batch_size=eval_set.num_samples, drop_last=False, num_epochs=1, num_workers=0))
    except SampleTooLongError as e:
        raise TrainError(f"eval shards {eval_dir}: {e}") from None
    verify_shards(eval_set)
    return train_set, eval_dir


def check_resume(ckpt: Path, cfg: PipelineConfig, fingerprint: str, *, allow_schedule_change: bool, say) -> dict[str, Any]:
    """Refuse a resume that cannot continue this run as it was; returns the checkpoint's trainer state."""
    import yaml

    state = read_state(ckpt)
    if state.get("backend", "megatron") != cfg.train.backend:
        raise TrainError(f"{ckpt} was saved by the {state['backend']} backend: resume with --backend {state['backend']}")
    if state["fingerprint"] != fingerprint:
        raise TrainError(
            f"{ckpt} was trained on shards with fingerprint {state['fingerprint'][:12]}…, these are "
            f"{fingerprint[:12]}…: resume on the same shards or start a new run (another train.output_dir)"
        )
    saved_path = ckpt / "config.yaml"
    saved = (yaml.safe_load(saved_path.read_text()) or {}).get("train", {}) if saved_path.exists() else {}
    now = asdict(cfg.train)
    changed = [f"train.{k} {saved[k]!r} -> {now[k]!r}" for k in SCHEDULE_FIELDS if k in saved and saved[k] != now[k]]
    if changed and not allow_schedule_change:
        raise TrainError(
            f"--resume: {ckpt} was trained with other schedule settings ({'; '.join(changed)}), which would change the "
            "learning-rate schedule mid-run: resume with the checkpoint's values, or pass --allow-schedule-change to "
            "continue with the new ones"
        )
    if changed:
        say(f"note: --allow-schedule-change: continuing with {'; '.join(changed)}")
    return state


def latest_checkpoint(out_dir: Path, warn=None) -> Path | None:
    """The checkpoint to continue from: what `latest` names, or the newest complete one when that is damaged
    (`warn` gets the sentence saying so)."""
    ckpt, warning = resolve_latest(Path(out_dir))
    if warning and warn:
        warn(warning)
    return ckpt


# ---------------------------------------------------------------- the loop


class Trainer:
    def __init__(self, cfg: PipelineConfig, *, resume: bool = False, overwrite: bool = False, allow_schedule_change: bool = False):
        from train.models.source import resolve_source

        self.cfg = cfg
        tc = cfg.train
        self.out_dir = Path(tc.output_dir)
        self.is_rank0 = int(os.environ.get("RANK", 0)) == 0
        # pretrained weights bring their own config.json, which the model is built from (train/models/source.py)
        self.source = resolve_source(cfg.model.name_or_path, pretrained=not tc.random_init)
        self.hf_config = self.source.hf_config
        if self.source.differences:
            diffs = self.source.differences
            self.say(f"model config from {self.source.weights}/config.json; it differs from the preset {self.source.preset} in "
                     f"{len(diffs)} setting(s), the checkpoint's values are used (preset -> checkpoint):\n  " + "\n  ".join(diffs))
        check_layout(tc, self.hf_config, int(os.environ.get("WORLD_SIZE", 1)))
        # one process per folder: the lock is held until this process ends (or close())
        self.lock = RunLock(self.out_dir) if self.is_rank0 else None
        try:
            self._build(resume=resume, overwrite=overwrite, allow_schedule_change=allow_schedule_change)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _build(self, *, resume: bool, overwrite: bool, allow_schedule_change: bool) -> None:
        cfg, tc = self.cfg, self.cfg.train
        self.data_cfg = DataConfig.from_train_config(tc)
        self.train_dir = cfg.train_shards()
        shard_set, self.eval_dir = check_shard_sets(cfg, self.hf_config, self.data_cfg)
        self.fingerprint = shard_set.fingerprint
        resume_from: Path | None = None
        self.finished: tuple[Path, int] | None = None
        self.evals_done: set[int] = set()  # steps whose eval is in metrics.jsonl: each runs once
        if resume:
            resume_from = latest_checkpoint(self.out_dir, warn=lambda w: self.say(f"warning: {w}"))
            if resume_from is None:
                raise TrainError(f"--resume: no complete checkpoint under {self.out_dir / CHECKPOINTS}; start without --resume")
            state = check_resume(resume_from, cfg, self.fingerprint, allow_schedule_change=allow_schedule_change, say=self.say)
            history = read_history(self.out_dir / "metrics.jsonl")  # a damaged file is refused before the model is built
            self.evals_done = {r["step"] for r in history if r["kind"] == "eval" and r["step"] <= int(state["step"])}
            self.run_id = state.get("run_id") or run_id_of(self.out_dir) or new_run_id()
            total = run_steps(tc, steps_per_epoch(shard_set.num_samples, self.data_cfg) * tc.epochs)
            step = int(state["step"])
            if step >= total and (self.eval_dir is None or step in self.evals_done):
                # a finished run: its last checkpoint and eval exist, so nothing is built (or rewritten)
                self.finished = (resume_from, step)
                return
        else:
            other = holds_other_run(self.out_dir)
            if other and not overwrite:
                raise TrainError(
                    f"{self.out_dir} holds another run's checkpoints ({', '.join(other[:3])}{', …' if len(other) > 3 else ''}): continue it "
                    "with --resume, start over with --overwrite (deletes its checkpoints and metrics), or set another train.output_dir"
                )
            if self.is_rank0 and (other or (self.out_dir / "metrics.jsonl").exists()):
                if other:
                    self.say(f"--overwrite: deleting the earlier run in {self.out_dir} ({len(other)} checkpoints, its metrics)")
                clear_run(self.out_dir)  # else only the metrics and events of a run stopped before its first checkpoint
            self.run_id = new_run_id()

        self.world: World = init_distributed(tc.tensor_parallel, 1, tc.expert_parallel, megatron=tc.backend == "megatron")
        if self.world.device.type == "cuda":
            card = torch.cuda.get_device_properties(self.world.device).total_memory
            check_memory(cfg, self.hf_config, self.world.world_size, card, self.say)
        if self.world.is_main:
            root = self.out_dir / CHECKPOINTS
            for leftover in root.glob(f"{STAGING}*"):  # a save that was killed: never complete
                shutil.rmtree(leftover, ignore_errors=True)
            for aside in root.glob(f"{REPLACED}*"):  # replaced copies whose replacement is in place
                if incomplete_reason(root / aside.name[len(REPLACED):]) is None:
                    shutil.rmtree(aside, ignore_errors=True)

        random.seed(tc.seed)
        np.random.seed(tc.seed)
        torch.manual_seed(tc.seed)
        self.engine: Engine = build_engine(self.hf_config, tc, self.world,
                                           init_from=self.source if self.source.weights is not None else None)
        self.pixel_dtype = torch.bfloat16 if (tc.bf16 and self.engine.cuda) else torch.float32
        self.loader = build_loader(self.train_dir, self.data_cfg, self.world.dp_rank, self.world.dp)
        self.total_steps = run_steps(tc, self.loader.total_steps)
        self.step = 0
        self.last_checkpoint: Path | None = None
        self.loaded_step: int | None = None
        if resume_from is not None:
            self._load(resume_from)
        # the Megatron engine runs the LM head on every token under sequence parallelism, else at the loss positions
        self.flops = StepFlops.from_hf_config(self.hf_config, head_on_every_token=tc.backend == "megatron" and tc.sequence_parallel)
        self.peaks = Peaks.of(self.world.device)
        self.logger = MetricsLogger(
            self.out_dir, self.world.is_main, wandb_project=tc.wandb_project, config=asdict(cfg),
            resume_step=self.step if resume_from is not None else None,
        )
        if self.world.is_main:
            (self.out_dir).mkdir(parents=True, exist_ok=True)
            import yaml

            (self.out_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
            write_run_id(self.out_dir, self.run_id)

    def say(self, msg: str) -> None:
        if self.is_rank0:  # (also before the process group exists)
            print(msg, flush=True)

    # -- checkpoints
    def save(self) -> Path:
        """Write this step's checkpoint into a staging folder, then rename it into place and point `latest` at it;
        only then are this run's older checkpoints pruned (train/checkpoints.py)."""
        root = self.out_dir / CHECKPOINTS
        name = step_name(self.step)
        final = root / name
        self.save_skipped = self.loaded_step == self.step and incomplete_reason(final) is None
        if self.save_skipped:
            # a resumed run that trained nothing since (it had finished): rewriting would only risk the copy
            self.say(f"{final} is up to date (nothing was trained after it): kept as it is")
            self.last_checkpoint = final
            return final
        staging = root / f"{STAGING}{name}"
        if self.world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        from torch.distributed.checkpoint.api import CheckpointException

        error: BaseException | None = None
        try:
            self.engine.save(staging)
            torch.save(_rng_state(), staging / f"rng_rank{self.world.rank:03d}.pt")
        except (OSError, RuntimeError, CheckpointException) as e:
            # a full disk: torch's writer raises RuntimeError, Python OSError, the FSDP engine's DCP gathers every
            # rank's failure into a CheckpointException (raised on all ranks; its text is tracebacks: keep the cause)
            error = next(iter(e.failures.values()))[0] if isinstance(e, CheckpointException) and e.failures else e
        self._stop_if_any_failed(error, staging)
        if self.world.is_main:
            try:
                self._seal(staging, final)
            except OSError as e:
                error = e
        self._stop_if_any_failed(error, staging)
        if self.world.is_main:
            prune(root, self.cfg.train.keep_checkpoints, self.run_id, protect=final)
            self.logger.flush()
        barrier()
        self.last_checkpoint = final
        return final

    def _seal(self, staging: Path, final: Path) -> None:
        """Rank 0, every rank's files written: the state that makes the folder complete, then the renames."""
        import yaml

        (staging / "hf_config.json").write_text(self.hf_config.to_json_string())
        (staging / "config.yaml").write_text(yaml.safe_dump(asdict(self.cfg), sort_keys=False))
        state = {
            "step": self.step,
            "total_steps": self.total_steps,
            "data": self.loader.state_dict(),
            "fingerprint": self.fingerprint,
            "tensor_parallel": self.world.tp,
            "expert_parallel": self.world.ep,
            "data_parallel": self.world.dp,
            "backend": self.engine.name,
            "run_id": self.run_id,
            # what resolve_latest checks: a folder whose files are all there with these sizes is complete
            "files": fsync_tree(staging),
        }
        atomic_write_text(staging / "trainer_state.json", json.dumps(state, indent=2))
        root = final.parent
        aside = root / f"{REPLACED}{final.name}"
        if final.exists():  # the same step saved before (a resumed run going over it again): keep it until replaced
            shutil.rmtree(aside, ignore_errors=True)
            os.rename(final, aside)
        os.rename(staging, final)
        fsync_dir(root)
        atomic_write_text(root / LATEST, final.name)
        shutil.rmtree(aside, ignore_errors=True)

    def _stop_if_any_failed(self, error: BaseException | None, staging: Path) -> None:
        """Every rank learns whether any rank failed to write (else the others would wait in a collective forever);
        the half-written folder goes, the earlier checkpoints stay."""
        failed = torch.tensor([0.0 if error is None else 1.0], device=self.world.device)
        if dist.is_initialized() and self.world.world_size > 1:
            dist.all_reduce(failed, op=dist.ReduceOp.MAX)
        if not failed.item():
            return
        if self.world.is_main:
            shutil.rmtree(staging, ignore_errors=True)
        reason = " ".join(str(error).split()) if error is not None else "another rank could not write its part"
        where = (
            f"the last complete checkpoint is {self.last_checkpoint} (--resume continues from it)"
            if self.last_checkpoint else "no checkpoint was saved before this one"
        )
        raise TrainError(
            f"could not save the checkpoint of step {self.step} under {staging.parent}: {reason}. Free disk space there "
            f"(or lower train.keep_checkpoints, or set another train.output_dir); {where}"
        )

    def _load(self, ckpt: Path) -> None:
        state = read_state(ckpt)
        saved = self.engine.load(ckpt)
        if saved is not None and saved != (self.world.tp, self.world.ep):
            self.say(
                f"{ckpt} was saved with tensor_parallel={saved[0]}, expert_parallel={saved[1]}: its model and "
                f"optimizer state are re-split for tensor_parallel={self.world.tp}, expert_parallel={self.world.ep}"
            )
        self.loader.load_state_dict(state["data"])
        rng = ckpt / f"rng_rank{self.world.rank:03d}.pt"
        if rng.exists():
            _set_rng_state(torch.load(rng, weights_only=False))
        self.step = int(state["step"])
        self.loaded_step = self.step
        self.last_checkpoint = ckpt
        self.say(f"resumed from {ckpt} at step {self.step}")

    # -- eval
    def evaluate(self) -> dict[str, Any] | None:
        if self.eval_dir is None:
            return None
        t0 = time.perf_counter()
        with self.engine.evaluating():
            res = self._evaluate()
        res["seconds"] = time.perf_counter() - t0
        self.logger.log("eval", self.step, {k: v for k, v in res.items() if isinstance(v, (int, float))})
        self.evals_done.add(self.step)
        acc_txt = f", accuracy {100 * res['accuracy']:.1f}% of {res['answered']}" if "accuracy" in res else ""
        gain_txt = f", image gain {res['image_gain']:+.4f}" if "image_gain" in res else ""
        self.say(f"eval @ step {self.step}: loss {res['loss']:.4f}{gain_txt}{acc_txt} ({res['seconds']:.1f}s)")
        if "image_gain" in res and res["image_gain"] <= 0 and not self.cfg.train.random_init:
            # pretrained weights read the diagrams: a blanked image must cost loss
            self.say("warning: eval loss does not rise when the images are blanked (image gain <= 0): the model "
                     "may not be seeing the images (check the shards with geo3k inspect and the image token ids)")
        return res

    def _evaluate(self) -> dict[str, Any]:
        from train.evaluate import eval_accuracy, eval_loss, shard_tokenizer

        tc = self.cfg.train
        res: dict[str, Any] = eval_loss(self.engine, self.eval_dir, self.data_cfg, self.world, self.pixel_dtype,
                                        image_gain=tc.eval_image_gain)
        if tc.eval_samples:
            ss = ShardSet(self.eval_dir)
            tokenizer = None
            try:
                tokenizer = shard_tokenizer(ss)
            except Exception as e:  # decoding is for reading answers; without it accuracy cannot be scored
                self.say(f"note: no tokenizer for eval answers ({e}); accuracy skipped")
            if tokenizer is not None:
                spec = PackingSpec.from_processor_identity(ss.processor, self.data_cfg.pad_to_multiple_of)
                acc = eval_accuracy(
                    self.engine, self.eval_dir, spec, self.world,
                    num_samples=None if tc.eval_samples == "all" else tc.eval_samples, max_new_tokens=tc.eval_max_new_tokens,
                    budget=tc.max_tokens_per_gpu, tokenizer=tokenizer,
                    stop_id=ss.processor["special_ids"]["im_end"], pixel_dtype=self.pixel_dtype,
                    kv_cache_positions=tc.eval_kv_cache_positions,
                )
                res.update(accuracy=acc["accuracy"], answered=acc["answered"])
                if self.world.is_main and acc["examples"]:
                    ex = acc["examples"][0]
                    self.say(f"  e.g. {ex['key']}: answer {ex['answer']!r}, generated {ex['generated']!r}")
        return res

    # -- train
    def train(self) -> dict[str, Any]:
        tc = self.cfg.train
        if self.finished:
            ckpt, step = self.finished
            self.say(f"the run finished at step {step} ({ckpt}, eval logged): nothing to do; `geo3k export {self.out_dir}` exports it")
            return {"steps": step, "last": {}, "eval": None, "checkpoint": str(ckpt), "data_wait_fraction": 0.0}
        w = self.world
        dev = w.device
        self.say(
            f"training {self.cfg.model.name_or_path} ({'random init' if tc.random_init else 'pretrained'}) on "
            f"{self.train_dir}: {self.loader.steps_per_epoch} steps/epoch x {tc.epochs} epochs, {self.total_steps} steps; "
            f"world {w.world_size} (tp {w.tp}, dp {w.dp}) on {dev.type}"
            + f"; {self.peaks.describe()}"
        )
        t_start, start_step = time.perf_counter(), self.step
        last: dict[str, Any] = {}
        data_wait_total, step_time_total = 0.0, 0.0
        if self.loaded_step and self._eval_due(self.step) and self.step not in self.evals_done and self.step < self.total_steps:
            self.evaluate()  # the run stopped after saving this step, before its eval was logged
        it = iter(self.loader)
        with TrainingGC(tc.gc_interval) as collector:
            while self.step < self.total_steps:
                t0 = time.perf_counter()
                try:
                    gstep = next(it)
                except StopIteration:
                    break
                mbs = [mb.to(dev, non_blocking=True, pixel_dtype=self.pixel_dtype) for mb in gstep.micro_batches]
                t_data = time.perf_counter() - t0
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                lr = lr_at(self.step, self.total_steps, tc)
                graphs, attention_graphs = dynamo_counters["stats"]["unique_graphs"], cudnn_builds["count"]
                out = self.engine.train_step(mbs, gstep.num_loss_tokens, lr)
                # graphs torch.compile built in this step (compiled layers): step 1 compiles, later steps should not;
                # likewise cuDNN's attention graphs (train.attention_backend=cudnn_frontend), one per bucketed shape
                new_graphs = dynamo_counters["stats"]["unique_graphs"] - graphs
                new_attention_graphs = cudnn_builds["count"] - attention_graphs
                flops = self.flops.step(gstep.micro_batches)
                stats = torch.tensor([float(out["loss_sum"]), flops], dtype=torch.float64)
                if dist.is_initialized() and w.world_size > 1:
                    stats = stats.to(dev)
                    dist.all_reduce(stats, group=w.dp_group)
                loss = float(stats[0]) / max(1, gstep.num_loss_tokens)
                self.step += 1
                dt = time.perf_counter() - t0
                data_wait_total += t_data
                step_time_total += dt
                if not math.isfinite(loss) or not out["ok"]:
                    where = f"the last good checkpoint is {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was saved yet"
                    raise TrainError(
                        f"loss is {loss} (grad norm {out['grad_norm']}) at step {self.step}: stopping; {where}. "
                        "Lower train.lr or check the data with `geo3k inspect --verify`"
                    )
                tflops = float(stats[1]) / dt / 1e12 / w.tp  # each TP group computes one DP share
                last = {
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": float(out["grad_norm"]),
                    "tokens_per_s": gstep.num_tokens / dt,
                    "samples_per_s": gstep.num_samples / dt,
                    "step_s": dt,
                    "data_wait_s": t_data,
                    "model_tflops_per_gpu": tflops / w.dp,
                    **self.peaks.mfu(tflops / w.dp),  # mfu (datasheet peak) and mfu_measured_peak
                    "peak_mem_gib": torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None,
                    "epoch": gstep.epoch,
                    "new_graphs": new_graphs or None,
                    "new_attention_graphs": new_attention_graphs or None,
                    **{k: v for k, v in out.items() if k.startswith("moe_")},
                }
                self.logger.log("train", self.step, {k: v for k, v in last.items() if v is not None})
                if tc.log_interval and (self.step % tc.log_interval == 0 or self.step == self.total_steps):
                    eta = (time.perf_counter() - t_start) / (self.step - start_step) * (self.total_steps - self.step)
                    self.say(MetricsLogger.line(self.step, self.total_steps, last, eta))
                # the checkpoint first: an eval that fails must not cost the steps since the last one
                if tc.save_interval and self.step % tc.save_interval == 0 and self.step < self.total_steps:
                    self.say(f"saved {self.save()}")
                if self._eval_due(self.step) and self.step < self.total_steps:
                    self.evaluate()
                collector.step_done(self.step)  # between steps, where a collection stalls nothing
        if tc.save_last:
            ckpt = self.save()
            if not self.save_skipped:
                self.say(f"saved {ckpt}")
        else:
            ckpt = self.last_checkpoint
        ev = self.evaluate() if self.step not in self.evals_done else None
        plot = self.logger.plot_loss()
        if plot:
            self.say(f"loss curve: {plot}")
        self.logger.close()
        return {
            "steps": self.step,
            "last": last,
            "eval": ev,
            "checkpoint": str(ckpt),
            "data_wait_fraction": data_wait_total / step_time_total if step_time_total else 0.0,
        }


    def _eval_due(self, step: int) -> bool:
        every = self.cfg.train.eval_interval
        return bool(self.eval_dir is not None and every and step > 0 and (step % every == 0 or step == self.total_steps))


def run_training(cfg: PipelineConfig, *, resume: bool = False, overwrite: bool = False, allow_schedule_change: bool = False) -> dict[str, Any]:
    try:
        trainer = Trainer(cfg, resume=resume, overwrite=overwrite, allow_schedule_change=allow_schedule_change)
        try:
            return trainer.train()
        finally:
            trainer.close()
    finally:
        destroy()


# ---------------------------------------------------------------- export


EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def export_checkpoint(ckpt: Path, out: Path, *, dtype: str = "bfloat16", warn=None) -> Path:
    """A geo3k checkpoint (or a run folder: its latest) -> a transformers model folder with the processor."""
    import yaml
    from transformers import AutoConfig

    from shared.config import from_dict
    from shared.presets import load_processor
    from train.models.convert import export_hf

    torch_dtype = EXPORT_DTYPES.get(dtype)
    if torch_dtype is None:  # before anything is loaded
        raise TrainError(f"--dtype {dtype}: choose one of {', '.join(EXPORT_DTYPES)}")
    ckpt = Path(ckpt)
    if (ckpt / "trainer_state.json").exists() or ckpt.name.startswith("step-"):
        why = incomplete_reason(ckpt)
        if why is not None:
            raise TrainError(f"the checkpoint {ckpt} is {why}: export another one (a run folder exports its newest complete checkpoint)")
    else:
        found = latest_checkpoint(ckpt, warn=warn)
        if found is None:
            raise TrainError(f"{ckpt} is neither a checkpoint (step-*/ with trainer_state.json) nor a run folder with a complete one")
        ckpt = found
    hf_dict = json.loads((ckpt / "hf_config.json").read_text())
    hf_config = AutoConfig.for_model(**hf_dict)
    if json.loads((ckpt / "trainer_state.json").read_text()).get("backend", "megatron") == "fsdp":
        from train.engine_fsdp import full_model_state
        from train.models.convert import hf_to_megatron

        state = hf_to_megatron(full_model_state(ckpt), hf_config)  # export_hf's input; a lossless renaming
    else:
        from train.engine_megatron import merged_model_state

        state = merged_model_state(ckpt, hf_config)
    export_hf(state, hf_config, out, dtype=torch_dtype)
    cfg = from_dict(PipelineConfig, yaml.safe_load((ckpt / "config.yaml").read_text()))
    hf_config.dtype = dtype
    (Path(out) / "config.json").write_text(hf_config.to_json_string())
    proc = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    proc.processor.save_pretrained(str(out))
    return Path(out)


def launch_with_torchrun(nproc: int, argv: list[str]) -> None:
    """Re-run this command under torchrun with nproc processes on this node (one per GPU)."""
    import sys

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", "geo3k", *argv]
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.execv(sys.executable, cmd)
