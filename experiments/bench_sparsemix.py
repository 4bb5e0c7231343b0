"""SparseMix attention against dense SDPA softmax attention, measured in the same run.

B=1, H=8, D=64, causal, block 64, top_k 8 + sink + local (the defaults). A SparseMix call is timed
whole (`hf_multimax.ops.sparsemix.sparsemix_attention`): the scorer (pooling + low-rank scores), the
top-k selection and the sparse kernel. For each sequence length: forward time (no grad),
forward+backward time (median of repeats after a warm-up; the first call's extra time, mostly
compilation, is reported separately), and peak memory growth of one forward+backward in a fresh
process. The chart's speed-up vs L shows where sparse attention overtakes dense.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hf_multimax.layers.sparsemix import SparseMixScorer, SparseMixSettings
from hf_multimax.ops.sparsemix import BACKENDS, sparsemix_attention

from .harness import forward_backward_step, machine, peak_memory_mib, plot_against_baseline, sweep, time_forward_backward

__all__ = ["MAX_LEN", "QUICK", "TARGETS", "bench_sparsemix", "summary"]

H, D = 8, 64
# Where each variant stops being run: eager keeps every gathered tile for its backward.
MAX_LEN = {"sdpa": 16384, "blocked": 16384, "fused": 16384, "eager": 8192, "flex": 16384}
# The targets at L=16384, drawn on the chart: measure -> [(ratio, label)].
TARGETS = {"forward_s": [(6.0, "target: 6x at 16k")], "forward_backward_s": [(4.0, "target: 4x at 16k")],
           "peak_mib": [(1.0, "target: <= SDPA")]}
# The CI smoke run: tiny sizes, one repeat, still more than top_k + 2 blocks so the sparse path runs.
QUICK = {"lengths": [256, 512], "memory_lengths": [512], "repeats": 1, "block_size": 16, "top_k": 2}


def make_inputs(length: int, requires_grad: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def make_scorer(settings: SparseMixSettings) -> SparseMixScorer:
    torch.manual_seed(0)
    scorer = SparseMixScorer(settings.selector, H, H, D, settings.scorer_rank, settings.indexer_heads,
                             settings.indexer_dim)
    with torch.no_grad():  # a trained-looking selector, not the zero start
        zero_start = scorer.w_key if settings.selector == "block" else scorer.w_weight
        zero_start.normal_(std=zero_start.shape[-2] ** -0.5)
    return scorer


def run(variant: str, q, k, v, scorer: SparseMixScorer, settings: SparseMixSettings):
    if variant == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return sparsemix_attention(q, k, v, scorer(), kernel=BACKENDS[variant],
                               block_size=settings.block_size, top_k=settings.top_k, sink=settings.sink,
                               local=settings.local, causal=True, selector=settings.selector)


def memory_step(variant: str, length: int, settings: dict):
    """The forward+backward whose peak `peak_memory_mib` measures (in its fresh process)."""
    settings = SparseMixSettings.from_dict(settings)
    scorer = make_scorer(settings)
    warmup = make_inputs(4 * settings.block_size * settings.kept_blocks, True)
    return forward_backward_step(lambda *x: run(variant, *x, scorer, settings), warmup, make_inputs(length, True))


def bench_sparsemix(lengths, memory_lengths, variants, repeats: int, block_size: int, top_k: int,
                    selector: str = "block") -> dict:
    """Every measurement of the module docstring for `variants` (names in `MAX_LEN`; SDPA, the
    baseline, is always measured; peak memory only for SDPA and `blocked`)."""
    unknown = sorted(set(variants) - set(MAX_LEN))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(MAX_LEN)}")
    variants = ["sdpa", *(v for v in variants if v != "sdpa")]
    settings = SparseMixSettings(block_size=block_size, top_k=top_k, selector=selector)
    scorer = make_scorer(settings)

    def time_variant(variant, length):
        # CPU flex and the fused kernel have no backward.
        return time_forward_backward(lambda *x: run(variant, *x, scorer, settings),
                                     lambda grad: make_inputs(length, grad), repeats,
                                     backward=variant not in ("flex", "fused"))

    rows = {n: {"length": n} for n in lengths}
    sweep(rows, [(n, v) for n in lengths for v in variants if n <= MAX_LEN[v]], time_variant, "timing")
    sweep(rows, [(n, v) for n in memory_lengths for v in variants if v in ("sdpa", "blocked")],
          lambda v, n: {"peak_mib": peak_memory_mib(f"{__name__}:memory_step", v, n, settings.to_dict())},
          "peak memory")
    return {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "settings": settings.to_dict(),
        "variants": variants,
        "targets": TARGETS,
        "rows": [rows[n] for n in sorted(rows)],
    }


def plot(results: dict, path: str) -> None:
    s, m = results["settings"], results["machine"]
    plot_against_baseline(
        results, results["variants"], path, baseline="sdpa", label="sparsemix",
        baseline_label="SDPA dense (crossover)", targets=results["targets"],
        panels=[("forward_s", "forward speed-up over SDPA (higher is better)", True),
                ("forward_backward_s", "forward+backward speed-up over SDPA", True),
                ("peak_mib", "fwd+bwd peak memory / SDPA (lower is better)", False)],
        title=(f"SparseMix (block {s['block_size']}, top-{s['top_k']} + sink + local) vs SDPA on "
               f"{m['cpu']} ({m['threads']} threads)"),
    )


def summary(results: dict) -> str:
    """Markdown table: speed-ups over SDPA per length, and blocked's peak memory against SDPA's."""
    variants = results["variants"][1:]
    lines = ["| L | " + " | ".join(f"{v} fwd | {v} fwd+bwd" for v in variants) + " | peak mem (blocked/SDPA) |"]
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for v in variants:
            r = row.get(v, {})
            for key in ("forward_s", "forward_backward_s"):
                cells.append(f"{sdpa[key] / r[key]:.2f}x" if key in r and sdpa.get(key) else "-")
        mem = row.get("blocked", {}).get("peak_mib"), sdpa.get("peak_mib")
        cells.append(f"{mem[0]:.0f} / {mem[1]:.0f} MiB" if all(mem) else "-")
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
