"""Where training feedback goes: a live line, metrics.jsonl, TensorBoard, Weights & Biases, a loss curve.

A resumed run continues the history of the checkpoint it resumed from: metrics.jsonl is cut back to that step
(what was logged after it is trained again), and TensorBoard purges its later events, so every step appears
once in the file, in the event files and in loss.png.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from shared.errors import UserError
from train.checkpoints import atomic_write_text


class MetricsError(UserError, ValueError):
    """A metrics.jsonl that cannot be continued; the message says which line and what to do."""


def read_history(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line that is not a JSON record is an error naming it."""
    if not path.exists():
        return []
    records = []
    lines = path.read_text(errors="replace").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and "kind" in rec
        except ValueError:
            ok = False
        if not ok:
            cut = "is cut short (the run was stopped while writing it)" if i == len(lines) else "is not a metrics record"
            raise MetricsError(
                f"{path} line {i} {cut}: {line[:60]!r}; delete that line (or the file, losing the history) and resume again"
            )
        records.append(rec)
    return records


def _fmt_duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsLogger:
    """Rank 0 only; other ranks get a logger that does nothing."""

    def __init__(self, out_dir: Path, enabled: bool, *, wandb_project: str | None, config: dict[str, Any], resume_step: int | None = None):
        """resume_step: the step of the checkpoint a resumed run starts from (None: a fresh run)."""
        self.enabled = enabled
        self.out_dir = out_dir
        self.history: list[dict[str, Any]] = []
        self.tb = None
        self.wandb = None
        if not enabled:
            return
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / "metrics.jsonl"
        resume = resume_step is not None
        if resume:
            self.history = [r for r in read_history(path) if r["step"] <= resume_step]
            # rewritten whole, then renamed: a kill now leaves the old file or the cut one, never a mix
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in self.history))
        self.jsonl = open(path, "a" if resume else "w", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step hides the earlier run's events from that step on (those steps are trained again)
            self.tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=resume_step + 1 if resume else None)
        except ImportError:  # tensorboard is a dependency, but a stripped install still trains
            self.tb = None
        if os.environ.get("WANDB_API_KEY"):  # (W&B keeps its own history; a resumed run logs steps again)
            try:
                import wandb

                self.wandb = wandb.init(project=wandb_project or "geo3k", config=config, resume="allow", dir=str(out_dir))
            except ImportError:
                print("note: WANDB_API_KEY is set but wandb is not installed (pip install wandb); not logging to W&B")

    def log(self, kind: str, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        rec = {"kind": kind, "step": step, "time": time.time(), **values}
        self.history.append(rec)
        self.jsonl.write(json.dumps(rec) + "\n")
        for k, v in values.items():
            if isinstance(v, (int, float)) and v is not None:
                if self.tb is not None:
                    self.tb.add_scalar(f"{kind}/{k}", v, step)
        if self.wandb is not None:
            self.wandb.log({f"{kind}/{k}": v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def flush(self) -> None:
        """Put the events logged so far on disk (TensorBoard buffers for up to two minutes): called at each
        checkpoint, so a killed run's events reach at least its last checkpoint, as metrics.jsonl does."""
        if self.enabled and self.tb is not None:
            self.tb.flush()

    @staticmethod
    def line(step: int, total: int, v: dict[str, Any], eta_s: float) -> str:
        parts = [
            f"step {step}/{total}",
            f"loss {v['loss']:.4f}",
            f"lr {v['lr']:.2e}",
            f"grad {v['grad_norm']:.3f}",
            f"{v['tokens_per_s']:,.0f} tok/s",
        ]
        if v.get("moe_imbalance") is not None:  # busiest expert / mean, and the load-balancing loss value
            parts.append(f"experts {v['moe_imbalance']:.2f}x aux {v['moe_aux_loss']:.3f}")
        if v.get("mfu") is not None:  # against the card's datasheet peak (train/flops.py)
            parts.append(f"MFU {100 * v['mfu']:.1f}%")
        elif v.get("mfu_measured_peak") is not None:  # a card without a datasheet entry
            parts.append(f"MFU {100 * v['mfu_measured_peak']:.1f}% of the measured matmul peak")
        if v.get("peak_mem_gib") is not None:
            parts.append(f"mem {v['peak_mem_gib']:.1f} GiB")
        parts.append(f"{v['step_s']:.2f} s/step")
        if v.get("new_graphs"):  # torch.compile ran in this step (its time is in s/step)
            parts.append(f"compiled {v['new_graphs']} graphs")
        if v.get("new_attention_graphs"):  # cuDNN built attention graphs in this step (also in s/step)
            parts.append(f"built {v['new_attention_graphs']} cuDNN attention graphs")
        parts.append(f"ETA {_fmt_duration(eta_s)}")
        return " | ".join(parts)

    def plot_loss(self) -> Path | None:
        if not self.enabled:
            return None
        train = [(r["step"], r["loss"]) for r in self.history if r["kind"] == "train"]
        evals = [(r["step"], r["loss"]) for r in self.history if r["kind"] == "eval" and r.get("loss") is not None]
        if not train:
            return None
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        ax.plot(*zip(*train), label="train loss (per token)")
        if evals:
            ax.plot(*zip(*evals), "o-", label="eval loss")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.out_dir / "loss.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        return path

    def close(self) -> None:
        if not self.enabled:
            return
        self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
