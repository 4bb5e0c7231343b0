"""Benchmark MultiMax attention backends against SDPA softmax, measured in the same run.

B=1, H=8, D=64, causal. For each sequence length: forward time (no grad) and forward+backward time
(median of repeats after a warm-up; the first call's extra time, mostly compilation, is reported
separately), and peak memory of forward+backward (peak RSS growth, each in a fresh process). Also an
end-to-end `generate` tokens/s on a tiny Llama. Writes JSON and a PNG chart.

    python scripts/bench_attention.py                  # full sweep, 512..16384
    python scripts/bench_attention.py --quick          # CI smoke: tiny sizes, seconds
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
from hf_multimax.ops.multimax import BACKENDS

H, D = 8, 64
# Where each backend stops being run (memory or time): eager materialises H*L*L fp32 scores several times.
MAX_LEN = {"eager": 2048, "chunked": 16384, "flex": 16384, "sdpa": 16384}


def make_inputs(length, requires_grad, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3))
    theta = (torch.randn(8, generator=g) * 0.2).requires_grad_(requires_grad)
    return q, k, v, theta


def run(backend, q, k, v, theta):
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return BACKENDS[backend](q, k, v, theta, is_causal=True)[0]


def time_backend(backend, length, repeats):
    q, k, v, theta = make_inputs(length, requires_grad=False)

    def forward():
        with torch.no_grad():
            run(backend, q, k, v, theta)

    fwd, fwd_compile = timed(forward, repeats)
    result = {"forward_s": fwd, "forward_compile_s": fwd_compile}
    if backend == "flex":  # CPU flex has no backward
        return result
    q, k, v, theta = make_inputs(length, requires_grad=True)
    grad = torch.randn(1, H, length, D, generator=torch.Generator().manual_seed(1))

    def forward_backward():
        run(backend, q, k, v, theta).backward(grad)
        for t in (q, k, v, theta):
            t.grad = None

    both, both_compile = timed(forward_backward, repeats)
    result.update({"forward_backward_s": both, "forward_backward_compile_s": both_compile})
    return result


def peak_memory_child(backend, length):
    """Runs in a fresh process: peak resident memory growth (MiB) over one forward+backward, after a
    warm-up on a tiny input so compilation does not count. Linux resets the high-water mark (VmHWM)
    when 5 is written to /proc/self/clear_refs."""
    small = make_inputs(64, requires_grad=True)
    run(backend, *small).sum().backward()
    q, k, v, theta = make_inputs(length, requires_grad=True)
    grad = torch.randn(1, H, length, D)
    before = reset_peak()
    run(backend, q, k, v, theta).backward(grad)
    print(json.dumps({"peak_mib": status_mib("VmHWM") - before}))


def peak_memory(backend, length):
    out = subprocess.run(
        [sys.executable, __file__, "--_memory", backend, str(length)], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"]


def generate_throughput(impl, new_tokens, repeats):
    import hf_multimax  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    prompt = torch.randint(0, 1000, (1, 64), generator=torch.Generator().manual_seed(0))

    def gen():
        with torch.no_grad():
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)

    median, _ = timed(gen, repeats)
    return new_tokens / median


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    for ax, key, title in (
        (axes[0], "forward_s", "forward time / SDPA"),
        (axes[1], "forward_backward_s", "forward+backward time / SDPA"),
        (axes[2], "peak_mib", "fwd+bwd peak memory / SDPA"),
    ):
        for backend in results["backends"]:
            if backend == "sdpa":
                continue
            xs, ys = [], []
            for row in results["rows"]:
                sdpa, mine = row["sdpa"].get(key), row.get(backend, {}).get(key)
                if sdpa and mine:
                    xs.append(row["length"])
                    ys.append(mine / sdpa)
            if xs:
                ax.plot(xs, ys, marker="o", label=f"multimax {backend}")
        ax.axhline(1.0, color="gray", linestyle="--", label="SDPA softmax")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")  # eager is tens of times slower: keep the fast backends readable
        ax.set_xlabel("sequence length (B=1, H=8, D=64, causal)")
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"MultiMax backends vs SDPA on {results['machine']['cpu']} ({results['machine']['threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--memory_lengths", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--backends", nargs="+", default=["sdpa", "eager", "chunked", "flex"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generate_tokens", type=int, default=64)
    parser.add_argument("--output", default="outputs/bench_attention.json")
    parser.add_argument("--quick", action="store_true", help="CI smoke run: tiny sizes, one repeat")
    parser.add_argument("--_memory", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._memory:
        return peak_memory_child(args._memory[0], int(args._memory[1]))
    if args.quick:
        args.lengths, args.memory_lengths, args.repeats, args.generate_tokens = [128, 256], [256], 1, 4
    unknown = sorted(set(args.backends) - {"sdpa", *BACKENDS})
    if unknown:
        parser.error(f"unknown backend(s) {unknown}; choose from {['sdpa', *BACKENDS]}")
    if "sdpa" not in args.backends:
        args.backends.insert(0, "sdpa")

    from tqdm.auto import tqdm

    results = {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "backends": args.backends,
        "rows": [],
    }
    jobs = [(n, b) for n in args.lengths for b in args.backends if n <= MAX_LEN[b]]
    rows = {n: {"length": n} for n in args.lengths}
    for length, backend in tqdm(jobs, desc="timing"):
        rows[length][backend] = time_backend(backend, length, args.repeats)
    mem_jobs = [(n, b) for n in args.memory_lengths for b in args.backends if b != "flex" and n <= MAX_LEN[b]]
    for length, backend in tqdm(mem_jobs, desc="peak memory"):
        rows.setdefault(length, {"length": length}).setdefault(backend, {})["peak_mib"] = peak_memory(backend, length)
    results["rows"] = [rows[n] for n in sorted(rows)]
    tokens = {impl: generate_throughput(impl, args.generate_tokens, args.repeats) for impl in ("sdpa", "multimax")}
    results["generate_tokens_per_s"] = {**tokens, "ratio": tokens["multimax"] / tokens["sdpa"]}

    os.makedirs(os.path.dirname(args.output) or ".", exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(results, f, indent=2)
    png = os.path.splitext(args.output)[0] + ".png"
    plot(results, png)
    print(f"wrote {args.output} and {png}")
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for b in args.backends[1:]:
            r = row.get(b, {})
            ratios = [f"{k.split('_s')[0]} {r[k] / sdpa[k]:.2f}x" for k in ("forward_s", "forward_backward_s", "peak_mib")
                      if k in r and sdpa.get(k)]
            if ratios:
                cells.append(f"{b}: " + ", ".join(ratios))
        print(f"L={row['length']}: " + " | ".join(cells))
    print(f"generate tokens/s multimax/sdpa: {results['generate_tokens_per_s']['ratio']:.2f}")


if __name__ == "__main__":
    main()
