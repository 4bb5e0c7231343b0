"""Build time of a 32-layer model with and without `import hf_multimax`, each in fresh processes.

A model whose config names no plugin method must be built exactly as without the plugin: the
wrapped `post_init` returns at once, so the two times should agree within noise. A MultiMax build
is timed too, for scale. Writes JSON (and a bar chart with --plot).

    .venv/bin/python scripts/bench_build_time.py --repeats 7
    .venv/bin/python scripts/bench_build_time.py --quick   # smoke run: 2 repeats, 8 layers
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = """
import sys, time, torch, transformers as tf
if sys.argv[1] != "none":
    import hf_multimax
cfg = tf.LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=int(sys.argv[2]),
                     num_attention_heads=8, num_key_value_heads=4)
impl = "multimax" if sys.argv[1] == "multimax" else "sdpa"
# Warm-up: a 1-layer build first, so lazy imports of the modeling code are not timed.
tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**{**cfg.to_dict(), "num_hidden_layers": 1}), attn_implementation=impl)
torch.manual_seed(0)
start = time.perf_counter()
tf.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl)
print(time.perf_counter() - start)
"""
VARIANTS = ("none", "imported", "multimax")  # no import / import, sdpa model / import, multimax model


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="fresh processes per variant (interleaved)")
    parser.add_argument("--layers", type=int, default=32, help="decoder layers of the Llama model")
    parser.add_argument("--quick", action="store_true", help="smoke run (2 repeats, 8 layers): claims nothing")
    parser.add_argument("--output", default="outputs/bench_build_time.json", help="where the JSON goes")
    args = parser.parse_args(argv)
    repeats, layers = (2, 8) if args.quick else (args.repeats, args.layers)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    times = {v: [] for v in VARIANTS}
    for _ in range(repeats):
        for variant in VARIANTS:
            out = subprocess.run([sys.executable, "-c", CHILD, variant, str(layers)], capture_output=True, text=True,
                                 env=env, check=True)
            times[variant].append(float(out.stdout.strip().splitlines()[-1]))
    median = {v: statistics.median(t) for v, t in times.items()}
    result = {
        "quick": args.quick, "layers": layers, "repeats": repeats, "threads": env["OMP_NUM_THREADS"],
        "seconds": times, "median_s": median,
        "imported_over_none": median["imported"] / median["none"],
        "multimax_over_none": median["multimax"] / median["none"],
    }
    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=1)
    label = "SMOKE RUN (no claim): " if args.quick else ""
    print(f"{label}{layers}-layer Llama build, median of {repeats} fresh processes, {env['OMP_NUM_THREADS']} thread(s):")
    print(f"  without the plugin {median['none']:.3f} s | plugin imported, sdpa model {median['imported']:.3f} s "
          f"({result['imported_over_none']:.2f}x) | multimax model {median['multimax']:.3f} s "
          f"({result['multimax_over_none']:.2f}x)")
    print(f"  written to {args.output}")


if __name__ == "__main__":
    main()
