"""Build time of a Llama model with and without `import hf_multimax`, each build in a fresh process.

A model whose config names no plugin method must be built exactly as without the plugin (the
wrapped `post_init` returns at once), so the first two should agree within noise; a MultiMax build
is timed for scale. Each process first builds a 1-layer model, so lazy imports of the modeling code
are not timed. The variants are interleaved, one thread each. Writes JSON and a PNG chart (from the
repository root):

    .venv/bin/python -m experiments.bench_build_time              # 7 fresh processes per variant
    .venv/bin/python -m experiments.bench_build_time --quick      # smoke run: 2 processes, 8 layers, no claim
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys

from .harness import HelpFormatter, machine, output_path, write_results

__all__ = ["QUICK", "VARIANTS", "bench_build_time", "main", "plot", "summary"]

QUICK = {"repeats": 2, "layers": 8}

# variant -> (import the plugin, attn_implementation)
VARIANTS = {"without plugin": (False, "sdpa"), "plugin imported, sdpa": (True, "sdpa"), "multimax": (True, "multimax")}

CHILD = """
import sys, time, torch, transformers as tf
if sys.argv[1] == "True":
    import hf_multimax
impl, layers = sys.argv[2], int(sys.argv[3])
def config(n):
    return tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=n,
                          num_attention_heads=8, num_key_value_heads=4)
tf.AutoModelForCausalLM.from_config(config(1), attn_implementation=impl)
torch.manual_seed(0)
start = time.perf_counter()
tf.AutoModelForCausalLM.from_config(config(layers), attn_implementation=impl)
print(time.perf_counter() - start)
"""


def bench_build_time(repeats: int, layers: int, quick: bool = False) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    seconds = {name: [] for name in VARIANTS}
    for _ in range(repeats):
        for name, (plugin, impl) in VARIANTS.items():
            out = subprocess.run([sys.executable, "-c", CHILD, str(plugin), impl, str(layers)], capture_output=True,
                                 text=True, env=env, check=True)
            seconds[name].append(float(out.stdout.strip().splitlines()[-1]))
    median = {name: statistics.median(s) for name, s in seconds.items()}
    base = median["without plugin"]
    return {"quick": quick, "layers": layers, "repeats": repeats, "machine": {**machine(), "threads": 1},
            "seconds": seconds, "median_s": median, "ratio_to_without_plugin": {n: m / base for n, m in median.items()}}


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results["median_s"])
    fig, ax = plt.subplots(figsize=(6, 3.2))
    ax.bar(names, [results["median_s"][n] for n in names], color=["0.6", "tab:blue", "tab:orange"])
    for i, n in enumerate(names):
        ax.plot([i] * len(results["seconds"][n]), results["seconds"][n], "k.", ms=3)
    ax.set_ylabel("build time (s)")
    ax.set_title(f"{results['layers']}-layer Llama, median of {results['repeats']} fresh processes"
                 + (" (smoke run)" if results["quick"] else ""))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(results: dict) -> str:
    head = "SMOKE RUN, no claim: " if results["quick"] else ""
    parts = [f"{n} {results['median_s'][n]:.3f} s ({results['ratio_to_without_plugin'][n]:.2f}x)" for n in results["median_s"]]
    return (f"{head}{results['layers']}-layer Llama build, median of {results['repeats']} fresh processes, 1 thread: "
            + " | ".join(parts))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_build_time", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per variant, interleaved")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama model")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/bench_build_time.json; with --quick outputs/bench_build_time_quick.json)")
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 processes, 8 layers, claims nothing")
    args = parser.parse_args(argv)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_build_time(args.repeats, args.layers, quick=args.quick)
    write_results(results, output_path("bench_build_time", "quick" if args.quick else None, args.output), plot)
    print(summary(results))
    return results


if __name__ == "__main__":
    main()
