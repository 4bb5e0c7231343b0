"""MultiMax attention backends against SDPA softmax, measured in the same run.

B=1, H=8, D=64, causal, order-2 scalars away from identity (`--scalars identity`: all zero, MultiMax's
initialisation, where the kernels skip the modulator). For each sequence length: forward time
(no grad) and forward+backward time (median of repeats after a warm-up; the first call's extra
time, mostly compilation, is reported separately), and peak memory of forward+backward (peak RSS
growth, each in a fresh process). `--interleave` alternates the backends call by call within each
length (on a machine shared with other work, load then moves every backend's times alike). Then the model-level rows of `bench_models.py` (forward,
forward+backward, `generate` tokens/s, MiniLM, peak memory: what a user of the model pays).
Writes JSON and a PNG chart (from the repository root):

    .venv/bin/python -m experiments.bench_attention              # full sweep, 512..16384 (benchmarks/results/)
    .venv/bin/python -m experiments.bench_attention --quick      # smoke run: tiny sizes, claims nothing
    .venv/bin/python -m experiments.bench_attention --backends sdpa fused --threads 1 --interleave --no_models
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from hf_multimax.ops.multimax import BACKENDS

from .bench_models import FULL_MODELS, QUICK_MODELS, bench_models, models_summary
from .harness import (
    HelpFormatter,
    _output_grad,
    forward_backward_step,
    machine,
    output_path,
    peak_memory_mib,
    plot_against_baseline,
    sweep,
    time_forward_backward,
    write_results,
)

__all__ = ["MAX_LEN", "QUICK", "bench_attention", "main", "summary"]

H, D = 8, 64
# Where each backend stops being run (memory or time): eager materialises H*L*L fp32 scores several times.
MAX_LEN = {"eager": 2048, "chunked": 16384, "fused": 16384, "flex": 16384, "sdpa": 16384}
# The CI smoke run: tiny sizes, one repeat.
QUICK = {"lengths": [128, 256], "memory_lengths": [256], "repeats": 1}


SCALARS = "random"  # "identity": theta all zero (set by --scalars)


def make_inputs(length: int, requires_grad: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    theta = torch.randn(8, generator=g) * 0.2
    if SCALARS == "identity":
        theta = torch.zeros(8)
    return [q, k, v, theta.requires_grad_(requires_grad)]


def run(backend: str, q, k, v, theta):
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return BACKENDS[backend](q, k, v, theta, is_causal=True)[0]


def time_backend(backend: str, length: int, repeats: int) -> dict:
    # CPU flex has no backward.
    return time_forward_backward(lambda *x: run(backend, *x), lambda grad: make_inputs(length, grad), repeats,
                                 backward=backend != "flex")


def time_interleaved(backends: list[str], length: int, repeats: int) -> dict[str, dict]:
    """`time_backend`'s measures for every backend at one length, the backends alternated call by call
    (after one warm-up call each, whose extra time is not reported here)."""
    results = {b: {} for b in backends}
    for key, grad in (("forward_s", False), ("forward_backward_s", True)):
        inputs = make_inputs(length, grad)
        out_grad = _output_grad(inputs)

        def call(backend):
            if not grad:
                with torch.no_grad():
                    run(backend, *inputs)
                return
            run(backend, *inputs).backward(out_grad)
            for t in inputs:
                t.grad = None

        timed = [b for b in backends if grad is False or b != "flex"]  # CPU flex has no backward
        times = {b: [] for b in timed}
        for b in timed:
            call(b)
        for _ in range(repeats):
            for b in timed:
                t0 = time.perf_counter()
                call(b)
                times[b].append(time.perf_counter() - t0)
        for b in timed:
            results[b][key] = statistics.median(times[b])
    return results


def memory_step(backend: str, length: int):
    """The forward+backward whose peak `peak_memory_mib` measures (in its fresh process)."""
    return forward_backward_step(lambda *x: run(backend, *x), make_inputs(64, True), make_inputs(length, True))


def bench_attention(lengths, memory_lengths, backends, repeats: int, interleave: bool = False) -> dict:
    """Every measurement of the module docstring for `backends` (names in `MAX_LEN`; SDPA, the
    baseline, is always measured)."""
    unknown = sorted(set(backends) - set(MAX_LEN))
    if unknown:
        raise ValueError(f"unknown backend(s) {unknown}; choose from {sorted(MAX_LEN)}")
    backends = ["sdpa", *(b for b in backends if b != "sdpa")]
    rows = {n: {"length": n} for n in lengths}
    if interleave:
        for n in lengths:
            for b, measured in time_interleaved([b for b in backends if n <= MAX_LEN[b]], n, repeats).items():
                rows[n][b] = measured
    else:
        sweep(rows, [(n, b) for n in lengths for b in backends if n <= MAX_LEN[b]],
              lambda b, n: time_backend(b, n, repeats), "timing")
    sweep(rows, [(n, b) for n in memory_lengths for b in backends if b != "flex" and n <= MAX_LEN[b]],
          lambda b, n: {"peak_mib": peak_memory_mib("experiments.bench_attention:memory_step", b, n)}, "peak memory")
    return {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "scalars": SCALARS,
        "interleaved": interleave,
        "backends": backends,
        "rows": [rows[n] for n in sorted(rows)],
    }


def plot(results: dict, path: str) -> None:
    plot_against_baseline(
        results, results["backends"], path, baseline="sdpa", label="multimax", baseline_label="SDPA softmax",
        panels=[("forward_s", "forward time / SDPA", False),
                ("forward_backward_s", "forward+backward time / SDPA", False),
                ("peak_mib", "fwd+bwd peak memory / SDPA", False)],
        title=f"MultiMax backends vs SDPA on {results['machine']['cpu']} ({results['machine']['threads']} threads)",
    )


def summary(results: dict) -> str:
    """Per length, each backend's ratios to SDPA."""
    lines = []
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for b in results["backends"][1:]:
            r = row.get(b, {})
            ratios = [f"{k.split('_s')[0]} {r[k] / sdpa[k]:.2f}x" for k in ("forward_s", "forward_backward_s", "peak_mib")
                      if k in r and sdpa.get(k)]
            if ratios:
                cells.append(f"{b}: " + ", ".join(ratios))
        lines.append(f"L={row['length']}: " + " | ".join(cells))
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_attention", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384], help="sequence lengths to time")
    parser.add_argument("--memory_lengths", type=int, nargs="+", default=[2048, 8192], help="lengths whose peak memory is measured (fresh process each)")
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager", "chunked", "fused", "flex"], choices=list(MAX_LEN), help="what to time (sdpa is the baseline)")
    parser.add_argument("--no_models", action="store_true", help="skip the model-level rows (experiments/bench_models.py)")
    parser.add_argument("--no_busy", action="store_true", help="skip the generate row with the other core busy")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/bench_attention.json; with --quick outputs/bench_attention_quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat; claims nothing")
    parser.add_argument("--scalars", choices=["random", "identity"], default="random", help="MultiMax scalars: random (a trained model's, away from identity) or identity (all zero, the initialisation)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument("--interleave", action="store_true", help="alternate the backends call by call within each length")
    args = parser.parse_args(argv)
    global SCALARS
    SCALARS = args.scalars
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_attention(args.lengths, args.memory_lengths, args.backends, args.repeats, args.interleave)
    if not args.no_models:
        sizes = QUICK_MODELS if args.quick else FULL_MODELS
        results["models"] = bench_models(**sizes, busy=not (args.quick or args.no_busy))
    results["quick"] = args.quick
    write_results(results, output_path("bench_attention", "quick" if args.quick else None, args.output), plot)
    print(summary(results))
    if "models" in results:
        print(models_summary(results["models"]))
    if args.quick:
        print("SMOKE RUN (--quick): tiny sizes and one repeat; these ratios are not measurements of the targets.")
    return results


if __name__ == "__main__":
    main()
