"""A sampling profiler of the host's Python threads, for steps too perturbed by torch.profiler.

Every `interval_s` a background thread reads each thread's current Python stack (`sys._current_frames`) and
counts, per function, the samples in which it is on the stack (inclusive) and on top (exclusive). A thread
inside a torch op shows the Python line that called it, so "exclusive" time in a Megatron function is that
function's own Python plus the ops it calls directly. Threads that are waiting (queue gets, locks, sleeps)
are left out. The sampler needs the GIL to read the stacks, so it samples a thread that holds the GIL for a
long time late: read the shares as a profile of where the launching thread spends its time, not exact times.

    with HostSampler() as s:
        ...steps...
    print(s.report())
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter
from pathlib import Path

# Functions a thread sits in while it waits (the main thread waits in _engine_run_backward while the autograd
# engine's device thread runs the backward, sampled on its own; Inductor's compile-worker pool keeps a timer thread
# and a pipe reader that wait there after warm-up: any frame of torch/_inductor/compile_worker counts as waiting;
# a blocking socket read, e.g. a test runner's channel to its controller, sits in readinto).
_IDLE = ("wait", "get", "sleep", "select", "poll", "accept", "recv", "recv_into", "readinto", "_recv_bytes", "_poll", "acquire",
         "_engine_run_backward")


def _label(code) -> str:
    parts = Path(code.co_filename).parts
    for root in ("megatron", "transformers", "torch", "train", "bench", "shared"):
        if root in parts:
            return f"{'/'.join(parts[parts.index(root):])}:{code.co_name}"
    return f"{Path(code.co_filename).name}:{code.co_name}"


class HostSampler:
    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.inclusive: Counter[str] = Counter()
        self.exclusive: Counter[str] = Counter()
        self.samples = 0
        """Thread samples taken (each round samples every thread that is not waiting)."""
        self.rounds = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        me = threading.get_ident()
        while not self._stop.wait(self.interval_s):
            self.rounds += 1
            for tid, frame in sys._current_frames().items():
                if tid == me or frame.f_code.co_name in _IDLE or "compile_worker" in frame.f_code.co_filename:
                    continue
                seen = set()
                top = _label(frame.f_code)
                while frame is not None:
                    seen.add(_label(frame.f_code))
                    frame = frame.f_back
                self.exclusive[top] += 1
                self.inclusive.update(seen)
                self.samples += 1

    def __enter__(self) -> "HostSampler":
        self._thread = threading.Thread(target=self._run, name="host-sampler", daemon=True)
        self._t0 = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.seconds = time.perf_counter() - self._t0

    def report(self, top: int = 30) -> str:
        n = max(1, self.samples)
        lines = [f"{self.samples} samples of busy Python threads over {self.seconds:.1f} s",
                 "", "| on top of the stack (exclusive) | share |", "|---|---|"]
        lines += [f"| {k} | {v / n:.1%} |" for k, v in self.exclusive.most_common(top)]
        lines += ["", "| anywhere on the stack (inclusive) | share |", "|---|---|"]
        lines += [f"| {k} | {v / n:.1%} |" for k, v in self.inclusive.most_common(top)]
        return "\n".join(lines)
