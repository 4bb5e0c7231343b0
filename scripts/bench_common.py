"""Measurement helpers shared by the benchmark scripts: median timing with the first call's extra
time (compilation) split off, peak-memory growth of a call, and a description of the machine."""

from __future__ import annotations

import platform
import statistics
import time

import torch

__all__ = ["machine", "reset_peak", "status_mib", "timed"]


def timed(fn, repeats):
    """`(median seconds over repeats, extra time of the first call)`."""
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return median, max(0.0, first - median)


def status_mib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> float:
    """Reset the process's resident high-water mark (Linux: write 5 to /proc/self/clear_refs) and
    return the current resident size, the baseline for `status_mib("VmHWM") - baseline`."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_mib("VmRSS")


def machine():
    return {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "capability": torch.backends.cpu.get_cpu_capability()}
