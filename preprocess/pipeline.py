"""`geo3k preprocess`: source rows -> pre-tokenized WebDataset shards, per split.

    read source -> check output -> plan shards (fixed row ranges) -> [workers: fetch images -> encode -> write shard]
    -> manifest

Shard i always holds source rows [i*S, (i+1)*S) minus rejects, whatever the number of workers, so the output
is byte-identical across reruns and worker counts, and a shard is the unit of work, of resumption and of
splitting a job across machines (`--shards a:b`). Each finished shard leaves a small part file in `.parts/`
(its index rows, rejects and stats); the manifest is assembled from them once every shard is done, and is
written last, so a folder with a manifest is complete and one without is resumable.

Several runs may work on one folder at once (the multi-machine recipe, or the same command started twice):
a worker claims a shard with an exclusive lock on `.parts/NNNNNN.lock` before it starts it and skips shards
that another run holds; a run then waits for those claims to end (the kernel drops the lock of a process that
dies) and does whatever is still missing itself. Temporary files carry their host and process id, so start-up
removes only its own machine's leftovers of dead processes. Every run holds `.lock` shared while it works and
`--force` takes it exclusively (without waiting) before it clears a folder; the manifest is written under an
exclusive lock on `.manifest.lock`, once. All are flock locks, released by the kernel when their process ends.

`--ray ADDRESS` swaps the local worker pool for a Ray cluster (preprocess/ray_shards.py): one Ray task per
shard, running the same `process_shard`, so the shards, claims, part files and manifest are the ones above.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import importlib.metadata
import json
import math
import os
import re
import select
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Iterator

from preprocess.images import FetchedImage, Reject, cache_path, fetch_image, local_path, read_local
from preprocess.samples import make_sample
from preprocess.sources import Source, open_source, row_fields
from preprocess.writer import ShardWriter, temp_name
from shared.config import PipelineConfig, to_dict
from shared.errors import UserError
from shared.manifest import INDEX, MANIFEST, REJECTS, atomic_write_bytes, shard_name, write_index
from shared.presets import load_processor
from shared.schema import FORMAT_VERSION

PARTS = ".parts"
LOCK = ".lock"
CHECK_EVERY = 64
"""Rows whose index is a multiple of this are also run through the full processor and compared (the fast
path's proof on every shard: row 0 of a 256-row shard is always one); `--verify` checks every row."""
MIN_FREE_BYTES = 64 * 2**20
BYTES_PER_ROW_ESTIMATE = 16_000  # ~8.4 kB per Geo3K sample written, twice for the temporary copy


class PreprocessError(UserError, RuntimeError):
    pass


# ---------------------------------------------------------------- fingerprint


def fingerprint_inputs(cfg: PipelineConfig, src: Source, identity: dict[str, Any]) -> dict[str, Any]:
    """Everything that decides the shards' bytes (and nothing that doesn't, like the worker count or --verify,
    which only checks). Image *contents* are not in here: the sha256 of every image read is kept per row
    (index and rejects) and compared on reuse, see `_check_images`."""
    pre = to_dict(cfg.preprocess)
    pre.pop("workers")
    pre.pop("verify")
    if not pre["train_final_newline"]:  # the default leaves the fingerprints of shards made before the option alone
        pre.pop("train_final_newline")
    fetch = pre.pop("fetch")
    return {
        "format_version": FORMAT_VERSION,
        "source": {
            "origin": src.origin,
            "sha256": src.sha256,
            "rows": src.num_rows,
            "split": src.split,
            # relative image paths resolve against it: another folder means other diagrams
            "image_root": str(src.base_dir.resolve()),
        },
        "columns": {k: getattr(cfg.source, k) for k in ("input_key", "label_key", "image_key")},
        "processor": identity,
        "options": {
            **pre,
            "max_image_pixels": fetch["max_image_pixels"],
            "max_bytes": fetch["max_bytes"],
            "samples_per_shard": cfg.shards.samples_per_shard,
            "zstd_level": cfg.shards.zstd_level,
        },
    }


def fingerprint_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: d}


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    a, b = _flatten(old), _flatten(new)
    changes = []
    for k in sorted(set(a) | set(b)):
        if a.get(k) != b.get(k):
            changes.append(f"{k}: {str(a.get(k))[:60]} -> {str(b.get(k))[:60]}")
    return changes


# ---------------------------------------------------------------- worker processes

_WORKER: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1


def _die_with(parent_pid: int) -> None:
    """Make this worker end when the run's main process ends, however it ends (kill -9, the OOM killer).

    Two guards, because a worker's parent is the fork server, not the main process: PR_SET_PDEATHSIG kills the
    worker when the fork server goes (it exits when the main process does), and a thread blocked on a pidfd of
    the main process kills it directly (Linux >= 5.3), so no orphan keeps writing into the folder."""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    try:
        fd = os.pidfd_open(parent_pid)
    except (AttributeError, OSError):  # no pidfd: poll once a second instead
        fd = None
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            os._exit(1)

    def watch() -> None:
        if fd is not None:
            select.select([fd], [], [])  # readable once the process has exited
        else:
            while True:
                time.sleep(1.0)
                try:
                    os.kill(parent_pid, 0)
                except ProcessLookupError:
                    break
                except PermissionError:
                    continue
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="geo3k-lifeline", daemon=True).start()


def _init_worker(cfg: PipelineConfig, parent_pid: int | None = None) -> None:
    import torch

    if parent_pid is not None:  # a pool worker, not the main process running one worker in-line
        _die_with(parent_pid)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the main process's to handle (it stops us)
    torch.set_num_threads(1)  # one process per core: intra-op threads would only contend
    _WORKER["cfg"] = cfg
    _WORKER["proc"] = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)


def _worker_context():
    """Workers start from a fork server that has imported torch, transformers and the Qwen-VL processor code
    once, so each worker starts in well under a second instead of importing them itself (~5 s each, which
    ate most of the gain of a second worker on small jobs). Unlike a plain fork, the server is a clean process:
    no threads or CUDA state of the parent are inherited."""
    try:
        ctx = get_context("forkserver")
    except ValueError:  # platforms without fork (Windows)
        return get_context("spawn")
    ctx.set_forkserver_preload(
        ["torch", "transformers", "transformers.models.qwen2_vl.image_processing_qwen2_vl", "preprocess.pipeline"]
    )
    return ctx


def _stop_pool(pool: ProcessPoolExecutor) -> None:
    """Stop and reap every worker now (an error, Ctrl-C or SIGTERM in the main process): none may outlive the
    run and keep writing."""
    procs = list(getattr(pool, "_processes", {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for p in procs:
        if p.is_alive():
            p.kill()
    for p in procs:
        p.join(timeout=5)


# ---------------------------------------------------------------- one shard (in a worker)

MapTasks = Callable[[PipelineConfig, "list[ShardTask]"], Iterator[dict[str, Any]]]
"""How a run's shards are executed: (config, tasks) -> each task's `process_shard` result, in any order. Local
worker processes by default (`_map_tasks`); `preprocess/ray_shards.py` runs them as Ray tasks."""


@dataclass
class ShardTask:
    index: int
    start: int
    stop: int
    rows: list[dict[str, Any]]
    out_dir: str
    base_dir: str
    check_all: bool = False


def _internal(e: BaseException) -> Reject:
    """A programming error met on one row: a reject of its own class, with the exception and where it was."""
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return Reject("internal", f"{e.__class__.__name__}: {e}{where} (a bug in geo3k: please report it)")


def _fetch_row_images(entries: list[list[Any]], cfg: PipelineConfig, base_dir: Path) -> list[list[Any]]:
    """Fetch every image of a shard concurrently; each slot holds a FetchedImage or a Reject."""
    flat = [(r, j, e) for r, row in enumerate(entries) for j, e in enumerate(row)]
    is_url = lambda e: isinstance(e, str) and e.strip().lower().startswith(("http://", "https://"))  # noqa: E731
    results: list[list[Any]] = [[None] * len(row) for row in entries]

    def one(entry: Any) -> Any:
        try:
            return fetch_image(entry, cfg.preprocess.fetch, base_dir)
        except Reject as e:
            return e
        except Exception as e:  # noqa: BLE001 (one image's bug is one row's reject)
            return _internal(e)

    # threads only pay while waiting on the network: local files and embedded bytes are decoded in line
    # (a pool per shard cost ~0.5 ms a row in thread start-up and hand-offs on a local-file source)
    remote = [(r, j, e) for r, j, e in flat if is_url(e)]
    for r, j, e in flat:
        if not is_url(e):
            results[r][j] = one(e)
    if remote:
        with ThreadPoolExecutor(min(cfg.preprocess.fetch.concurrency, len(remote))) as pool:
            for (r, j, _), res in zip(remote, pool.map(one, [e for _, _, e in remote])):
                results[r][j] = res
    return results


@contextmanager
def _claim(path: Path) -> Iterator[bool]:
    """An exclusive, non-blocking lock on `path`: True if this process holds it, False if another run does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def process_shard(task: ShardTask) -> dict[str, Any]:
    out_dir = Path(task.out_dir)
    parts = out_dir / PARTS
    with _claim(parts / f"{task.index:06d}.lock") as mine:
        if not mine:
            return {"index": task.index, "claimed_elsewhere": True}
        if (parts / f"{task.index:06d}.json").exists() or (out_dir / MANIFEST).exists():
            return {"index": task.index, "claimed_elsewhere": True}  # another run finished it meanwhile
        return _write_shard(task)


def _write_shard(task: ShardTask) -> dict[str, Any]:
    cfg: PipelineConfig = _WORKER["cfg"]
    proc = _WORKER["proc"]
    out_dir = Path(task.out_dir)
    name = shard_name(task.index)
    fields, entries = [], []
    for r in task.rows:
        try:
            fields.append(row_fields(r, cfg.source))
        except Reject as e:
            fields.append(e)
        except Exception as e:  # noqa: BLE001
            fields.append(_internal(e))
        entries.append(fields[-1][2] if isinstance(fields[-1], tuple) else [])
    fetched = _fetch_row_images(entries, cfg, Path(task.base_dir))
    writer = ShardWriter(out_dir / name, cfg.shards.zstd_level)
    index_rows, rejects = [], []
    stats: Counter[str] = Counter()
    mismatches: list[str] = []
    try:
        for offset, (row_f, imgs) in enumerate(zip(fields, fetched)):
            row = task.start + offset
            key = f"{row:08d}"
            shas = [getattr(x, "sha256", None) for x in imgs]
            try:
                if isinstance(row_f, Reject):
                    raise row_f
                problem, answer, _ = row_f
                bad = next((x for x in imgs if isinstance(x, Reject)), None)
                if bad is not None:
                    raise bad
                ok: list[FetchedImage] = imgs
                info = [{"source": f.source, "sha256": f.sha256, "bytes": f.num_bytes, "width": f.image.width, "height": f.image.height} for f in ok]
                check = task.check_all or row % CHECK_EVERY == 0
                sample, enc = make_sample(key, row, problem, answer, [f.image for f in ok], info, proc, cfg.preprocess, check=check)
            except Reject as e:
                rejects.append({"row": row, "reason": e.reason, "detail": e.detail, "image_sha256": shas})
                continue
            except (MemoryError, KeyboardInterrupt):
                raise
            except Exception as e:  # noqa: BLE001 (kept visible: class `internal`, counted in the summary)
                err = _internal(e)
                rejects.append({"row": row, "reason": err.reason, "detail": err.detail, "image_sha256": shas})
                continue
            stats["checked"] += enc.checked
            if enc.mismatch:
                stats["mismatched"] += 1
                mismatches.append(f"row {row}: {enc.mismatch}")
            writer.write(sample)  # outside the row's try: a full disk is the run's error, not the row's
            m = sample.meta
            index_rows.append(
                {
                    "key": key,
                    "shard": name,
                    "row": row,
                    "num_tokens": m["num_tokens"],
                    "num_image_tokens": m["num_image_tokens"],
                    "num_patches": m["num_patches"],
                    "num_loss_tokens": m["num_loss_tokens"],
                    "num_images": len(info),
                    "image_sha256": shas,
                }
            )
            stats["tokens"] += m["num_tokens"]
            stats["image_tokens"] += m["num_image_tokens"]
            stats["loss_tokens"] += m["num_loss_tokens"]
            stats["patches"] += m["num_patches"]
        size, sha = writer.close()
    except BaseException:
        writer.abort()
        raise
    part = {
        "index": task.index,
        "rows": [task.start, task.stop],
        "name": name,
        "samples": len(index_rows),
        "bytes": size,
        "sha256": sha,
        "index_rows": index_rows,
        "rejects": rejects,
        "stats": dict(stats),
        "mismatches": mismatches[:5],
    }
    # The part file is written after the tar is in place: a part file means its shard is complete.
    (out_dir / PARTS).mkdir(exist_ok=True)  # a concurrent run may have finished the split and removed it
    atomic_write_bytes(out_dir / PARTS / f"{task.index:06d}.json", json.dumps(part).encode())
    return part


# ---------------------------------------------------------------- the driver


@dataclass
class SplitSummary:
    split: str
    out_dir: Path
    status: str  # "written", "up-to-date", "partial"
    rows: int = 0
    written: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    tokens: int = 0
    image_tokens: int = 0
    loss_tokens: int = 0
    bytes: int = 0
    shards: int = 0
    shards_done_now: int = 0
    seconds: float = 0.0
    checked: int = 0  # rows also run through the full processor and compared
    mismatched: int = 0  # of those, rows where the fast path differed (written from the processor's output)
    notes: list[str] = field(default_factory=list)  # examples of internal errors and mismatches

    def lines(self) -> list[str]:
        if self.status == "up-to-date":
            return [f"{self.split}: up to date ({self.out_dir}, {self.written} samples in {self.shards} shards); nothing to do"]
        rej = ", ".join(f"{k} {v}" for k, v in sorted(self.rejected.items())) or "none"
        rate = self.rows / self.seconds if self.seconds else 0.0
        head = f"{self.split}: {self.out_dir}" + ("" if self.status == "written" else f" ({self.status})")
        out = [
            head,
            f"  rows read {self.rows} = written {self.written} + rejected {sum(self.rejected.values())} ({rej})",
            f"  tokens {self.tokens:,} (image {self.image_tokens:,}, loss {self.loss_tokens:,}); "
            f"shards {self.shards} ({self.shards_done_now} this run), {self.bytes / 1e6:.1f} MB",
            f"  exactness: {self.checked} rows compared with the full processor, {self.mismatched} differed",
            f"  time {self.seconds:.1f}s ({rate:.1f} rows/s)",
        ]
        if self.rejected.get("internal"):
            out.append(f"  warning: {self.rejected['internal']} rows hit a bug in geo3k (reject class 'internal'), e.g.")
        if self.mismatched:
            out.append("  warning: the fast path differed from the processor (those rows hold the processor's output); "
                       "rerun with --verify --force to build every row from a checked result, e.g.")
        out += [f"    {n}" for n in self.notes[:3]]
        return out


def parse_shard_range(text: str | None, num_shards: int) -> range:
    if not text:
        return range(num_shards)
    try:
        a, _, b = text.partition(":")
        start = int(a) if a else 0
        stop = int(b) if b else num_shards
    except ValueError:
        raise PreprocessError(f"--shards {text!r}: write START:STOP, e.g. 0:8 (shard indices, STOP excluded)") from None
    if not 0 <= start < stop <= num_shards:
        raise PreprocessError(f"--shards {text!r}: this split has shards 0..{num_shards - 1}")
    return range(start, stop)


def _load_parts(parts_dir: Path) -> dict[int, dict[str, Any]]:
    parts = {}
    for p in parts_dir.glob("[0-9]*.json"):
        try:
            part = json.loads(p.read_text())
        except FileNotFoundError:  # removed by a run that just finished the split
            continue
        parts[part["index"]] = part
    return parts


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _check_reuse(out: Path, fp: str, inputs: dict[str, Any], force: bool) -> str | None:
    """Decide what to do with an existing output folder: 'up-to-date', None (proceed), or raise."""
    recorded = _read_json(out / MANIFEST) or _read_json(out / PARTS / "fingerprint.json")
    if recorded is None:
        if any(out.glob("shard-*.tar")) and not force:
            raise PreprocessError(f"{out} holds shards of unknown origin: remove them or pass --force")
        return None
    if recorded["fingerprint"] == fp and not force:
        return "up-to-date" if (out / MANIFEST).exists() else None
    if not force:
        changes = describe_changes(recorded["fingerprint_inputs"], inputs)
        raise PreprocessError(
            f"{out} holds shards made from different inputs, and geo3k will not mix them. Changed:\n  "
            + "\n  ".join(changes[:12])
            + "\nRebuild with `geo3k preprocess --force`, or write elsewhere with --set shards.output_dir=DIR"
        )
    return None


def _image_file(entry: Any, cfg: PipelineConfig, base_dir: Path) -> Path | None:
    """The file an image entry was read from, if it is one to hash again: a local file, or a URL's cached copy
    when there is one."""
    if isinstance(entry, dict):
        entry = None if entry.get("bytes") is not None else entry.get("path")
    if not isinstance(entry, str) or not entry.strip():
        return None
    src = entry.strip()
    if src.lower().startswith(("http://", "https://")):
        cached = cache_path(cfg.preprocess.fetch, src)
        return cached if cached is not None and cached.is_file() else None
    if src.lower().startswith("data:"):
        return None
    return local_path(src, base_dir)


def _check_images(src: Source, cfg: PipelineConfig, recorded: dict[int, list[str | None]]) -> None:
    """Refuse to reuse shards whose images changed on disk since they were written.

    Local files and cached downloads are hashed again and compared with the sha256 recorded per row (None: it
    could not be read then). Embedded bytes are part of the source file's hash already. A URL without a
    cached copy is not downloaded again to check it: its content is taken to be what the URL names (a
    changed image behind the same URL needs `--force`, or an emptied preprocess.fetch.cache_dir)."""
    changed = []
    for row, shas in sorted(recorded.items()):
        try:
            _, _, entries = row_fields(src.rows(row, row + 1)[0], cfg.source)
        except Reject:
            continue
        for entry, sha in zip(entries, shas):
            path = _image_file(entry, cfg, src.base_dir)
            if path is None:
                continue
            try:
                now = hashlib.sha256(read_local(path, cfg.preprocess.fetch.max_bytes)).hexdigest()
            except Reject:
                now = None
            if now != sha:
                changed.append(f"row {row}: {path} ({(sha or 'unreadable')[:12]} -> {(now or 'unreadable')[:12]})")
    if changed:
        raise PreprocessError(
            f"{len(changed)} image(s) changed since their shards were written, e.g. {'; '.join(changed[:3])}: "
            "rebuild with `geo3k preprocess --force`"
        )


def _recorded_images(out: Path, parts: list[dict[str, Any]] | None) -> dict[int, list[str | None]]:
    """row -> the sha256 of its images as read, from part files or from a finished folder's index and rejects."""
    rec: dict[int, list[str | None]] = {}
    if parts is None:
        import pyarrow.parquet as pq

        table = pq.read_table(out / INDEX, columns=["row", "image_sha256"]) if (out / INDEX).exists() else None
        if table is not None and "image_sha256" in table.column_names:
            for row, shas in zip(table["row"].to_pylist(), table["image_sha256"].to_pylist()):
                rec[row] = shas or []
        if (out / REJECTS).exists():
            for line in (out / REJECTS).read_text().splitlines():
                r = json.loads(line)
                rec[r["row"]] = r.get("image_sha256") or []
        return rec
    for p in parts:
        for r in p["index_rows"] + p["rejects"]:
            rec[r["row"]] = r.get("image_sha256") or []
    return rec


def _clear(out: Path) -> None:
    for p in list(out.glob("shard-*.tar")) + [out / MANIFEST, out / INDEX, out / REJECTS]:
        p.unlink(missing_ok=True)
    shutil.rmtree(out / PARTS, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temps(out: Path) -> None:
    """Remove temporary files of dead processes of this machine (a killed run's leftovers). Another machine's
    are left alone: their process may be alive, and hidden names are never read as shards."""
    mine = re.compile(rf"^\..+\.{re.escape(socket.gethostname())}\.(\d+)(?:\.\d+)?\.tmp$")
    legacy = re.compile(r"^\.[^.]+\.(tar|json|parquet|jsonl)\.tmp$")  # made by versions without owner names
    for folder in (out, out / PARTS):
        for p in folder.glob(".*.tmp"):
            m = mine.match(p.name)
            if (m and not _alive(int(m.group(1)))) or legacy.match(p.name):
                p.unlink(missing_ok=True)


def _os_error(e: OSError, out: Path) -> PreprocessError:
    """A one-line message for the operating-system errors a user can fix."""
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return PreprocessError(f"disk full writing {where}: free space (or set shards.output_dir to another disk), then rerun: finished shards are kept")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return PreprocessError(f"cannot write {where} ({e.strerror}): set shards.output_dir to a folder you can write")
    if e.errno in (errno.ENOTDIR, errno.EEXIST):
        return PreprocessError(f"{where}: a file stands where a folder must be ({e.strerror}): remove it or set shards.output_dir=DIR")
    return PreprocessError(f"{where}: {e.strerror or e}")


def _prepare_output(out: Path, num_rows: int, force: bool) -> None:
    """Make the split folder and prove that it can be written and has room, before anything expensive (a
    finished folder that is only checked for being up to date needs no room)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / temp_name("write-probe")
        probe.write_bytes(b"geo3k")
        probe.unlink()
    except OSError as e:
        raise _os_error(e, out) from None
    if (out / MANIFEST).exists() and not force:
        return
    free = shutil.disk_usage(out).free
    need = MIN_FREE_BYTES + num_rows * BYTES_PER_ROW_ESTIMATE
    if free < need:
        raise PreprocessError(
            f"only {free / 1e6:.0f} MB free on the disk of {out}; this split needs about {need / 1e6:.0f} MB: "
            "free space or set shards.output_dir to another disk"
        )


@contextmanager
def _folder_lock(out: Path, exclusive: bool) -> Iterator[None]:
    """Held shared by every run writing `out`; exclusive (without waiting) by a run that clears it (--force)."""
    fd = os.open(out / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, (fcntl.LOCK_EX | fcntl.LOCK_NB) if exclusive else fcntl.LOCK_SH)
        except BlockingIOError:
            raise PreprocessError(
                f"another geo3k preprocess is writing {out}: wait for it to finish (or stop it) before --force"
            ) from None
        yield
    finally:
        os.close(fd)


def preprocess_split(
    cfg: PipelineConfig,
    split: str,
    *,
    config_dir: Path | None = None,
    force: bool = False,
    shard_range: str | None = None,
    progress: bool = True,
    map_tasks: MapTasks | None = None,
) -> SplitSummary:
    out = cfg.split_dir(split)
    try:
        return _preprocess_split(cfg, split, out, config_dir, force, shard_range, progress, map_tasks or _map_tasks)
    except OSError as e:
        raise _os_error(e, out) from None


def _preprocess_split(
    cfg: PipelineConfig, split: str, out: Path, config_dir: Path | None, force: bool, shard_range: str | None, progress: bool,
    map_tasks: MapTasks,
) -> SplitSummary:
    t0 = time.monotonic()
    src = open_source(cfg.source, split, config_dir)
    per = cfg.shards.samples_per_shard
    num_shards = max(1, math.ceil(src.num_rows / per))
    wanted = parse_shard_range(shard_range, num_shards)  # a bad range is refused before the processor loads
    _prepare_output(out, src.num_rows, force)
    proc = load_processor(cfg.model.name_or_path, cfg.model.min_pixels, cfg.model.max_pixels)
    inputs = fingerprint_inputs(cfg, src, proc.identity)
    fp = fingerprint_of(inputs)

    with _folder_lock(out, exclusive=force):
        verdict = _check_reuse(out, fp, inputs, force)
        if verdict == "up-to-date":
            _check_images(src, cfg, _recorded_images(out, None))
            m = json.loads((out / MANIFEST).read_text())
            shutil.rmtree(out / PARTS, ignore_errors=True)  # left by a run that overlapped the one that finished
            return SplitSummary(split, out, "up-to-date", written=m["counts"]["written"], shards=len(m["shards"]))
        if force:  # rebuild from scratch: nothing of an earlier run is kept
            _clear(out)
        parts_dir = out / PARTS
        parts_dir.mkdir(exist_ok=True)
        _remove_stale_temps(out)
        atomic_write_bytes(parts_dir / "fingerprint.json", json.dumps({"fingerprint": fp, "fingerprint_inputs": inputs}).encode())
        done = _load_parts(parts_dir)
        _check_images(src, cfg, _recorded_images(out, list(done.values())))

        done_now = _run_shards(cfg, src, out, [i for i in wanted if i not in done], progress, split, map_tasks)
        m = _read_json(out / MANIFEST)
        if m is not None and m["fingerprint"] == fp:  # a concurrent run completed the split meanwhile
            return _from_manifest(split, out, m, time.monotonic() - t0, done_now)
        done = _load_parts(parts_dir)  # with what concurrent runs finished meanwhile
        summary = _summarize(split, out, done, time.monotonic() - t0, done_now)
        missing = [i for i in range(num_shards) if i not in done]
        if missing:
            summary.status = f"partial: {num_shards - len(missing)} of {num_shards} shards done; run the rest, then rerun without --shards to finish"
            return summary
        _finish(cfg, out, src, inputs, fp, done, num_shards, summary)
        return summary


def _finish(cfg, out, src, inputs, fp, done, num_shards, summary) -> None:
    """Write index, rejects and manifest once, under an exclusive lock: of two runs that complete the split
    together, the second finds the manifest written and has nothing to add."""
    fd = os.open(out / ".manifest.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        m = _read_json(out / MANIFEST)
        if m is not None and m["fingerprint"] == fp:
            shutil.rmtree(out / PARTS, ignore_errors=True)
            return
        _write_manifest(cfg, out, src, inputs, fp, [done[i] for i in range(num_shards)], summary)
    finally:
        os.close(fd)


def _run_shards(
    cfg: PipelineConfig, src: Source, out: Path, todo: list[int], progress: bool, split: str, map_tasks: MapTasks
) -> int:
    """Write the shards `todo` (skipping those another run holds, then waiting for those and doing any it left
    undone); returns how many this run wrote."""
    per = cfg.shards.samples_per_shard
    parts_dir = out / PARTS
    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), unit="shard", desc=f"preprocess {split}", dynamic_ncols=True)
    written = 0
    try:
        while todo:
            tasks = [
                ShardTask(i, i * per, min((i + 1) * per, src.num_rows), src.rows(i * per, min((i + 1) * per, src.num_rows)),
                          str(out), str(src.base_dir), cfg.preprocess.verify)
                for i in todo
            ]
            elsewhere = []
            for part in map_tasks(cfg, tasks):
                if part.get("claimed_elsewhere"):
                    elsewhere.append(part["index"])
                else:
                    written += 1
                if bar:
                    bar.update(0 if part.get("claimed_elsewhere") else 1)
            for i in elsewhere:  # wait until the run holding it finishes it (or dies: the kernel drops its lock)
                try:
                    fd = os.open(parts_dir / f"{i:06d}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                except FileNotFoundError:  # .parts is gone: a concurrent run completed the split (manifest first)
                    break
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH)
                finally:
                    os.close(fd)
            finished = _load_parts(parts_dir)
            todo = [i for i in elsewhere if i not in finished and not (out / MANIFEST).exists()]
    finally:
        if bar:
            bar.close()
    return written


def _map_tasks(cfg: PipelineConfig, tasks: list[ShardTask]) -> Iterator[dict[str, Any]]:
    workers = cfg.preprocess.workers or os.cpu_count() or 1
    workers = max(1, min(workers, len(tasks)))
    if workers == 1:
        _init_worker(cfg)
        for t in tasks:
            yield process_shard(t)
        return
    pool = ProcessPoolExecutor(workers, mp_context=_worker_context(), initializer=_init_worker, initargs=(cfg, os.getpid()))
    try:
        yield from pool.map(process_shard, tasks)
    except BaseException:
        _stop_pool(pool)
        raise
    pool.shutdown(wait=True)


def _from_manifest(split: str, out: Path, m: dict[str, Any], seconds: float, done_now: int) -> SplitSummary:
    c = m["counts"]
    return SplitSummary(
        split, out, "written", rows=c["rows"], written=c["written"], rejected=dict(c["rejected"]), tokens=c["tokens"],
        image_tokens=c["image_tokens"], loss_tokens=c["loss_tokens"], bytes=c["bytes"], shards=len(m["shards"]),
        shards_done_now=done_now, seconds=seconds,
    )


def _summarize(split: str, out: Path, parts: dict[int, dict[str, Any]], seconds: float, done_now: int) -> SplitSummary:
    s = SplitSummary(split, out, "written", seconds=seconds, shards=len(parts), shards_done_now=done_now)
    rejected: Counter[str] = Counter()
    for p in parts.values():
        s.rows += p["rows"][1] - p["rows"][0]
        s.written += p["samples"]
        s.bytes += p["bytes"]
        s.tokens += p["stats"].get("tokens", 0)
        s.image_tokens += p["stats"].get("image_tokens", 0)
        s.loss_tokens += p["stats"].get("loss_tokens", 0)
        s.checked += p["stats"].get("checked", 0)
        s.mismatched += p["stats"].get("mismatched", 0)
        rejected.update(r["reason"] for r in p["rejects"])
        s.notes += [f"row {r['row']}: {r['detail']}" for r in p["rejects"] if r["reason"] == "internal"][:3]
        s.notes += p.get("mismatches", [])[:3]
    s.rejected = dict(rejected)
    return s


def _package_version() -> str:
    # the installed package's metadata (pyproject.toml's version); a source tree that was never installed has none
    try:
        return importlib.metadata.version("geo3k")
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


def _write_manifest(
    cfg: PipelineConfig, out: Path, src: Source, inputs: dict[str, Any], fp: str, parts: list[dict[str, Any]], s: SplitSummary
) -> None:
    if s.rows != src.num_rows or s.rows != s.written + sum(s.rejected.values()):
        raise PreprocessError(f"counts do not reconcile: {src.num_rows} source rows, {s.rows} planned, {s.written} written, {s.rejected} rejected")
    write_index(out / INDEX, [r for p in parts for r in p["index_rows"]])
    rejects = [r for p in parts for r in p["rejects"]]
    atomic_write_bytes(out / REJECTS, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rejects).encode())
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_by": f"geo3k {_package_version()}",
        "dataset": cfg.dataset,
        "split": src.split,
        "fingerprint": fp,
        "fingerprint_inputs": inputs,
        "processor": inputs["processor"],
        "shards": [{k: p[k] for k in ("name", "samples", "bytes", "sha256", "rows")} for p in parts],
        "counts": {
            "rows": s.rows,
            "written": s.written,
            "rejected": s.rejected,
            "tokens": s.tokens,
            "image_tokens": s.image_tokens,
            "loss_tokens": s.loss_tokens,
            "bytes": s.bytes,
        },
    }
    atomic_write_bytes(out / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False).encode())
    shutil.rmtree(out / PARTS, ignore_errors=True)


def run_preprocess(
    cfg: PipelineConfig,
    *,
    config_dir: Path | None = None,
    force: bool = False,
    shard_range: str | None = None,
    progress: bool = True,
    ray_address: str | None = None,
) -> list[SplitSummary]:
    """Every split of `cfg.source.splits`; with `ray_address` (HOST:PORT or auto) each shard is a task on that Ray
    cluster instead of a local worker process (the same shard function, so the same bytes)."""

    def run(map_tasks: MapTasks | None) -> list[SplitSummary]:
        return [
            preprocess_split(cfg, split, config_dir=config_dir, force=force, shard_range=shard_range, progress=progress, map_tasks=map_tasks)
            for split in cfg.source.splits
        ]

    if not ray_address:
        return run(None)
    from preprocess.ray_shards import ray_map_tasks

    with ray_map_tasks(ray_address) as map_tasks:
        return run(map_tasks)
