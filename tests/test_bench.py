"""bench/: the throughput summary counts MFU against the datasheet peak, and compare_runs reports losses and scaling."""

import json
import math
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_throughput  # noqa: E402
import compare_runs  # noqa: E402
from train.flops import Peaks  # noqa: E402


def test_throughput_summary_uses_the_datasheet_peak_and_the_measured_one_beside_it():
    r = bench_throughput.Result("qwen3-vl-2b", "megatron", step_s=[1.0, 3.0], data_s=[0.01, 0.03],
                                counts=[(20_000, 20_480, 300e12, 5), (20_000, 20_480, 300e12, 5)])
    s = r.summary(Peaks("NVIDIA H200", 989.4, 775.0))
    assert s["step_ms"] == 2000 and s["tokens_per_s"] == 10_000 and s["real_fraction"] == pytest.approx(20_000 / 20_480)
    assert s["tflops"] == pytest.approx(150) and s["mfu"] == pytest.approx(150 / 989.4)
    assert s["mfu_measured_peak"] == pytest.approx(150 / 775) and s["data_wait"] == pytest.approx(0.01)
    failed = bench_throughput.Result("qwen3-vl-8b", "megatron", status="OOM")
    table = bench_throughput.markdown_table([r, failed], Peaks("NVIDIA H200", 989.4, 775.0))
    assert "| qwen3-vl-2b | megatron | ok | 2000 | 5.0 | 20,000 | 10,000 | - | 97.7% | 150 | 15.2% | 19.4% | 1.00% | - |" in table
    assert "| qwen3-vl-8b | megatron | OOM | - |" in table


def test_compare_runs_reports_loss_differences_and_scaling(tmp_path, monkeypatch, capsys):
    for name, tps, losses in (("one", 100, [2.0, 1.5, 1.2]), ("dp2", 190, [2.0, 1.5, 1.212])):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(
            json.dumps({"kind": "train", "step": i + 1, "loss": x, "tokens_per_s": tps, "mfu": 0.2}) + "\n" for i, x in enumerate(losses)))
    monkeypatch.setattr(sys, "argv", ["compare_runs.py", str(tmp_path), "one", "dp2:2", "missing"])
    compare_runs.main()
    out = capsys.readouterr().out
    assert "| 3 | 1.2000 | 1.2120 |  |" in out
    assert "| dp2 | 2 | 3 | 1.00e-02 | 190 | 95.0% | 20.0% | 0.0 |" in out
    assert "| missing | 1 | 0 | (no metrics) |" in out


def test_the_transformers_baseline_trains_padded_batches_of_the_packed_steps_samples(demo_shards, tmp_path, monkeypatch):
    """The `transformers` variant through main() on CPU: finite losses, the real tokens of the loader's timed step
    (the same samples as the packed variants), padding computed but not counted, and the "x baseline" column."""
    from train.data import DataConfig, build_loader

    for name in ("CUDA_VISIBLE_DEVICES", "MASTER_ADDR", "MASTER_PORT"):  # main() and init_distributed set them
        monkeypatch.setenv(name, os.environ.get(name, ""))
    out = tmp_path / "throughput.json"
    bench_throughput.main(["--shards", str(demo_shards / "train"), "--device", "cpu", "--presets", "tiny-qwen3-vl", "--steps", "1",
                           "--warmup", "1", "--global-batch-size", "8", "--variants", "transformers", "--out", str(out)])
    (r,) = json.loads(out.read_text())["results"]
    assert r["status"] == "ok" and len(r["losses"]) == 2 and all(math.isfinite(x) for x in r["losses"])
    cfg = DataConfig(global_batch_size=8, num_workers=0)
    packed, padded = (iter(loader(demo_shards / "train", cfg)) for loader in (build_loader, bench_throughput.PaddedLoader))
    packed, padded = [next(packed), next(packed)][1], [next(padded), next(padded)][1]  # the timed step
    ((real, computed, flops, mbs),) = r["counts"]
    assert real == packed.num_tokens == padded.num_tokens == r["tokens_per_step"] and sorted(padded.keys) == sorted(packed.keys)
    shapes = [(len(mb.keys), mb.max_seqlen) for mb in padded.micro_batches]  # B x longest, within the budget
    assert computed == sum(b * n for b, n in shapes) > real and all(b * n <= 4096 for b, n in shapes) and mbs == len(shapes) and flops > 0
    table = bench_throughput.markdown_table([bench_throughput.Result(**{k: r[k] for k in ("preset", "variant", "status", "losses", "step_s",
                                                                                          "data_s", "counts")})], Peaks("cpu", None, None))
    assert "| real tokens/s | x baseline |" in table and f"| {r['tokens_per_s']:,.0f} | 1.00 | {real / computed:.1%} |" in table


def test_gap_analysis_blames_the_host_op_running_when_the_gpu_went_idle():
    """Two kernels with 100 us between them, during which the host ran `aten::item` inside a step annotation:
    the gap is blamed on the innermost op, and busy time is the union of the kernels (overlaps counted once)."""
    from gpu_gaps import analyse

    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "k1", "ts": 0, "dur": 50},
        {"ph": "X", "cat": "kernel", "name": "k1b", "ts": 20, "dur": 40},
        {"ph": "X", "cat": "kernel", "name": "k2", "ts": 160, "dur": 40},
        {"ph": "X", "cat": "user_annotation", "name": "step", "ts": 0, "dur": 300},
        {"ph": "X", "cat": "cpu_op", "name": "aten::item", "ts": 55, "dur": 110},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 58, "dur": 100},
    ]}
    report = analyse(trace)
    assert "device busy 0.1 ms of a 0.2 ms span (50.0%); 1 gaps >= 5 us total 0.1 ms" in report
    assert "| aten::item | 0.1 | 1 |" in report and "| cudaStreamSynchronize | 0.1 | 1 |" in report
