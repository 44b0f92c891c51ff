"""The preprocess stage end to end: faults, exactness against the transformers processor, reruns, resume."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import webdataset as wds
import yaml
from PIL import Image

from preprocess.images import Reject, fetch_image, to_rgb
from preprocess.pipeline import PreprocessError, run_preprocess
from preprocess.samples import build_messages, make_sample
from shared.config import FetchConfig, PreprocessConfig
from shared.manifest import ShardSet, sha256_file
from shared.presets import load_processor
from shared.schema import decode_sample, encode_sample, normalize_patches
from tests.conftest import REPO, SAMPLE_DIR, make_config
from tests.fault_server import FaultServer

# ---------------------------------------------------------------- helpers


def reference(processor, problem: str, answer: str, images: list[Image.Image]) -> dict:
    """What transformers itself makes of the conversation: the ground truth every record must equal."""
    parts = problem.split("<image>")
    content = []
    for i, text in enumerate(parts):
        if text:
            content.append({"type": "text", "text": text})
        if i < len(images):
            content.append({"type": "image", "image": images[i]})
    messages = [{"role": "user", "content": content}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return processor.apply_chat_template(messages, tokenize=True, return_dict=True, return_tensors="np")


def assert_record_exact(rec: dict, images: list[Image.Image], proc) -> None:
    meta = rec["meta.json"]
    ref = reference(proc.processor, meta["problem"], meta["answer"], images)
    np.testing.assert_array_equal(rec["input_ids.npy"], ref["input_ids"][0])
    np.testing.assert_array_equal(rec["image_grid_thw.npy"], ref["image_grid_thw"])
    import io

    import zstandard

    patches = np.load(io.BytesIO(zstandard.ZstdDecompressor().decompress(rec["patches.npy.zst"])), allow_pickle=False)
    assert np.abs(normalize_patches(patches, proc.pixel_spec) - ref["pixel_values"]).max() <= 1e-6
    # the loss mask covers exactly the answer and the closing <|im_end|>
    masked = proc.tokenizer.decode(rec["input_ids.npy"][rec["loss_mask.npy"] == 1])
    assert masked == f"{meta['answer']}<|im_end|>"


def read_records(split_dir: Path) -> list[dict]:
    urls = sorted(glob.glob(str(split_dir / "shard-*.tar")))
    return list(wds.WebDataset(urls, shardshuffle=False).decode())


def shard_hashes(split_dir: Path) -> dict[str, str]:
    names = sorted(p.name for p in split_dir.glob("shard-*.tar")) + ["index.parquet", "manifest.json", "rejects.jsonl"]
    return {n: sha256_file(split_dir / n) for n in names}


# ---------------------------------------------------------------- units


def test_messages_place_images_at_placeholders():
    cfg = PreprocessConfig(response_template="Answer: \\boxed{{{answer}}}")
    msgs = build_messages("<image>Find x in <image>.", "13", 2, cfg)
    assert [p["type"] for p in msgs[0]["content"]] == ["image", "text", "image", "text"]
    assert msgs[1]["content"][0]["text"] == "Answer: \\boxed{13}"
    with pytest.raises(Reject) as e:
        build_messages("<image>Find x.", "13", 2, cfg)
    assert e.value.reason == "image-count-mismatch"


def test_transparent_diagram_becomes_white_not_black():
    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    img.putpixel((1, 1), (255, 0, 0, 255))
    rgb = to_rgb(img)
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255) and rgb.getpixel((1, 1)) == (255, 0, 0)


def test_every_kind_of_image_entry(tmp_path):
    png = tmp_path / "a.png"
    Image.new("RGB", (30, 20), "red").save(png)
    cfg = FetchConfig(cache_dir=None)
    for entry in (str(png), png.as_uri(), "a.png", {"bytes": png.read_bytes(), "path": "a.png"}, {"path": str(png)}):
        got = fetch_image(entry, cfg, base_dir=tmp_path)
        assert got.image.size == (30, 20) and got.image.mode == "RGB"
    for entry, reason in (("ftp://x/a.png", "unsupported-scheme"), ("nope.png", "missing-image"), ({}, "missing-image")):
        with pytest.raises(Reject) as e:
            fetch_image(entry, cfg, base_dir=tmp_path)
        assert e.value.reason == reason


def test_too_long_sample_is_rejected_with_its_length():
    proc = load_processor("qwen3-vl-2b")
    img = Image.open(SAMPLE_DIR / "images" / "geo3k_12.png").convert("RGB")
    with pytest.raises(Reject) as e:
        make_sample("k", 0, "<image>Find x.", "13", [img], [{}], proc, PreprocessConfig(max_tokens=64))
    assert e.value.reason == "too-long" and "tokens > preprocess.max_tokens 64" in e.value.detail


def test_presets_share_their_family_processor_files():
    from shared.presets import FAMILY_DIR, preset_files, preset_names

    for name in preset_names():
        files = preset_files(name)
        assert [f.name for f in files] == ["chat_template.jinja", "config.json", "preprocessor_config.json"], name
        family = "qwen2.5-vl" if name.startswith("qwen2.5-vl") else "qwen3-vl"
        assert files[0] == FAMILY_DIR / family / "chat_template.jinja" and files[2].parent == FAMILY_DIR / family


@pytest.mark.parametrize("preset", ["qwen3-vl-2b", "qwen2.5-vl-3b"])
def test_real_geo3k_problems_are_token_exact(preset):
    """The ten real problems, through both processor families, equal transformers' own output."""
    proc = load_processor(preset)
    for line in (SAMPLE_DIR / "problems.jsonl").read_text().splitlines():
        row = json.loads(line)
        img = to_rgb(Image.open(SAMPLE_DIR / "images" / row["image"]))
        s, enc = make_sample("k", 0, row["problem"], row["answer"], [img], [{}], proc, PreprocessConfig(), check=True)
        assert enc.checked and enc.mismatch is None  # the fast path equals the full processor on this row
        members = encode_sample(s)
        back = decode_sample("k", members)
        rec = {
            "input_ids.npy": back.input_ids,
            "loss_mask.npy": back.loss_mask,
            "image_grid_thw.npy": back.image_grid_thw,
            "patches.npy.zst": members["patches.npy.zst"],
            "meta.json": back.meta,
        }
        assert_record_exact(rec, [img], proc)


# ---------------------------------------------------------------- the stage over HTTP, with faults


def test_http_source_with_faults(demo_data, tmp_path):
    good = [f"train_{i:06d}.png" for i in range(6)]
    src = pq.read_table(demo_data / "train.parquet").to_pylist()[:6]
    with FaultServer(demo_data / "images", big_bytes=300_000, huge_side=6000) as srv:
        rows = [{"problem": r["problem"], "answer": r["answer"], "images": [f"{srv.url}/img/{g}"]} for r, g in zip(src, good)]
        rows.append({"problem": src[0]["problem"], "answer": src[0]["answer"], "images": [f"{srv.url}/flaky/{good[0]}"]})
        faults = {
            "missing.png": "http-4xx",
            "stall.png": "timeout",
            "reset.png": "connection",
            "truncated.png": "decode",
            "notimage.png": "decode",
            "big.png": "too-many-bytes",
            "huge.png": "too-many-pixels",
        }
        for name in faults:
            rows.append({"problem": "<image>Find x.", "answer": "1", "images": [f"{srv.url}/{name}"]})
        rows.append({"problem": "Find x.", "answer": "1", "images": [f"{srv.url}/img/{good[1]}"]})  # no placeholder
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "train.parquet")
        cfg = make_config(
            tmp_path / "shards",
            {"train": str(tmp_path / "train.parquet")},
            **{
                "preprocess.fetch.read_timeout": "0.5",
                "preprocess.fetch.retries": "1",
                "preprocess.fetch.backoff": "0.01",
                "preprocess.fetch.max_bytes": "200000",
                "preprocess.fetch.max_image_pixels": "10000000",
                "preprocess.fetch.cache_dir": str(tmp_path / "cache"),
                "shards.samples_per_shard": "5",
            },
        )
        (summary,) = run_preprocess(cfg, progress=False)
        assert srv.hits["/missing.png"] == 1  # a 404 is final: never retried
        assert srv.hits[f"/flaky/{good[0]}"] == 2  # a 500 is retried, and the retry succeeds
        assert srv.hits["/stall.png"] == 2 and srv.hits["/reset.png"] == 2
        hits_before = sum(srv.hits.values())

        out = tmp_path / "shards" / "geo3k" / "train"
        ss = ShardSet(out)
        rejects = {r["row"]: r["reason"] for r in ss.rejects()}
        assert rejects == {7 + i: reason for i, reason in enumerate(faults.values())} | {14: "image-count-mismatch"}
        assert summary.rows == len(rows) == summary.written + sum(summary.rejected.values())
        assert ss.manifest["counts"]["written"] == 7

        proc = load_processor("qwen3-vl-2b")
        records = read_records(out)  # plain webdataset reads the shards
        assert [r["__key__"] for r in records] == [f"{i:08d}" for i in range(7)]
        for rec in records:
            name = rec["meta.json"]["images"][0]["source"].rsplit("/", 1)[-1]
            assert_record_exact(rec, [to_rgb(Image.open(demo_data / "images" / name))], proc)

        # a second run is a no-op: no downloads, no writes
        before = shard_hashes(out)
        (again,) = run_preprocess(cfg, progress=False)
        assert again.status == "up-to-date" and sum(srv.hits.values()) == hits_before
        assert shard_hashes(out) == before


def test_real_sample_shards(sample_shards):
    ss = ShardSet(sample_shards)
    assert ss.manifest["counts"]["written"] == 10 and ss.rejects() == []
    proc = load_processor("qwen3-vl-2b")
    rows = [json.loads(x) for x in (SAMPLE_DIR / "problems.jsonl").read_text().splitlines()]
    for rec, row in zip(read_records(sample_shards), rows):
        assert rec["meta.json"]["answer"] == row["answer"]
        assert_record_exact(rec, [to_rgb(Image.open(SAMPLE_DIR / "images" / row["image"]))], proc)


# ---------------------------------------------------------------- reruns, determinism, resume


def test_changed_inputs_are_refused_and_force_rebuilds(demo_data, tmp_path):
    files = {"train": str(demo_data / "test.parquet")}
    cfg = make_config(tmp_path, files, **{"shards.samples_per_shard": "4"})
    run_preprocess(cfg, progress=False)
    changed = make_config(tmp_path, files, **{"shards.samples_per_shard": "4", "preprocess.max_tokens": "2048"})
    with pytest.raises(PreprocessError, match=r"options.max_tokens: 4096 -> 2048[\s\S]*--force"):
        run_preprocess(changed, progress=False)
    (s,) = run_preprocess(changed, force=True, progress=False)
    assert s.status == "written" and ShardSet(tmp_path / "geo3k" / "train").manifest["fingerprint_inputs"]["options"]["max_tokens"] == 2048


def test_train_final_newline_adds_the_newline_after_im_end_and_changes_the_fingerprint(demo_data, tmp_path):
    files = {"train": str(demo_data / "test.parquet")}
    extra = {"shards.samples_per_shard": "4", "source.max_rows": "4"}
    run_preprocess(make_config(tmp_path / "ours", files, **extra), progress=False)
    run_preprocess(make_config(tmp_path / "peers", files, **extra, **{"preprocess.train_final_newline": "true"}), progress=False)
    ours, peers = ShardSet(tmp_path / "ours" / "geo3k" / "train"), ShardSet(tmp_path / "peers" / "geo3k" / "train")
    assert ours.fingerprint != peers.fingerprint
    assert "train_final_newline" not in ours.manifest["fingerprint_inputs"]["options"]  # older shards keep theirs
    tok = load_processor("qwen3-vl-2b").tokenizer
    im_end, newline = tok.convert_tokens_to_ids("<|im_end|>"), tok("\n", add_special_tokens=False)["input_ids"]
    for a, b in zip(ours.iter_samples(), peers.iter_samples()):
        assert np.array_equal(a.input_ids, b.input_ids)
        last = int(np.flatnonzero(a.loss_mask)[-1])
        assert a.input_ids[last] == im_end and [int(a.input_ids[last + 1])] == newline and last + 2 == a.num_tokens
        assert b.loss_mask[last + 1] == 1 and np.array_equal(b.loss_mask[: last + 1], a.loss_mask[: last + 1])
        assert b.meta["num_loss_tokens"] == a.meta["num_loss_tokens"] + 1


def test_output_is_byte_identical_across_worker_counts(demo_data, tmp_path):
    files = {"train": str(demo_data / "train.parquet")}
    one = make_config(tmp_path / "one", files, **{"shards.samples_per_shard": "12"})
    two = make_config(tmp_path / "two", files, **{"shards.samples_per_shard": "12", "preprocess.workers": "2"})
    run_preprocess(one, progress=False)
    run_preprocess(two, progress=False)
    a, b = shard_hashes(tmp_path / "one" / "geo3k" / "train"), shard_hashes(tmp_path / "two" / "geo3k" / "train")
    assert len(a) == 4 + 3 and a == b


def test_kill_9_resumes_without_redoing_finished_shards(demo_data, tmp_path):
    cfg_file = tmp_path / "pipeline.yaml"
    out = tmp_path / "shards"
    cfg_file.write_text(
        yaml.safe_dump(
            {
                "source": {"files": {"train": str(demo_data / "train.parquet")}, "splits": ["train"]},
                "preprocess": {"workers": 1, "fetch": {"cache_dir": None}},
                "shards": {"output_dir": str(out), "samples_per_shard": 2},
            }
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "geo3k", "preprocess", "-c", str(cfg_file), "-q"], env=env, cwd=tmp_path)
    parts = out / "geo3k" / "train" / ".parts"
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("0*.json"))) < 3:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    split = out / "geo3k" / "train"
    finished = {p.stem for p in parts.glob("0*.json")}
    assert 3 <= len(finished) < 24 and not (split / "manifest.json").exists()
    # whatever is in view under a shard name is complete: only finished shards (or one whose part file
    # was not yet written) carry the name; a shard being written is hidden as .shard-*.tar.tmp
    visible = {p.name[6:12] for p in split.glob("shard-*.tar")}
    assert finished <= visible and len(visible - finished) <= 1

    from shared.config import load_config

    (s,) = run_preprocess(load_config(cfg_file), progress=False)
    assert s.status == "written" and s.shards_done_now == 24 - len(finished)
    clean = load_config(cfg_file, [f"shards.output_dir={tmp_path / 'clean'}"])
    run_preprocess(clean, progress=False)
    assert shard_hashes(split) == shard_hashes(tmp_path / "clean" / "geo3k" / "train")
