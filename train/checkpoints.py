"""The run folder's durable parts: checkpoints that are never lost, the run's identity, and its lock.

    runs/geo3k/
        run.json                 this run's id; checkpoints carry it, so retention only touches its own
        .lock                    held (flock) by the training process for as long as it runs
        checkpoints/step-N/      complete checkpoints only; trainer_state.json lists every file and its size
        checkpoints/latest       the name of the newest one, replaced atomically
        checkpoints/.tmp-step-N  a save in progress (never read; removed by the next save or start)

A save writes everything into `.tmp-step-N`, fsyncs it, and only then renames it to `step-N` and points
`latest` at it; an older checkpoint is deleted only after that. A kill at any moment therefore leaves
`latest` on a complete checkpoint. Re-saving a step that exists (a resumed run going over its steps again)
moves the old folder aside (`.old-step-N`) first; if the process dies between the two renames, that copy is
what `latest` resolves to until the step is saved again.

`resolve_latest` is what `--resume` and `geo3k export RUN` use: the checkpoint `latest` names when it is
complete (every listed file present with its size), else the newest complete one of the same run, with a
warning saying which and why.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from shared.errors import UserError

CHECKPOINTS = "checkpoints"
LATEST = "latest"
STATE = "trainer_state.json"
RUN_FILE = "run.json"
LOCK_FILE = ".lock"
STAGING = ".tmp-"
REPLACED = ".old-"


class CheckpointError(UserError, RuntimeError):
    """A run folder or checkpoint that cannot be used as asked; the message says what to do."""


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def step_of(path: Path) -> int | None:
    name = path.name
    if name.startswith("step-") and name[5:].isdigit():
        return int(name[5:])
    return None


def read_state(ckpt: Path) -> dict[str, Any] | None:
    try:
        return json.loads((ckpt / STATE).read_text())
    except (OSError, ValueError):
        return None


def incomplete_reason(ckpt: Path) -> str | None:
    """None for a complete checkpoint, else what is wrong with it (missing, no state, a file missing or cut)."""
    if not ckpt.is_dir():
        return "missing"
    state = read_state(ckpt)
    if state is None:
        return f"incomplete (no readable {STATE})"
    for name, size in state.get("files", {}).items():  # checkpoints older than the file list: trusted as is
        try:
            got = (ckpt / name).stat().st_size
        except OSError:
            return f"damaged ({name} is missing)"
        if got != size:
            return f"damaged ({name} has {got:,} bytes, {size:,} were written)"
    return None


def list_steps(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-N folder under checkpoints/, by step."""
    if not root.is_dir():
        return []
    found = [(step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted((s, p) for s, p in found if s is not None)


def run_id_of(out_dir: Path) -> str | None:
    try:
        return json.loads((out_dir / RUN_FILE).read_text())["run_id"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_run_id(out_dir: Path, run_id: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / RUN_FILE, json.dumps({"run_id": run_id}) + "\n")


def new_run_id() -> str:
    return uuid.uuid4().hex


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> dict[str, int]:
    """fsync every file under root (a rename is durable only once the data is) and return {relative path: size}."""
    files: dict[str, int] = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = Path(dirpath) / n
            with open(p, "rb") as f:
                os.fsync(f.fileno())
            files[str(p.relative_to(root))] = p.stat().st_size
        fsync_dir(Path(dirpath))
    return files


def resolve_latest(out_dir: Path) -> tuple[Path | None, str | None]:
    """(the checkpoint to resume or export, a warning when it is not the one `latest` names)."""
    root = Path(out_dir) / CHECKPOINTS
    marker = root / LATEST
    named, why = None, "absent"
    if marker.exists():
        name = marker.read_text().strip()
        named = root / name
        why = incomplete_reason(named)
        if why is None:
            return named, None
        aside = root / f"{REPLACED}{name}"
        if why == "missing" and incomplete_reason(aside) is None:
            # a re-save died between moving the old folder aside and renaming the new one in. Read where it is
            # (every rank resolves this at once, so none renames); the next save of that step replaces it
            return aside, f"{named} was being replaced when the run stopped: using its complete earlier copy {aside}"
    run_id = run_id_of(Path(out_dir))
    for _, ckpt in reversed(list_steps(root)):
        if incomplete_reason(ckpt) is None and (run_id is None or read_state(ckpt).get("run_id") in (None, run_id)):
            what = f"{marker} names {named.name}, which is {why}" if named is not None else f"{marker} is absent"
            return ckpt, f"{what}: using the newest complete checkpoint, {ckpt}"
    return None, None


def prune(root: Path, keep: int, run_id: str, protect: Path) -> list[Path]:
    """Delete this run's checkpoints beyond the newest `keep` (by step); another run's are never touched."""
    if not keep:
        return []
    own = [p for _, p in list_steps(root) if (read_state(p) or {}).get("run_id") == run_id]
    doomed = [p for p in own[:-keep] if p.resolve() != protect.resolve()]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def holds_other_run(out_dir: Path) -> list[str]:
    """The checkpoints of an earlier run in out_dir, which a fresh start must not mix with or prune. (Metrics
    alone, of a run stopped before its first checkpoint, are what `--resume` would cut to step 0 anyway.)"""
    return [p.name for _, p in list_steps(out_dir / CHECKPOINTS)]


def clear_run(out_dir: Path) -> None:
    """--overwrite: remove what an earlier run left (checkpoints, metrics, events, plot, identity)."""
    shutil.rmtree(out_dir / CHECKPOINTS, ignore_errors=True)
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)
    for name in ("metrics.jsonl", "loss.png", RUN_FILE, "config.yaml"):
        (out_dir / name).unlink(missing_ok=True)


class RunLock:
    """An exclusive flock on out_dir/.lock for the life of the process (the kernel drops it if the process dies,
    so a killed run never leaves a stale lock)."""

    def __init__(self, out_dir: Path):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.path = out_dir / LOCK_FILE
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(self.fd)
            raise CheckpointError(
                f"another `geo3k train` (pid {holder}) is using {out_dir}: wait for it to finish, or set another "
                "train.output_dir"
            ) from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor releases the flock
            self.fd = None
