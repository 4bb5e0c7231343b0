"""The measurement harness every benchmark shares: median timing with the first call's extra time
(compilation) split off, forward and forward+backward timing of an attention call, peak-memory
growth of a call in a fresh process, the machine description, length sweeps, and the JSON + chart
written next to each other."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import torch

__all__ = [
    "RESULTS",
    "ROOT",
    "HelpFormatter",
    "forward_backward_step",
    "machine",
    "output_path",
    "peak_memory_mib",
    "plot_against_baseline",
    "sweep",
    "time_forward_backward",
    "timed",
    "write_results",
]

ROOT = Path(__file__).resolve().parents[1]  # the repository root, where `experiments` is importable
RESULTS = "benchmarks/results"  # the shipped results, relative to the repository root the studies run from


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """The module's docstring as written (its example commands keep their lines), and every flag's default."""


def output_path(name: str, preset: str | None = None, given: str | None = None) -> str:
    """Where a run writes its JSON: `given` (`--output`) if any; a full run into the results folder,
    next to the shipped results it replaces (`benchmarks/results/<name>.json`); a smoke or check run
    (`preset`, e.g. `"quick"`) into `outputs/<name>_<preset>.json`, so it never overwrites a measurement."""
    if given:
        return given
    return f"outputs/{name}_{preset}.json" if preset else f"{RESULTS}/{name}.json"


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
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


def _output_grad(inputs: list[torch.Tensor]) -> torch.Tensor:
    # Attention outputs have the query's shape (value and query head sizes are equal here).
    return torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))


def time_forward_backward(run: Callable, make_inputs: Callable[[bool], list[torch.Tensor]], repeats: int,
                          backward: bool = True) -> dict[str, float]:
    """Forward time without grad and (with `backward`) forward+backward time of `run(*inputs)`,
    each `timed`: `forward_s`, `forward_compile_s`, `forward_backward_s`, `forward_backward_compile_s`.

    `make_inputs(requires_grad)` returns the tensors, query first; with `requires_grad` they are
    the leaves whose gradients the backward computes (cleared after each call).
    """
    inputs = make_inputs(False)

    def forward():
        with torch.no_grad():
            run(*inputs)

    fwd, fwd_compile = timed(forward, repeats)
    result = {"forward_s": fwd, "forward_compile_s": fwd_compile}
    if not backward:
        return result
    inputs = make_inputs(True)
    grad = _output_grad(inputs)

    def forward_backward():
        run(*inputs).backward(grad)
        for t in inputs:
            t.grad = None

    both, both_compile = timed(forward_backward, repeats)
    result.update({"forward_backward_s": both, "forward_backward_compile_s": both_compile})
    return result


def forward_backward_step(run: Callable, warmup_inputs: list[torch.Tensor], inputs: list[torch.Tensor]) -> Callable:
    """For `peak_memory_mib`: runs one forward+backward on `warmup_inputs` now (so compilation and
    first-call allocations do not count) and returns the forward+backward on `inputs` to measure."""
    run(*warmup_inputs).sum().backward()
    grad = _output_grad(inputs)
    return lambda: run(*inputs).backward(grad)


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{field} not in /proc/self/status")


def _measure_peak_in_this_process() -> None:
    """The fresh process of `peak_memory_mib` (argv: target, JSON args)."""
    target, args = sys.argv[1], json.loads(sys.argv[2])
    module, name = target.split(":")
    step = getattr(importlib.import_module(module), name)(*args)
    # Linux resets the resident high-water mark (VmHWM) when 5 is written to /proc/self/clear_refs.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _status_mib("VmRSS")
    step()
    print(json.dumps({"peak_mib": _status_mib("VmHWM") - before}))


def peak_memory_mib(target: str, *args) -> float:
    """Peak resident-memory growth (MiB, Linux) of one call, in a fresh Python process so that
    nothing a previous measurement allocated or cached counts.

    `target` is `"module:function"`; the child calls `function(*args)` (JSON-able args), which
    prepares inputs and warms up, and returns the zero-argument call whose peak is measured.
    """
    out = subprocess.run(
        [sys.executable, "-c", "from experiments.harness import _measure_peak_in_this_process as m; m()",
         target, json.dumps(args)],
        cwd=ROOT, capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def _cpu_model() -> str:
    """The CPU's model name where Linux reports it: SDPA's fp32 products run on MKL, whose speed
    differs between CPU vendors and models, so ratios to SDPA compare only on one model."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def machine() -> dict:
    return {"cpu": platform.processor() or platform.machine(), "cpu_model": _cpu_model(),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "capability": torch.backends.cpu.get_cpu_capability()}


def sweep(rows: dict[int, dict], jobs: Iterable[tuple[int, str]], measure: Callable[[str, int], dict],
          desc: str) -> None:
    """`rows[length][method].update(measure(method, length))` for each `(length, method)` job, with
    a progress bar."""
    from tqdm.auto import tqdm

    for length, method in tqdm(list(jobs), desc=desc):
        rows.setdefault(length, {"length": length}).setdefault(method, {}).update(measure(method, length))


def plot_against_baseline(results: dict, methods: list[str], path: str, *, baseline: str, label: str,
                          panels: list[tuple[str, str, bool]], title: str, baseline_label: str,
                          targets: dict | None = None) -> None:
    """One log-log panel per `(key, title, speed_up)` of `panels`: each method's `key` against the
    baseline's over `results["rows"]` (`baseline / method` when `speed_up`, else `method / baseline`),
    a dashed line at 1 and dotted red lines at `targets[key]` (`[(value, name), ...]`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4.5))
    for ax, (key, panel_title, speed_up) in zip(axes, panels):
        for method in methods:
            if method == baseline:
                continue
            xs, ys = [], []
            for row in results["rows"]:
                base, mine = row.get(baseline, {}).get(key), row.get(method, {}).get(key)
                if base and mine:
                    xs.append(row["length"])
                    ys.append(base / mine if speed_up else mine / base)
            if xs:
                ax.plot(xs, ys, marker="o", label=f"{label} {method}")
        ax.axhline(1.0, color="gray", linestyle="--", label=baseline_label)
        for target, name in (targets or {}).get(key, []):
            ax.axhline(target, color="red", linestyle=":", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # slow references are tens of times off: keep the fast ones readable
        shape = results["shape"]
        ax.set_xlabel(f"sequence length (B={shape['B']}, H={shape['H']}, D={shape['D']}, causal)")
        ax.set_title(panel_title)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict, output: str, plot: Callable[[dict, str], None]) -> str:
    """`results` as JSON at `output` and `plot(results, png)` next to it (same name, `.png`); returns
    the PNG's path."""
    os.makedirs(os.path.dirname(output) or ".", exist_ok=True)
    with open(output, "w") as f:
        json.dump(results, f, indent=2)
    png = os.path.splitext(output)[0] + ".png"
    plot(results, png)
    print(f"wrote {output} and {png}")
    return png
