"""bench/gpu_gaps.py: GPU idle gaps blamed on the right host op, and sync call sites counted."""

import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import gpu_gaps  # noqa: E402


def _x(cat, name, ts, dur, tid=1):
    return {"ph": "X", "cat": cat, "name": name, "ts": ts, "dur": dur, "tid": tid}


def test_gaps_are_blamed_on_the_innermost_host_op_and_the_runtime_call():
    trace = {"traceEvents": [
        _x("kernel", "k1", 0, 10), _x("kernel", "k2", 10, 10),       # back to back: no gap
        _x("kernel", "k3", 50, 10),                                   # gap 20..50 (30 us)
        _x("gpu_memcpy", "m", 100, 10),                               # gap 60..100 (40 us)
        _x("kernel", "k4", 112, 1),                                   # gap of 2 us: below the threshold
        _x("cpu_op", "outer", 0, 200),
        _x("cpu_op", "aten::slow_python_op", 15, 30),                 # covers the first gap's start (20)
        _x("cpu_op", "aten::item", 55, 50, tid=2),                    # covers the second gap's start (60)
        _x("cuda_runtime", "cudaStreamSynchronize", 58, 45, tid=2),
    ]}
    report = gpu_gaps.analyse(trace, min_gap_us=5)
    assert "2 gaps >= 5 us total 0.1 ms" in report
    assert "device busy 0.0 ms of a 0.1 ms span" in report  # 41 us busy of 113
    rows = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in report.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["aten::slow_python_op"] == "0.0" and rows["aten::item"] == "0.0"  # 30 and 40 us, shown in ms
    assert "cudaStreamSynchronize" in rows and "(none)" in rows
    assert report.index("aten::item") < report.index("aten::slow_python_op")  # sorted by idle time


def test_no_device_events_says_so():
    assert "no device events" in gpu_gaps.analyse({"traceEvents": [_x("cpu_op", "a", 0, 1)]})


def test_sync_sites_count_by_call_site():
    def syncing_caller():
        warnings.warn("called a synchronizing CUDA operation")

    with gpu_gaps.SyncSites() as sites:
        for _ in range(3):
            syncing_caller()
        warnings.warn("something else")  # not a sync: passed through, not counted
    assert sum(sites.sites.values()) == 3
    [(site, n)] = sites.sites.items()
    assert n == 3 and "syncing_caller" in site
    assert "3 synchronising CUDA calls" in sites.report()


def test_host_sampler_finds_the_busy_function_and_skips_waiting_threads():
    import threading
    import time

    from host_sampler import HostSampler

    stop = threading.Event()
    waiter = threading.Thread(target=stop.wait, daemon=True)  # a thread sitting in `wait`: not counted
    waiter.start()

    def busy_python_loop(seconds):
        end = time.perf_counter() + seconds
        x = 0
        while time.perf_counter() < end:
            x += 1
        return x

    with HostSampler(interval_s=0.002) as s:
        busy_python_loop(0.3)
    stop.set()
    assert s.rounds > 5
    # the main thread is in the loop in (nearly) every round (a test runner may keep a thread of its own in a
    # read beside it, so the share is of rounds, not of all samples)
    busy = next(k for k in s.exclusive if k.endswith(":busy_python_loop"))
    assert s.exclusive[busy] / s.rounds > 0.8
    assert not any(k.endswith(":wait") for k in s.exclusive)
    assert "busy_python_loop" in s.report()
