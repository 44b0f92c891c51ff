"""`geo3k train --backend fsdp` and `geo3k export` where Megatron-Core cannot be imported (it is an optional extra).

A folder put first on PYTHONPATH holds a `megatron` package whose import fails and appends the importing stack to
a file: the FSDP run (2 processes: the data-parallel reductions of the logs and eval) trains, checkpoints, evals
and exports without a single attempt, caught or not, to import Megatron-Core.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO, geo3k

BLOCKER = '''import os
with open(os.environ["GEO3K_MEGATRON_IMPORTS"], "a") as f:
    import traceback
    f.write("".join(traceback.format_stack()) + "\\n")
raise ImportError("megatron-core is not installed here (tests/test_fsdp_without_megatron.py)")
'''


def test_fsdp_trains_and_exports_without_megatron(demo_shards, tmp_path):
    (tmp_path / "blocker" / "megatron").mkdir(parents=True)
    (tmp_path / "blocker" / "megatron" / "__init__.py").write_text(BLOCKER)
    imports = tmp_path / "megatron-imports.txt"
    env = {"PYTHONPATH": os.pathsep.join([str(tmp_path / "blocker"), str(REPO)]), "GEO3K_MEGATRON_IMPORTS": str(imports)}
    # the blocker works: importing megatron fails, and the attempt is written down
    probe = subprocess.run([sys.executable, "-c", "import megatron.core"], env={**os.environ, **env}, capture_output=True, text=True)
    assert probe.returncode != 0 and "megatron-core is not installed here" in probe.stderr
    assert imports.exists()
    imports.unlink()

    out = tmp_path / "run"
    proc = geo3k(
        "train",
        "-c", str(REPO / "examples" / "tiny-cpu.yaml"),
        "--set", f"train.shards={demo_shards / 'train'}",
        "--set", f"train.eval_shards={demo_shards / 'test'}",
        "--set", f"train.output_dir={out}",
        "--set", "train.global_batch_size=4",
        "--set", "train.train_iters=2",
        "--set", "train.save_interval=1",
        "--set", "train.eval_interval=2",
        "--set", "train.eval_samples=2",
        "--backend", "fsdp", "--nproc", "2",
        cwd=tmp_path, threads=1, env=env,
    )
    assert "world 2 (tp 1, dp 2)" in proc.stdout and "eval @ step 2" in proc.stdout
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "train"] == [1, 2]
    assert [r["step"] for r in records if r["kind"] == "eval"] == [2]
    state = json.loads((out / "checkpoints" / "step-0000002" / "trainer_state.json").read_text())
    assert state["backend"] == "fsdp" and state["data_parallel"] == 2

    geo3k("export", str(out), "--out", str(tmp_path / "hf"), "--dtype", "float32", cwd=tmp_path, env=env)
    assert (tmp_path / "hf" / "model.safetensors").exists() and (tmp_path / "hf" / "config.json").exists()
    assert not imports.exists(), f"an import of Megatron-Core was attempted:\n{imports.read_text()[-3000:]}"
