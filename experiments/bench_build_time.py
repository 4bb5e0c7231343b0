"""Build time of a Llama model with and without `import hf_multimax`, each build in a fresh process.

A model whose config names no plugin method must be built exactly as without the plugin (the
wrapped `post_init` returns at once), so the first two should agree within noise; a MultiMax build
is timed for scale. Each process first builds a 1-layer model, so lazy imports of the modeling code
are not timed. The variants are interleaved, one thread each.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

from .harness import machine

__all__ = ["QUICK", "VARIANTS", "bench_build_time", "plot", "summary"]

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
