"""The preprocess stage against what breaks runs: bad rows, hostile files and servers, concurrent and killed
runs, changed inputs, and mistakes a user can fix (one `error:` line each, before any expensive work)."""

from __future__ import annotations

import base64
import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

import preprocess.pipeline as pipeline
from preprocess.images import Reject, fetch_image, read_local
from preprocess.pipeline import PreprocessError, run_preprocess
from preprocess.samples import answer_text
from shared.config import ConfigError, FetchConfig, load_config
from shared.manifest import ShardSet
from tests.conftest import REPO, SAMPLE_DIR, make_config
from tests.fault_server import FaultServer
from tests.test_preprocess import assert_record_exact, read_records, shard_hashes

GOOD = "geo3k_12.png"


def jsonl(path: Path, lines: list) -> Path:
    """Lines as given: dicts and lists are JSON-encoded, bytes are written raw (to make broken lines)."""
    with open(path, "wb") as f:
        for x in lines:
            f.write((x if isinstance(x, bytes) else json.dumps(x).encode()) + b"\n")
    return path


def row(answer, image=GOOD, problem="<image>Find x."):
    return {"problem": problem, "answer": answer, "images": [image]}


def _sample_config(tmp_path: Path, src: Path, **extra: str):
    return make_config(tmp_path / "out", {"train": str(src)}, **{"source.image_root": str(SAMPLE_DIR / "images"), **extra})


# ---------------------------------------------------------------- one bad row never stops a run


def test_every_row_failure_is_a_reject_and_counts_reconcile(tmp_path, monkeypatch):
    Image.new("RGB", (2010, 10), "white").save(tmp_path / "thin.png")  # aspect ratio 201: the processor refuses
    (tmp_path / "a_folder.png").mkdir()
    b64 = base64.b64encode((SAMPLE_DIR / "images" / GOOD).read_bytes()).decode()
    lines = [
        row("13"),  # 0 written
        row("1", str(tmp_path / "thin.png")),  # 1
        row("1", str(tmp_path / "a_folder.png")),  # 2
        row("1", "/dev/zero"),  # 3: st_size 0, endless bytes
        {"problem": "<image>Find x.", "answer": "7", "images": [{"bytes": b64, "path": "x.png"}]},  # 4 written
        {"problem": "<image>Find x.", "answer": "7", "images": [{"bytes": "not base64!", "path": "x.png"}]},  # 5
        [1, 2, 3],  # 6: valid JSON, not an object
        b'{"problem": "<image>Find \xff x.", "answer": "1", "images": ["geo3k_12.png"]}',  # 7: not UTF-8
        b"{not json",  # 8
        b'{"problem": "<image>Find x.", "answer": NaN, "images": ["geo3k_12.png"]}',  # 9: pandas' missing value
        row(None),  # 10
        row("   "),  # 11
        row(["3", "4"]),  # 12
        row({"value": 3}),  # 13
        row(True),  # 14
        row(13),  # 15 written as "13"
        row(3.0),  # 16 written as "3"
        row("1", problem="<image>BOOM"),  # 17: a bug, simulated below
    ]
    src = jsonl(tmp_path / "train.jsonl", lines)
    real = pipeline.make_sample

    def buggy(key, row_index, problem, *args, **kwargs):
        if "BOOM" in problem:
            raise ZeroDivisionError("division by zero")
        return real(key, row_index, problem, *args, **kwargs)

    monkeypatch.setattr(pipeline, "make_sample", buggy)
    (s,) = run_preprocess(_sample_config(tmp_path, src, **{"shards.samples_per_shard": "6"}), progress=False)
    out = tmp_path / "out" / "geo3k" / "train"
    ss = ShardSet(out)
    reasons = {r["row"]: r["reason"] for r in ss.rejects()}
    assert reasons == {
        1: "processor", 2: "not-a-file", 3: "not-a-file", 5: "bad-image-entry", 6: "bad-row", 7: "bad-row", 8: "bad-row",
        9: "missing-field", 10: "missing-field", 11: "missing-field", 12: "bad-answer", 13: "bad-answer", 14: "bad-answer",
        17: "internal",
    }
    details = {r["row"]: r["detail"] for r in ss.rejects()}
    assert "aspect ratio" in details[1] and "directory" in details[2] and "UTF-8" in details[7]
    assert "ZeroDivisionError" in details[17] and "bug" in details[17]
    assert s.rows == len(lines) == s.written + sum(s.rejected.values()) and s.written == 4
    assert s.rejected["internal"] == 1 and any("internal" in line for line in s.lines())
    answers = [r["meta.json"]["answer"] for r in read_records(out)]
    assert answers == ["13", "7", "13", "3"]


def test_answers_are_decided_by_type():
    assert answer_text("5 \\sqrt { 3 }") == "5 \\sqrt { 3 }"
    assert [answer_text(x) for x in (13, 3.0, 2.5, np.int64(4), -0.125)] == ["13", "3", "2.5", "4", "-0.125"]
    for bad, reason in ((None, "missing-field"), (float("nan"), "missing-field"), ("", "missing-field"),
                        ([1], "bad-answer"), ({"a": 1}, "bad-answer"), (False, "bad-answer"), (float("inf"), "bad-answer")):
        with pytest.raises(Reject) as e:
            answer_text(bad)
        assert e.value.reason == reason, bad


def test_local_reads_are_bounded_by_bytes_read_and_regular_files_only(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    for path, reason in ((Path("/dev/zero"), "not-a-file"), (fifo, "not-a-file"), (tmp_path, "not-a-file"), (tmp_path / "no.png", "missing-image")):
        with pytest.raises(Reject) as e:
            read_local(path, 1000)
        assert e.value.reason == reason, path
    assert time.monotonic() - t0 < 2  # a FIFO without a writer does not block the open
    (tmp_path / "big.png").write_bytes(b"x" * 101)
    with pytest.raises(Reject) as e:
        read_local(tmp_path / "big.png", 100)
    assert e.value.reason == "too-many-bytes"
    assert read_local(tmp_path / "big.png", 101) == b"x" * 101


# ---------------------------------------------------------------- HTTP: deadline, connection reuse


def test_trickling_server_is_cut_at_the_whole_download_deadline(tmp_path):
    # one byte every 0.55 s never leaves the connection silent for a read timeout of 0.6 s; only the
    # wall-clock deadline (4 x 0.6 s) ends it, and at the deadline (2.4 s), not at the next byte after it
    cfg = FetchConfig(cache_dir=None, read_timeout=0.6, connect_timeout=1, retries=0)
    with FaultServer(tmp_path, trickle_seconds=0.55) as srv:
        t0 = time.monotonic()
        with pytest.raises(Reject) as e:
            fetch_image(f"{srv.url}/trickle.png", cfg)
        took = time.monotonic() - t0
    assert e.value.reason == "timeout" and "body not complete after 2.4s" in e.value.detail
    assert 2.4 <= took < 2.8, took


def test_downloads_reuse_one_connection_per_host(demo_data):
    cfg = FetchConfig(cache_dir=None)
    with FaultServer(demo_data / "images") as srv:
        for i in range(5):
            got = fetch_image(f"{srv.url}/img/train_{i:06d}.png", cfg)
            assert got.image.mode == "RGB"
        assert srv.connections == 1 and sum(srv.hits.values()) == 5


def test_downloads_use_the_proxy_named_in_the_environment(tmp_path, monkeypatch):
    for name in ("NO_PROXY", "no_proxy", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with FaultServer(tmp_path) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        cfg = FetchConfig(cache_dir=None, read_timeout=7.25)  # another client: the environment is read when one is made
        with pytest.raises(Reject) as e:
            fetch_image("http://images.example.invalid/a.png", cfg)
    assert e.value.reason == "http-4xx" and proxy.hits["http://images.example.invalid/a.png"] == 1


# ---------------------------------------------------------------- concurrent and killed runs


def _cli(cfg_file: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "geo3k", "preprocess", "-c", str(cfg_file), "-q", *args],
        env=env, cwd=cfg_file.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _write_cfg(path: Path, data: Path, out: Path, max_rows: int = 16, samples_per_shard: int = 4, **preprocess) -> Path:
    path.write_text(yaml.safe_dump({
        "source": {"files": {"train": str(data / "train.parquet")}, "splits": ["train"], "max_rows": max_rows},
        "preprocess": {"workers": 1, "fetch": {"cache_dir": None}, **preprocess},
        "shards": {"output_dir": str(out), "samples_per_shard": samples_per_shard},
    }))
    return path


def test_concurrent_runs_on_one_folder_all_finish(demo_data, tmp_path):
    """The multi-machine recipe run at once on one folder (--shards 0:2 and 2:4, two processes), while a
    whole-split run of the same config works beside them: all finish, cooperating (shards claimed by one run are
    skipped by the others); a run with other inputs refuses with one line and harms none of them."""
    out = tmp_path / "shards"
    cfg_file = _write_cfg(tmp_path / "pipeline.yaml", demo_data, out, max_rows=48, samples_per_shard=6)
    runs = [_cli(cfg_file, "--shards", "0:4"), _cli(cfg_file, "--shards", "4:8")]  # started together
    fp = out / "geo3k" / "train" / ".parts" / "fingerprint.json"
    deadline = time.time() + 90
    while not fp.exists() and time.time() < deadline:
        time.sleep(0.01)
    # while they write: a run with other inputs refuses, then a whole-split run joins in
    with pytest.raises(PreprocessError, match=r"different inputs[\s\S]*max_tokens: 4096 -> 2048[\s\S]*--force"):
        run_preprocess(load_config(cfg_file, ["preprocess.max_tokens=2048"]), progress=False)
    # and two identical whole-split runs, started together (in threads here: one start-up between them)
    results: list = []
    twins = [threading.Thread(target=lambda: results.extend(run_preprocess(load_config(cfg_file), progress=False))) for _ in range(2)]
    for t in twins:
        t.start()
    for t in twins:
        t.join(timeout=120)
    assert len(results) == 2
    for p in runs:
        stdout, stderr = p.communicate(timeout=120)
        assert p.returncode == 0 and "Traceback" not in stderr, stderr[-2000:]
    split = out / "geo3k" / "train"
    # whichever run completes the split writes the manifest; the others find it written
    ss = ShardSet(split)
    assert all(r.status in ("written", "up-to-date") for r in results)
    assert ss.manifest["counts"]["rows"] == 48 == ss.manifest["counts"]["written"]
    assert (split / "manifest.json").exists() and not (split / ".parts").exists() and not list(split.glob(".*.tmp"))
    clean = make_config(tmp_path / "clean", {"train": str(demo_data / "train.parquet")}, **{"source.max_rows": "48", "shards.samples_per_shard": "6"})
    run_preprocess(clean, progress=False)
    assert shard_hashes(split) == shard_hashes(tmp_path / "clean" / "geo3k" / "train")


def test_waiting_on_a_shard_ends_when_a_concurrent_run_completed_the_split(tmp_path):
    """A shard claimed by another run is waited on through its lock in `.parts`; a run that completes the split
    writes the manifest, then removes `.parts`. A waiter that comes after both ends without error (it used to fail
    opening the lock: No such file or directory)."""
    from types import SimpleNamespace

    out = tmp_path / "train"
    out.mkdir()
    (out / pipeline.MANIFEST).write_text("{}")  # completed by a concurrent run, `.parts` already gone
    cfg = SimpleNamespace(shards=SimpleNamespace(samples_per_shard=2), preprocess=SimpleNamespace(verify=False))
    src = SimpleNamespace(num_rows=4, base_dir=tmp_path, rows=lambda a, b: [])
    claimed = lambda cfg, tasks: iter([{"index": t.index, "claimed_elsewhere": True} for t in tasks])  # noqa: E731
    assert pipeline._run_shards(cfg, src, out, [0, 1], False, "train", claimed) == 0
    assert not (out / pipeline.PARTS).exists()


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d.name))
    found, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            found.add(c)
            todo.append(c)
    return found


def _running(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_kill_9_of_the_main_process_leaves_no_worker(demo_data, tmp_path):
    cfg_file = _write_cfg(tmp_path / "pipeline.yaml", demo_data, tmp_path / "shards", max_rows=48, samples_per_shard=2, workers=2)
    main = _cli(cfg_file)
    parts = tmp_path / "shards" / "geo3k" / "train" / ".parts"
    deadline = time.time() + 90
    while time.time() < deadline and not list(parts.glob("0*.json")):
        time.sleep(0.05)
    family = _descendants(main.pid)
    assert len(family) >= 3, family  # the fork server and two workers at least
    os.kill(main.pid, signal.SIGKILL)
    main.communicate()
    deadline = time.time() + 5
    while time.time() < deadline and any(_running(p) for p in family):
        time.sleep(0.1)
    assert not [p for p in family if _running(p)]
    # and a rerun finishes the split from what the killed run left
    (s,) = run_preprocess(load_config(cfg_file), progress=False)
    assert s.status == "written" and s.rows == 48 == s.written + sum(s.rejected.values())


def test_startup_removes_only_stale_temps_of_this_machine(tmp_path):
    host = socket.gethostname()
    (tmp_path / ".parts").mkdir()
    dead = tmp_path / f".shard-000001.tar.{host}.999999999.tmp"  # beyond pid_max: no such process
    alive = tmp_path / f".shard-000002.tar.{host}.{os.getpid()}.tmp"
    foreign = tmp_path / ".shard-000003.tar.other-machine.12.tmp"
    legacy = tmp_path / ".parts" / ".000004.json.tmp"
    for p in (dead, alive, foreign, legacy):
        p.write_bytes(b"x")
    pipeline._remove_stale_temps(tmp_path)
    assert not dead.exists() and not legacy.exists() and alive.exists() and foreign.exists()


# ---------------------------------------------------------------- what decides a sample is in the fingerprint


def test_image_root_and_image_bytes_decide_reuse(tmp_path):
    root = tmp_path / "images"
    shutil.copytree(SAMPLE_DIR / "images", root)
    src = SAMPLE_DIR / "problems.jsonl"
    over = {"source.image_key": "image", "source.image_root": str(root), "shards.samples_per_shard": "4", "source.max_rows": "8"}
    cfg = make_config(tmp_path / "out", {"train": str(src)}, **over)
    run_preprocess(cfg, shard_range="0:1", progress=False)  # a partial run: shard 0 done
    first = json.loads(src.read_text().splitlines()[0])["image"]
    with Image.open(root / first) as im:
        im.convert("RGB").rotate(90, expand=True).save(root / first)
    with pytest.raises(PreprocessError, match=r"1 image\(s\) changed .*row 0.*--force"):
        run_preprocess(cfg, progress=False)  # resuming would pair old pixels of row 0 with new ones elsewhere
    (s,) = run_preprocess(cfg, force=True, progress=False)
    assert s.status == "written"
    moved = make_config(tmp_path / "out", {"train": str(src)}, **{**over, "source.image_root": str(SAMPLE_DIR / "images")})
    with pytest.raises(PreprocessError, match=r"source.image_root: .* -> "):
        run_preprocess(moved, progress=False)
    assert run_preprocess(cfg, progress=False)[0].status == "up-to-date"
    with Image.open(root / first) as im:
        im.convert("RGB").rotate(90, expand=True).save(root / first)
    with pytest.raises(PreprocessError, match="changed since their shards were written"):
        run_preprocess(cfg, progress=False)


# ---------------------------------------------------------------- the fast path and its check


def test_verify_checks_every_row_and_a_fast_path_error_never_reaches_a_shard(tmp_path, monkeypatch):
    src = SAMPLE_DIR / "problems.jsonl"
    over = {"source.image_key": "image", "source.image_root": str(SAMPLE_DIR / "images"), "shards.samples_per_shard": "4"}
    (s,) = run_preprocess(make_config(tmp_path / "a", {"train": str(src)}, **over), progress=False)
    assert s.checked == 1 and s.mismatched == 0  # row 0 of 10 (one row in 64 by default)
    import preprocess.samples as samples

    real = samples.image_patches

    def off_by_one(images, proc):
        patches, grid = real(images, proc)
        return patches ^ np.uint8(1), grid

    monkeypatch.setattr(samples, "image_patches", off_by_one)
    (v,) = run_preprocess(make_config(tmp_path / "b", {"train": str(src)}, **over, **{"preprocess.verify": "true"}), progress=False)
    assert v.checked == 10 and v.mismatched == 10 and any("--verify" in line for line in v.lines())
    b = tmp_path / "b" / "geo3k" / "train"
    assert shard_hashes(b) == shard_hashes(tmp_path / "a" / "geo3k" / "train")  # the processor's output was kept
    monkeypatch.setattr(samples, "image_patches", real)
    from shared.presets import load_processor

    proc = load_processor("qwen3-vl-2b")
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    for rec, r in zip(read_records(b), rows):
        assert_record_exact(rec, [Image.open(SAMPLE_DIR / "images" / r["image"]).convert("RGB")], proc)


# ---------------------------------------------------------------- errors a user can fix: one line, early


@pytest.mark.parametrize(
    "text, expect",
    [
        (b"source:\n  files: {train: a.parquet\n", r"pipeline.yaml:\d+:\d+: YAML error: .*fix the YAML syntax"),
        (b"source:\n\tsplits: [train]\n", r"pipeline.yaml:2:1: YAML error: .*indent with spaces, not tabs"),
        (b"dataset: g\xe9o3k\n", r"not UTF-8 text \(byte 0xe9 at offset 10\): save the file as UTF-8"),
        (b"dataset: !!python/object/apply:os.system [echo hi]\n", r"pipeline.yaml:1:10: .*no !!python tags"),
        (b"preprocess:\n  fetch: {backoff: -1}\n", r"preprocess.fetch.backoff: must be >= 0 seconds \(got -1\)"),
    ],
)
def test_config_mistakes_are_one_line(tmp_path, text, expect):
    (tmp_path / "pipeline.yaml").write_bytes(text)
    with pytest.raises(ConfigError, match=expect) as e:
        load_config(tmp_path / "pipeline.yaml")
    assert "\n" not in str(e.value)


def test_cli_prints_one_error_line_without_a_traceback(tmp_path):
    (tmp_path / "pipeline.yaml").write_bytes(b"source:\n\tsplits: [train]\n")
    p = _cli(tmp_path / "pipeline.yaml")
    stdout, stderr = p.communicate(timeout=60)
    assert p.returncode == 2 and stderr.count("\n") == 1 and stderr.startswith("error: ") and "tabs" in stderr


def _never_load(*args, **kwargs):
    raise AssertionError("the processor must not load before the output folder is checked")


def test_output_folder_problems_are_one_line_before_any_work(tmp_path, monkeypatch):
    src = jsonl(tmp_path / "train.jsonl", [row("13")])
    monkeypatch.setattr(pipeline, "load_processor", _never_load)
    (tmp_path / "file").write_text("not a folder")
    cfg = make_config(tmp_path / "file", {"train": str(src)})
    with pytest.raises(PreprocessError, match=r"a file stands where a folder must be.*shards.output_dir") as e:
        run_preprocess(cfg, progress=False)
    assert "\n" not in str(e.value)

    real_write = Path.write_bytes

    def read_only(self, data):
        if ".write-probe." in self.name:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_write(self, data)

    monkeypatch.setattr(Path, "write_bytes", read_only)
    with pytest.raises(PreprocessError, match=r"cannot write .*Read-only file system.*set shards.output_dir"):
        run_preprocess(make_config(tmp_path / "ro", {"train": str(src)}), progress=False)
    monkeypatch.setattr(Path, "write_bytes", real_write)

    monkeypatch.setattr(pipeline.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 10**6, 10**6))
    with pytest.raises(PreprocessError, match=r"only 1 MB free .*free space or set shards.output_dir"):
        run_preprocess(make_config(tmp_path / "full", {"train": str(src)}), progress=False)


def test_disk_full_during_the_run_is_one_line(tmp_path, monkeypatch):
    src = jsonl(tmp_path / "train.jsonl", [row("13"), row("14")])

    def full(self, sample):
        raise OSError(errno.ENOSPC, "No space left on device", str(self.tmp))

    monkeypatch.setattr(pipeline.ShardWriter, "write", full)
    with pytest.raises(PreprocessError, match=r"^disk full writing .*free space.*finished shards are kept$"):
        run_preprocess(_sample_config(tmp_path, src), progress=False)
    assert not list((tmp_path / "out" / "geo3k" / "train").glob(".*.tmp"))  # the partial shard is gone
