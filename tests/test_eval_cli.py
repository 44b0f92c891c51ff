"""`geo3k eval MODEL --shards DIR`: loss, image gain, greedy answers and accuracy of any model on test shards.

The transformers checkpoint a tiny run starts from is scored (a JSONL line per problem of the test split). The
run trains 2 steps and evaluates at its end; `geo3k eval` of the run folder must give the run's
own eval figures (the same weights, the same data), and so must its float32 export, answer for answer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, geo3k

NEW = 3
SAMPLES = 4  # answered in the run's comparisons (the start checkpoint answers the whole split)


def _eval(model, shards, out, cwd, *extra):
    proc = geo3k("eval", str(model), "--shards", str(shards), "--max-new-tokens", str(NEW), "--out", str(out),
                 "-c", str(REPO / "examples" / "tiny-cpu.yaml"), *extra, cwd=cwd)
    return proc


def test_eval_a_checkpoint_a_run_and_its_export(demo_shards, tiny_checkpoint, tmp_path):
    test = demo_shards / "test"
    from shared.manifest import ShardSet

    num_test = ShardSet(test).num_samples

    # the start checkpoint (a transformers folder): JSON result and one JSONL line per problem
    res = json.loads(_eval(tiny_checkpoint, test, tmp_path / "base.jsonl", tmp_path, "--json").stdout)
    lines = [json.loads(x) for x in (tmp_path / "base.jsonl").read_text().splitlines()]
    assert res["answered"] == len(lines) == res["samples"] == num_test
    assert {"key", "answer", "generated", "correct", "new_tokens"} <= set(lines[0])
    assert all(1 <= r["new_tokens"] <= NEW for r in lines)
    assert res["accuracy"] == sum(r["correct"] for r in lines) / len(lines)
    assert res["loss"] > 0 and "image_gain" in res

    # a run that evaluates at its end, then geo3k eval of that run folder and of its export
    run = tmp_path / "run"
    geo3k("train", "-c", str(REPO / "examples" / "tiny-cpu.yaml"), "--set", f"model.name_or_path={tiny_checkpoint}",
          "--set", "train.random_init=false", "--set", f"train.shards={demo_shards / 'train'}",
          "--set", f"train.eval_shards={test}", "--set", f"train.output_dir={run}", "--set", "train.global_batch_size=4",
          "--set", "train.train_iters=2", "--set", "train.save_interval=2", "--set", "train.eval_interval=2",
          "--set", f"train.eval_samples={SAMPLES}", "--set", f"train.eval_max_new_tokens={NEW}", cwd=tmp_path)
    (logged,) = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "eval"]
    proc = _eval(run, test, tmp_path / "run.jsonl", tmp_path, "--samples", str(SAMPLES))
    table = dict(line.split(None, 1) for line in proc.stdout.strip().splitlines()[-7:] if line.strip())
    assert table["loss"].startswith(f"{logged['loss']:.4f}"), (table, logged)
    assert f"({round(logged['accuracy'] * logged['answered'])} of {logged['answered']} answered correctly)" in table["accuracy"]
    geo3k("export", str(run), "--out", str(tmp_path / "export"), "--dtype", "float32", cwd=tmp_path)
    exported = json.loads(_eval(tmp_path / "export", test, tmp_path / "export.jsonl", tmp_path, "--samples", str(SAMPLES), "--json").stdout)
    assert abs(exported["loss"] - logged["loss"]) <= 1e-5 * logged["loss"]
    assert abs(exported["image_gain"] - logged["image_gain"]) <= 1e-5 * logged["loss"]
    assert (tmp_path / "export.jsonl").read_text() == (tmp_path / "run.jsonl").read_text()
    assert res["loss"] != exported["loss"]  # two steps of training changed the model


def test_eval_refuses_a_model_without_weights_before_loading_anything(demo_shards, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "geo3k", "eval", "tiny-qwen3-vl", "--shards", str(demo_shards / "test")],
                          cwd=tmp_path, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: the preset 'tiny-qwen3-vl' has no pretrained weights")
