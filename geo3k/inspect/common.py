"""What the modes of `geo3k inspect` share: the error type, colour detection and number formatting."""

from __future__ import annotations

import os
import sys
from typing import TextIO

import numpy as np

from shared.manifest import ShardSetError


class InspectError(ShardSetError):
    """A request `geo3k inspect` cannot serve; the message says what to do (printed as one line, exit 2)."""


def use_color(stream: TextIO = sys.stdout) -> bool:
    """Colour only on a terminal, and never when NO_COLOR is set (https://no-color.org)."""
    return stream.isatty() and not os.environ.get("NO_COLOR")


def stats(values: np.ndarray) -> dict[str, int]:
    """min/median/p95/max as nearest-rank values, i.e. lengths that some sample really has."""
    if values.size == 0:
        return {"min": 0, "median": 0, "p95": 0, "max": 0}
    v = np.sort(values)

    def rank(q: float) -> int:
        return int(v[max(0, int(np.ceil(q * v.size)) - 1)])

    return {"min": int(v[0]), "median": rank(0.5), "p95": rank(0.95), "max": int(v[-1])}


def human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"  # unreachable


def short(h: str | None, n: int = 12) -> str:
    return f"{h[:n]}…" if h else "-"
