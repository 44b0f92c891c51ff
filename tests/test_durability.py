"""Training never loses a checkpoint, never trains on a damaged shard, and says what went wrong in one line.

Each test reproduces a failure of issue 18 and asserts the fixed behaviour. One tiny 4-step run (module
fixture) is the reference; the runs that must train go through the real CLI in subprocesses, the cases refused
before any model exists call the CLI in this process (`cli`), which keeps the file fast.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, geo3k, make_config, train_losses

STEPS = 4


def train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    """4 steps of tiny-qwen3-vl, checkpoints and eval (loss only) every 2 steps."""
    return [
        "train",
        "-c", str(REPO / "examples" / "tiny-cpu.yaml"),
        "--set", f"train.shards={shards / 'train'}",
        "--set", f"train.eval_shards={shards / 'test'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.global_batch_size=4",
        "--set", f"train.train_iters={STEPS}",
        "--set", "train.save_interval=2",
        "--set", "train.eval_interval=2",
        "--set", "train.eval_samples=0",
        *extra,
    ]


def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """The `geo3k` entry point in this process: (exit code, stdout, stderr). For cases refused before training."""
    from geo3k import cli as geo3k_cli

    out, err = io.StringIO(), io.StringIO()
    old_argv, old_env = sys.argv, dict(os.environ)
    sys.argv = ["geo3k", *args]
    os.environ.update(env or {})
    code = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            geo3k_cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        sys.argv = old_argv
        os.environ.clear()
        os.environ.update(old_env)
    return code, out.getvalue(), err.getvalue()


def run_cli(*args: str, cwd: Path, preexec=None) -> subprocess.CompletedProcess:
    """The real CLI in a subprocess, whatever its exit code."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    return subprocess.run([sys.executable, "-m", "geo3k", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600, preexec_fn=preexec)


def one_error_line(code: int, err: str, *needles: str) -> str:
    """Exit code 2, exactly one `error:` line and no traceback; the line contains every needle."""
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, f"exit {code}:\n{err[-3000:]}"
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def member_span(tar_path: Path, suffix: str, nth: int = 0) -> tuple[int, int, str]:
    """(data offset, size, key) of the nth member whose name ends with suffix."""
    with tarfile.open(tar_path) as tf:
        infos = [i for i in tf if i.name.endswith(suffix)]
    info = infos[nth]
    return info.offset_data, info.size, info.name.split(".", 1)[0]


def npy_data(tar_path: Path, offset: int) -> tuple[int, np.dtype]:
    """(file offset of the first element, dtype) of the .npy member whose data starts at offset."""
    with open(tar_path, "rb") as f:
        f.seek(offset)
        np.lib.format.read_magic(f)
        _, _, dtype = np.lib.format.read_array_header_1_0(f)
        return f.tell(), dtype


def patch_bytes(path: Path, offset: int, new: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(new)


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ 0x01]))


def copy_split(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.fixture(scope="module")
def base_run(demo_shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("durability") / "run"
    proc = geo3k(*train_args(demo_shards, out), cwd=out.parent)
    (out.parent / "stdout.txt").write_text(proc.stdout)
    return out


def test_a_steps_checkpoint_is_saved_before_its_eval(base_run):
    lines = (base_run.parent / "stdout.txt").read_text().splitlines()
    for step in (2, 4):
        saved = lines.index(f"saved {base_run / 'checkpoints' / f'step-{step:07d}'}")
        assert lines[saved + 1].startswith(f"eval @ step {step}:"), lines


# ---------------------------------------------------------------- checkpoints are never lost


def test_a_new_run_in_an_old_runs_folder_is_refused_and_the_old_run_kept(base_run, demo_shards, tmp_path):
    run = shutil.copytree(base_run, tmp_path / "run")
    before = {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()}
    metrics = (run / "metrics.jsonl").read_bytes()
    code, _, err = cli(*train_args(demo_shards, run))
    one_error_line(code, err, "holds another run's checkpoints", "--resume", "--overwrite")
    assert {p.name: p.stat().st_mtime_ns for p in (run / "checkpoints").iterdir()} == before
    assert (run / "metrics.jsonl").read_bytes() == metrics
    code, _, err = cli(*train_args(demo_shards, run), "--resume", "--overwrite")
    one_error_line(code, err, "--resume", "--overwrite")


def test_retention_deletes_only_this_runs_older_checkpoints(tmp_path):
    from train.checkpoints import prune

    root = tmp_path / "checkpoints"
    for step, run_id in [(9, "old"), (12, "old"), (2, "new"), (4, "new"), (6, "new")]:
        d = root / f"step-{step:07d}"
        d.mkdir(parents=True)
        (d / "trainer_state.json").write_text(json.dumps({"step": step, "run_id": run_id}))
    prune(root, keep=2, run_id="new", protect=root / "step-0000006")
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004", "step-0000006", "step-0000009", "step-0000012"]


def test_resume_falls_back_to_the_newest_complete_checkpoint_and_says_so(base_run, tmp_path):
    from train.checkpoints import resolve_latest

    run = shutil.copytree(base_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    assert resolve_latest(run) == (ckpts / "step-0000004", None)
    # a re-save killed between moving the old copy aside and renaming the new one in: the old copy is used
    os.rename(ckpts / "step-0000004", ckpts / ".old-step-0000004")
    found, warning = resolve_latest(run)
    assert found == ckpts / ".old-step-0000004" and "being replaced" in warning
    os.rename(ckpts / ".old-step-0000004", ckpts / "step-0000004")
    # latest names a gutted folder (a file cut short): the older complete checkpoint, with a warning naming both
    model = ckpts / "step-0000004" / "model_tp00.pt"
    os.truncate(model, model.stat().st_size // 2)
    found, warning = resolve_latest(run)
    assert found == ckpts / "step-0000002"
    assert "step-0000004" in warning and "damaged" in warning and "model_tp00.pt" in warning
    # export: the damaged checkpoint itself is refused, the run folder exports the complete one and says so
    code, _, err = cli("export", str(ckpts / "step-0000004"), "--out", str(tmp_path / "hf"))
    one_error_line(code, err, "step-0000004 is damaged", "model_tp00.pt")
    code, out, err = cli("export", str(run), "--out", str(tmp_path / "hf"), "--dtype", "float32")
    assert code == 0 and f"warning: {warning}" in err and (tmp_path / "hf" / "model.safetensors").exists(), err
    (ckpts / "step-0000002" / "trainer_state.json").unlink()
    assert resolve_latest(run) == (None, None)


def _kill_during_save(args: list[str], staging: Path, cwd: Path) -> None:
    """Start a training run and kill -9 it while it writes the checkpoint folder `staging`."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "2"}
    proc = subprocess.Popen([sys.executable, "-m", "geo3k", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        # the model file is written first, the optimizer state (twice its size) after it: kill in between
        while not (staging / "model_tp00.pt").exists():
            assert proc.poll() is None, "the run ended before it saved"
            assert time.monotonic() < deadline
            time.sleep(0.001)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()


def test_overwrite_then_kill_during_a_save_then_resume_logs_each_step_once_with_the_same_losses(base_run, demo_shards, tmp_path):
    from train.checkpoints import incomplete_reason

    # a new run started over (--overwrite) in the folder of the reference run, killed while saving step 3
    run = shutil.copytree(base_run, tmp_path / "run")
    ckpts = run / "checkpoints"
    args = train_args(demo_shards, run, "--set", "train.save_interval=1")
    _kill_during_save([*args, "--overwrite"], ckpts / ".tmp-step-0000003", tmp_path)
    assert (ckpts / "latest").read_text() == "step-0000002"
    assert incomplete_reason(ckpts / "step-0000002") is None and not (ckpts / "step-0000003").exists()
    assert not (ckpts / "step-0000004").exists()  # the earlier run's checkpoints went with --overwrite
    assert json.loads((run / "run.json").read_text()) != json.loads((base_run / "run.json").read_text())

    proc = geo3k(*args, "--resume", cwd=tmp_path)
    assert f"resumed from {ckpts / 'step-0000002'} at step 2" in proc.stdout
    assert not list(ckpts.glob(".tmp-*"))  # the killed save's leftovers are gone
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2, 4]
    ref, got = train_losses(base_run), train_losses(run)
    assert all(abs(ref[s] - got[s]) <= 1e-6 for s in range(1, STEPS + 1)), (ref, got)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()  # TensorBoard's own reader, over the killed run's event file and the resumed run's
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in events.Scalars("eval/loss")] == [2, 4]

    # resuming the finished run rewrites nothing (the re-save that a kill could destroy is gone) and logs nothing
    final = ckpts / "step-0000004"
    stamp = (final.stat().st_ino, (final / "model_tp00.pt").stat().st_mtime_ns)
    code, out, err = cli(*args, "--resume")
    assert code == 0 and "the run finished at step 4" in out and "nothing to do" in out, err
    assert (final.stat().st_ino, (final / "model_tp00.pt").stat().st_mtime_ns) == stamp
    assert [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] == records


def test_a_full_disk_during_a_save_is_one_line_and_leaves_no_partial_checkpoint(demo_shards, tmp_path):
    # RLIMIT_FSIZE makes writes past 20 MB fail as a full disk does (EFBIG instead of ENOSPC; Python ignores
    # SIGXFSZ): the shards, metrics and events are smaller, the 40 MB model file is not
    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (20 << 20, 20 << 20))

    run = tmp_path / "run"
    proc = run_cli(*train_args(demo_shards, run, "--set", "train.save_interval=1"), cwd=tmp_path, preexec=small_disk)
    one_error_line(proc.returncode, proc.stderr, "could not save the checkpoint of step 1", "Free disk space",
                   "no checkpoint was saved before")
    assert not list((run / "checkpoints").iterdir()) and not (run / "checkpoints" / "latest").exists()


def test_two_runs_on_one_folder_are_refused(demo_shards, tmp_path):
    from train.checkpoints import RunLock

    lock = RunLock(tmp_path / "run")  # what a running `geo3k train` holds
    try:
        code, _, err = cli(*train_args(demo_shards, tmp_path / "run"))
        one_error_line(code, err, "another `geo3k train`", f"pid {os.getpid()}")
    finally:
        lock.release()
    RunLock(tmp_path / "run").release()  # free again once the holder is gone


# ---------------------------------------------------------------- shard sets checked before step 1


@pytest.fixture(scope="module")
def odd_eval_splits(demo_data, tmp_path_factory) -> dict[str, Path]:
    """Eval splits a user can end up with: every row rejected (empty), and samples longer than the train ones
    (diagrams upscaled to >= 0.8 MP: ~800 tokens)."""
    from preprocess.pipeline import run_preprocess

    out = {}
    for name, extra in [("empty", {"preprocess.max_tokens": "64"}), ("long", {"model.min_pixels": "800000"})]:
        root = tmp_path_factory.mktemp(f"eval-{name}")
        run_preprocess(make_config(root, {"test": str(demo_data / "test.parquet")}, **{"source.max_rows": "4", **extra}), progress=False)
        out[name] = root / "geo3k" / "test"
    return out


@pytest.mark.parametrize("case", ["empty", "long", "missing"])
def test_a_broken_eval_split_is_refused_before_step_1(case, odd_eval_splits, demo_shards, tmp_path):
    eval_dir = odd_eval_splits.get(case, tmp_path / "no-such-split")
    run = tmp_path / "run"
    code, out, err = cli(*train_args(demo_shards, run, "--set", f"train.eval_shards={eval_dir}",
                                     "--set", "train.max_tokens_per_gpu=512"))
    needle = {"empty": "hold no samples", "long": "exceed max_tokens_per_gpu=512", "missing": "do not exist"}[case]
    one_error_line(code, err, str(eval_dir), needle, *(["train.eval_interval=0"] if case == "missing" else []))
    assert "step 1" not in out and not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()


def test_without_eval_no_eval_split_is_needed(demo_shards, tmp_path):
    from shared.config import load_config
    from train.data import DataConfig
    from train.models import load_hf_config
    from train.trainer import check_shard_sets

    cfg = load_config(REPO / "examples" / "tiny-cpu.yaml", [f"train.shards={demo_shards / 'train'}",
                                                            f"train.eval_shards={tmp_path / 'none'}", "train.eval_interval=0"])
    train_set, eval_dir = check_shard_sets(cfg, load_hf_config("tiny-qwen3-vl"), DataConfig(global_batch_size=4, num_workers=0))
    assert eval_dir is None and train_set.num_samples == 48


# ---------------------------------------------------------------- shard integrity in training


MEMBERS = ["input_ids.npy", "loss_mask.npy", "image_grid_thw.npy", "patches.npy.zst", "meta.json"]


def _epoch(split: Path, num_workers: int = 0) -> int:
    from train.data import DataConfig, build_loader

    cfg = DataConfig(max_tokens_per_gpu=4096, global_batch_size=8, num_epochs=1, num_workers=num_workers)
    return sum(len(step.keys) for step in build_loader(split, cfg))


@pytest.mark.parametrize("member", MEMBERS)
def test_a_flipped_byte_in_any_member_stops_the_loader_naming_the_shard(member, demo_shards, tmp_path):
    from train.data.reader import ShardError

    split = copy_split(demo_shards / "train", tmp_path / "train")
    shard = split / "shard-000003.tar"
    offset, size, _ = member_span(shard, member, nth=2)
    flip_byte(shard, offset + size - 1)  # the member's last data byte: inside the value itself
    workers = 1 if member == "meta.json" else 0  # a worker process hands the same one-line error back
    with pytest.raises(ShardError, match=r"shard-000003\.tar is corrupt.*geo3k preprocess --force") as e:
        _epoch(split, workers)
    assert "\n" not in str(e.value)


def test_a_shard_cut_or_deleted_after_start_stops_the_loader_naming_it(demo_shards, tmp_path):
    from train.data import DataConfig, build_loader
    from train.data.reader import ShardError

    split = copy_split(demo_shards / "train", tmp_path / "train")
    cfg = DataConfig(max_tokens_per_gpu=4096, global_batch_size=8, num_epochs=1, num_workers=0)
    cut, deleted = build_loader(split, cfg), build_loader(split, cfg)  # both pass the start-up stat
    os.truncate(split / "shard-000001.tar", 30_000)
    with pytest.raises(ShardError, match=r"shard-000001\.tar has 30,000 bytes, the manifest says"):
        list(cut)
    (split / "shard-000001.tar").unlink()
    with pytest.raises(ShardError, match=r"shard-000001\.tar is missing"):
        list(deleted)


@pytest.mark.parametrize("what", ["token id", "mask value"])
def test_records_are_checked_even_when_the_manifest_matches_them(what, demo_shards, tmp_path):
    """A shard written bad (its manifest hash agrees): token 151714 is past the 151,669 ids, a mask byte 254
    would count as 1."""
    from shared.manifest import sha256_file
    from train.data.reader import ShardError

    split = copy_split(demo_shards / "train", tmp_path / "train")
    shard = split / "shard-000002.tar"
    member = "input_ids.npy" if what == "token id" else "loss_mask.npy"
    offset, size, key = member_span(shard, member, nth=1)
    data_at, dtype = npy_data(shard, offset)
    assert dtype == (np.dtype("<i4") if what == "token id" else np.dtype("u1"))
    patch_bytes(shard, data_at, np.int32(151714).tobytes() if what == "token id" else bytes([254]))
    manifest = json.loads((split / "manifest.json").read_text())
    entry = next(s for s in manifest["shards"] if s["name"] == shard.name)
    entry["sha256"] = sha256_file(shard)
    (split / "manifest.json").write_text(json.dumps(manifest))
    needle = "token id 151714 is outside the tokenizer's vocabulary of 151,669" if what == "token id" else "loss mask must be 0/1"
    with pytest.raises(ShardError, match=rf"shard-000002\.tar: bad record {key}: {needle}"):
        _epoch(split)


def test_training_on_a_corrupted_shard_stops_with_one_line_naming_it(demo_shards, tmp_path):
    split = copy_split(demo_shards / "train", tmp_path / "shards" / "train")
    shutil.copytree(demo_shards / "test", tmp_path / "shards" / "test")
    offset, size, _ = member_span(split / "shard-000004.tar", "patches.npy.zst", nth=3)
    flip_byte(split / "shard-000004.tar", offset + size // 2)
    proc = run_cli(*train_args(tmp_path / "shards", tmp_path / "run", "--set", "train.train_iters=20",
                               "--set", "train.save_interval=0", "--set", "train.eval_interval=0"), cwd=tmp_path)
    one_error_line(proc.returncode, proc.stderr, f"{split / 'shard-000004.tar'} is corrupt", "geo3k preprocess --force")


# ---------------------------------------------------------------- every other error case: one line, exit 2


def _cut(path: Path, keep: int) -> None:
    os.truncate(path, keep)


def test_the_error_cases_are_one_line_each(base_run, demo_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(demo_shards, shards)
    train = shards / "train"

    def refused(*needles, args=(), env=None):
        return one_error_line(*cli(*train_args(shards, tmp_path / "new", *args), env=env)[::2], *needles)

    # a truncated tar and a deleted shard: found by a stat per shard before anything is built
    _cut(train / "shard-000002.tar", 10_000)
    refused(f"{train / 'shard-000002.tar'} has 10,000 bytes", "geo3k preprocess --force")
    (train / "shard-000002.tar").unlink()
    refused(f"{train / 'shard-000002.tar'} is missing", "geo3k preprocess --force")
    shutil.copy(demo_shards / "train" / "shard-000002.tar", train)

    # a truncated index.parquet, in train and in inspect
    _cut(train / "index.parquet", 500)
    refused(f"{train / 'index.parquet'} cannot be read", "geo3k preprocess --force")
    code, _, err = cli("inspect", str(train))
    one_error_line(code, err, f"{train / 'index.parquet'} cannot be read")
    shutil.copy(demo_shards / "train" / "index.parquet", train)

    # tensor_parallel=2 in one process: from the command line, and as a torchrun worker of a world of one
    refused("train.tensor_parallel=2", "--nproc 2", args=("--set", "train.tensor_parallel=2"))
    refused("train.tensor_parallel=2", args=("--set", "train.tensor_parallel=2"),
            env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})

    # an attention kernel this machine cannot run (cuDNN's on a CPU), named for the vision tower alone
    refused("train.vision_attention_backend: cudnn_frontend cannot run float32 tensors on cpu", "auto",
            args=("--set", "train.vision_attention_backend=cudnn_frontend"))

    # export: a bad --dtype is refused before the checkpoint is read
    for dtype in ("int8", "bf16"):
        code, _, err = cli("export", str(tmp_path / "no-such-run"), "--out", str(tmp_path / "hf"), "--dtype", dtype)
        one_error_line(code, err, f"--dtype {dtype}", "bfloat16, float16, float32")

    # --resume: a metrics.jsonl cut inside its last line, and another schedule
    run = shutil.copytree(base_run, tmp_path / "run")
    resume = train_args(shards, run, "--resume")
    text = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(text[: len(text) - 40])
    code, _, err = cli(*resume)
    one_error_line(code, err, "metrics.jsonl line", "cut short", "delete that line")
    (run / "metrics.jsonl").write_text(text)
    for setting in ("train.train_iters=8", "train.lr=0.002"):
        code, _, err = cli(*resume, "--set", setting)
        one_error_line(code, err, setting.split("=")[0], "--allow-schedule-change")


def test_an_allowed_schedule_change_is_said(base_run, demo_shards):
    from shared.config import load_config
    from train.trainer import check_resume

    cfg = load_config(REPO / "examples" / "tiny-cpu.yaml", ["train.train_iters=8", "train.global_batch_size=4"])
    said = []
    ckpt = base_run / "checkpoints" / "step-0000004"
    fingerprint = json.loads((ckpt / "trainer_state.json").read_text())["fingerprint"]
    state = check_resume(ckpt, cfg, fingerprint, allow_schedule_change=True, say=said.append)
    assert state["step"] == 4 and said == ["note: --allow-schedule-change: continuing with train.train_iters 4 -> 8"]


def test_a_hand_made_manifest_without_hashes_still_loads_with_its_records_checked(demo_shards, tmp_path):
    """The benchmarks' synthetic shard sets list shards by name and sample count only."""
    split = copy_split(demo_shards / "train", tmp_path / "train")
    manifest = json.loads((split / "manifest.json").read_text())
    manifest["shards"] = [{"name": s["name"], "samples": s["samples"]} for s in manifest["shards"]]
    (split / "manifest.json").write_text(json.dumps(manifest))
    assert _epoch(split) == 48
    offset, _, key = member_span(split / "shard-000001.tar", "loss_mask.npy")
    patch_bytes(split / "shard-000001.tar", npy_data(split / "shard-000001.tar", offset)[0], bytes([254]))
    from train.data.reader import ShardError

    with pytest.raises(ShardError, match=rf"bad record {key}: loss mask must be 0/1"):
        _epoch(split)
