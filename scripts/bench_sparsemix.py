"""Benchmark SparseMix attention against dense SDPA softmax attention, measured in the same run.

B=1, H=8, D=64, causal, block 64, top_k 8 + sink + local (the defaults). A SparseMix call is timed
whole: the scorer (pooling + low-rank scores), the top-k selection and the sparse kernel. For each
sequence length: forward time (no grad), forward+backward time (median of repeats after a warm-up;
the first call's extra time, mostly compilation, is reported separately), and peak memory growth of
one forward+backward in a fresh process. Writes JSON and a PNG chart (speed-up vs L shows where
sparse attention overtakes dense).

    python scripts/bench_sparsemix.py                  # full sweep, 1024..16384
    python scripts/bench_sparsemix.py --quick          # CI smoke: tiny sizes, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch
import torch.nn.functional as F

from bench_common import machine, reset_peak, status_mib, timed
from hf_multimax.layers.sparsemix import SparseMixScorer, SparseMixSettings
from hf_multimax.ops.sparsemix import BACKENDS, block_geometry, scorer_block_scores, select_blocks

H, D = 8, 64
# Where each variant stops being run: eager keeps every gathered tile for its backward.
MAX_LEN = {"sdpa": 16384, "blocked": 16384, "eager": 8192, "flex": 16384}


def make_inputs(length, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def make_scorer(settings):
    torch.manual_seed(0)
    scorer = SparseMixScorer(H, D, settings.scorer_rank, settings)
    with torch.no_grad():
        scorer.w_key.normal_(std=scorer.init_std)  # a trained-looking scorer, not the zero start
    return scorer


def run(variant, q, k, v, scorer):
    if variant == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    s = scorer.settings
    geometry = block_geometry(q.shape[-2], k.shape[-2], s.block_size, causal=True)
    with torch.no_grad():
        scores = scorer_block_scores(q, k, scorer.w_query, scorer.w_key, geometry, D**-0.5)
    idx, valid = select_blocks(scores, geometry, top_k=s.top_k, sink=s.sink, local=s.local)
    return BACKENDS[variant](q, k, v, idx, valid, block_size=s.block_size, is_causal=True)[0]


def time_variant(variant, length, repeats, scorer):
    q, k, v = make_inputs(length, requires_grad=False)

    def forward():
        with torch.no_grad():
            run(variant, q, k, v, scorer)

    fwd, fwd_compile = timed(forward, repeats)
    result = {"forward_s": fwd, "forward_compile_s": fwd_compile}
    if variant == "flex":  # CPU flex has no backward
        return result
    q, k, v = make_inputs(length, requires_grad=True)
    grad = torch.randn(1, H, length, D, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        run(variant, q, k, v, scorer).backward(grad)
        for t in (q, k, v):
            t.grad = None

    both, both_compile = timed(forward_backward, repeats)
    result.update({"forward_backward_s": both, "forward_backward_compile_s": both_compile})
    return result


def peak_memory_child(variant, length, settings):
    """In a fresh process: peak resident growth (MiB) over one forward+backward, after a warm-up."""
    scorer = make_scorer(settings)
    small = make_inputs(4 * settings.block_size * settings.kept_blocks, requires_grad=True)
    run(variant, *small, scorer).sum().backward()
    q, k, v = make_inputs(length, requires_grad=True)
    grad = torch.randn(1, H, length, D)
    before = reset_peak()
    run(variant, q, k, v, scorer).backward(grad)
    print(json.dumps({"peak_mib": status_mib("VmHWM") - before}))


def peak_memory(variant, length, settings):
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", variant, str(length), json.dumps(settings.to_dict())],
        capture_output=True, text=True, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title, invert in (
        (axes[0], "forward_s", "forward speed-up over SDPA (higher is better)", True),
        (axes[1], "forward_backward_s", "forward+backward speed-up over SDPA", True),
        (axes[2], "peak_mib", "fwd+bwd peak memory / SDPA (lower is better)", False),
    ):
        for variant in results["variants"]:
            if variant == "sdpa":
                continue
            xs, ys = [], []
            for row in results["rows"]:
                sdpa, mine = row["sdpa"].get(key), row.get(variant, {}).get(key)
                if sdpa and mine:
                    xs.append(row["length"])
                    ys.append(sdpa / mine if invert else mine / sdpa)
            if xs:
                ax.plot(xs, ys, marker="o", label=f"sparsemix {variant}")
        ax.axhline(1.0, color="gray", linestyle="--", label="SDPA dense (crossover)")
        for target, name in results["targets"].get(key, []):
            ax.axhline(target, color="red", linestyle=":", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length (B=1, H=8, D=64, causal)")
        ax.set_title(title)
        ax.legend(fontsize=8)
    s = results["settings"]
    fig.suptitle(f"SparseMix (block {s['block_size']}, top-{s['top_k']} + sink + local) vs SDPA on "
                 f"{results['machine']['cpu']} ({results['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--memory_lengths", type=int, nargs="+", default=[16384])
    parser.add_argument("--variants", nargs="+", default=["sdpa", "blocked", "eager", "flex"])
    parser.add_argument("--block_size", type=int, default=64)
    parser.add_argument("--top_k", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--output", default="outputs/bench_sparsemix.json")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, one repeat")
    parser.add_argument("--_memory", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._memory:
        variant, length, settings = args._memory
        return peak_memory_child(variant, int(length), SparseMixSettings.from_dict(json.loads(settings)))
    if args.quick:
        args.lengths, args.memory_lengths, args.repeats, args.block_size, args.top_k = [256, 512], [512], 1, 16, 2
    unknown = sorted(set(args.variants) - set(MAX_LEN))
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; choose from {sorted(MAX_LEN)}")
    if "sdpa" not in args.variants:
        args.variants.insert(0, "sdpa")
    settings = SparseMixSettings(block_size=args.block_size, top_k=args.top_k)
    scorer = make_scorer(settings)

    from tqdm.auto import tqdm

    results = {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "settings": settings.to_dict(),
        "variants": args.variants,
        "targets": {"forward_s": [(6.0, "target: 6x at 16k")], "forward_backward_s": [(4.0, "target: 4x at 16k")],
                    "peak_mib": [(1.0, "target: <= SDPA")]},
        "rows": [],
    }
    jobs = [(n, v) for n in args.lengths for v in args.variants if n <= MAX_LEN[v]]
    rows = {n: {"length": n} for n in args.lengths}
    for length, variant in tqdm(jobs, desc="timing"):
        rows[length][variant] = time_variant(variant, length, args.repeats, scorer)
    mem_jobs = [(n, v) for n in args.memory_lengths for v in args.variants if v in ("sdpa", "blocked")]
    for length, variant in tqdm(mem_jobs, desc="peak memory"):
        rows.setdefault(length, {"length": length}).setdefault(variant, {})["peak_mib"] = peak_memory(
            variant, length, settings
        )
    results["rows"] = [rows[n] for n in sorted(rows)]

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    print(f"wrote {args.output} and {png}")
    print("| L | " + " | ".join(f"{v} fwd | {v} fwd+bwd" for v in args.variants[1:]) + " | peak mem (blocked/SDPA) |")
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for v in args.variants[1:]:
            r = row.get(v, {})
            for key in ("forward_s", "forward_backward_s"):
                cells.append(f"{sdpa[key] / r[key]:.2f}x" if key in r and sdpa.get(key) else "-")
        mem = row.get("blocked", {}).get("peak_mib"), sdpa.get("peak_mib")
        cells.append(f"{mem[0]:.0f} / {mem[1]:.0f} MiB" if all(mem) else "-")
        print(f"| {row['length']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
