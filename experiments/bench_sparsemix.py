"""SparseMix attention against dense SDPA softmax attention, measured in the same run.

B=1, H=8, D=64, causal, block 32, top_k 18 + sink + local (the defaults). Both sides are timed as a
model runs them: the registered attention function called on a real attention module (one layer of
a Llama with hidden 512), transformers' `sdpa_attention_forward` for dense and
`sparsemix_attention_forward` for SparseMix, which reads its settings from the module's config and
its selector from the module, then runs the selector, the top-k selection and the sparse kernel. For each sequence length: forward time (no grad),
forward+backward time (median of repeats after a warm-up; the first call's extra time, mostly
compilation, is reported separately), and peak memory growth of one forward+backward in a fresh
process. The chart's speed-up vs L shows where sparse attention overtakes dense.

Long contexts (`--long_from`, 32k by default): SDPA at 64k takes over a minute per forward on one
thread, so lengths from there are timed `--long_repeats` times after the first call (default 1: one
timed call besides the first), and with `--long_repeats 0` the first call alone is the measurement
(its `repeats` in the row says which; a variant's first call also includes its one-off set-up). Peak
memory of one forward+backward is the growth of the resident set (RSS, Linux) in a fresh process per
variant and length (`--memory_lengths`), which sees torch's allocations where tracemalloc does not.
Writes JSON and a PNG chart, prints a markdown table (from the repository root):

    .venv/bin/python -m experiments.bench_sparsemix                  # full sweep, 1024..16384
    .venv/bin/python -m experiments.bench_sparsemix --threads 1 --variants sdpa fused --lengths 16384 32768 65536 \\
        --memory_lengths 65536 --output benchmarks/results/sparsemix_long_1thread.json   # 32k/64k (issue 31 item 2)
    .venv/bin/python -m experiments.bench_sparsemix --quick          # smoke run: tiny sizes, claims nothing
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from hf_multimax.integrations.sparsemix_attention import sparsemix_attention_forward
from hf_multimax.layers.sparsemix import SparseMixSettings
from hf_multimax.ops.sparsemix import SELECTORS

from .harness import (
    HelpFormatter,
    forward_backward_step,
    machine,
    output_path,
    peak_memory_mib,
    plot_against_baseline,
    sweep,
    time_forward_backward,
    write_results,
)

__all__ = ["MAX_LEN", "QUICK", "TARGETS", "bench_sparsemix", "main", "summary"]

H, D = 8, 64
# Where each variant stops being run: eager keeps every gathered tile for its backward.
MAX_LEN = {"sdpa": 65536, "blocked": 32768, "fused": 65536, "eager": 8192, "flex": 16384}
LONG_FROM = 32768  # lengths from here are timed `long_repeats` times (SDPA: over a minute per forward at 64k)
# The targets at L=16384, drawn on the chart: measure -> [(ratio, label)].
TARGETS = {"forward_s": [(10.0, "target: 10x at 16k")], "forward_backward_s": [(10.0, "target: 10x at 16k")],
           "peak_mib": [(1.0, "target: <= SDPA")]}
# The CI smoke run: tiny sizes, one repeat, still more than top_k + 2 blocks so the sparse path runs.
QUICK = {"lengths": [256, 512], "memory_lengths": [512], "repeats": 1, "block_size": 16, "top_k": 2}


def attended_pairs(variant: str, length: int, settings: SparseMixSettings) -> int:
    """(query, key) pairs one head attends, causal, by the same rule for every variant: the pairs a
    query may see (dense: L(L+1)/2), not what a kernel multiplies (SDPA's and SparseMix's tiles both
    also cover masked pairs on the diagonal). SparseMix: per query block, its kept blocks
    (min(top_k + sink + local, blocks so far)), the local one up to the causal frontier."""
    if variant == "sdpa" or length <= settings.block_size * settings.kept_blocks:  # short inputs run densely
        return length * (length + 1) // 2
    bs, kept = settings.block_size, settings.kept_blocks
    full_blocks, tail = divmod(length, bs)
    pairs = 0
    for a in range(full_blocks + (tail > 0)):
        rows = bs if a < full_blocks else tail
        pairs += rows * bs * (min(kept, a + 1) - 1) + rows * (rows + 1) // 2
    return pairs


def gflops(variant: str, length: int, settings: SparseMixSettings, timing: dict) -> dict:
    """GFLOP/s of a timed call: 2 flops per multiply-add, 2 products (Q.K^T, P.V) of D per attended
    pair and head forward, 7 forward+backward (the backward recomputes the scores and runs dP, dQ,
    dK, dV), as FlashAttention counts; the selection's time is in the timing, its flops are not."""
    forward_flop = 2 * 2 * D * H * attended_pairs(variant, length, settings)
    rates = {}
    for key, flop in (("forward_s", forward_flop), ("forward_backward_s", 3.5 * forward_flop)):
        if timing.get(key):
            rates[key.replace("_s", "_gflops")] = round(flop / timing[key] / 1e9, 2)
    return rates


def make_inputs(length: int, requires_grad: bool, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(1, H, length, D, generator=g).requires_grad_(requires_grad) for _ in range(3)]


def make_module(settings: SparseMixSettings, variant: str) -> torch.nn.Module:
    """The attention module of a one-layer Llama (hidden H * D) running `variant`: "sdpa", or a
    SparseMix backend with a trained-looking selector (not the zero start)."""
    import hf_multimax  # noqa: F401  (registers attn_implementation="sparsemix")
    from transformers import AutoModelForCausalLM, LlamaConfig

    # rope_theta 1e9 as the retrieval experiment's model: "block_rotary" then reads 14 of the 32 pairs whole.
    config = LlamaConfig(vocab_size=64, hidden_size=H * D, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=H, num_key_value_heads=H, head_dim=D, max_position_embeddings=1 << 16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    torch.manual_seed(0)
    if variant == "sdpa":
        return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa").model.layers[0].self_attn.eval()
    config.sparsemix = settings.replace(backend=variant).to_dict()
    model = AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    module = model.model.layers[0].self_attn.eval()
    scorer = module.sparsemix
    with torch.no_grad():
        zero_start = scorer.w_key if scorer.is_block_scorer else scorer.w_weight
        zero_start.normal_(std=zero_start.shape[-2] ** -0.5)
        if settings.normalizer == "multimax":  # trained-looking scalars: the modulator is not skipped as identity
            for name, value in {"t1": 0.1, "t2": 0.1, "t3": 0.05, "t4": 0.05, "b1": -1.0, "d1": 1.0, "b2": -2.0,
                                "d2": 2.0}.items():
                getattr(module.multimax, name).fill_(value)
    return module


def run(variant: str, q, k, v, module: torch.nn.Module):
    """One call of the registered attention function, its `[B, Q, H, D]` output viewed as `[B, H, Q, D]`."""
    attention = sdpa_attention_forward if variant == "sdpa" else sparsemix_attention_forward
    return attention(module, q, k, v, None, scaling=D**-0.5, dropout=0.0)[0].transpose(1, 2)


def memory_step(variant: str, length: int, settings: dict):
    """The forward+backward whose peak `peak_memory_mib` measures (in its fresh process)."""
    settings = SparseMixSettings.from_dict(settings)
    module = make_module(settings, variant)
    warmup = make_inputs(4 * settings.block_size * settings.kept_blocks, True)
    return forward_backward_step(lambda *x: run(variant, *x, module), warmup, make_inputs(length, True))


def time_once(run, make_inputs, repeats: int, backward: bool = True) -> dict:
    """`time_forward_backward` for the long lengths: `repeats` timed calls after the first (their
    median), or with `repeats=0` the first call alone; `repeats` is recorded in the result."""
    if repeats > 0:
        return {**time_forward_backward(run, make_inputs, repeats, backward=backward), "repeats": repeats}
    inputs = make_inputs(False)
    t0 = time.perf_counter()
    with torch.no_grad():
        run(*inputs)
    result = {"forward_s": time.perf_counter() - t0, "repeats": 0}
    if backward:
        inputs = make_inputs(True)
        grad = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1))
        t0 = time.perf_counter()
        run(*inputs).backward(grad)
        result["forward_backward_s"] = time.perf_counter() - t0
    return result


def bench_sparsemix(lengths, memory_lengths, variants, repeats: int, block_size: int, top_k: int,
                    selector: str = "block", long_from: int = LONG_FROM, long_repeats: int = 1,
                    normalizer: str = "softmax") -> dict:
    """Every measurement of the module docstring for `variants` (names in `MAX_LEN`; SDPA, the
    baseline, is always measured; peak memory for SDPA and the trainable `blocked` and `fused`)."""
    unknown = sorted(set(variants) - set(MAX_LEN))
    if unknown:
        raise ValueError(f"unknown variant(s) {unknown}; choose from {sorted(MAX_LEN)}")
    variants = ["sdpa", *(v for v in variants if v != "sdpa")]
    settings = SparseMixSettings(block_size=block_size, top_k=top_k, selector=selector, normalizer=normalizer)
    modules = {v: make_module(settings, v) for v in variants}

    def time_variant(variant, length):
        # CPU flex has no backward.
        timer = time_once if length >= long_from else time_forward_backward
        timing = timer(lambda *x: run(variant, *x, modules[variant]), lambda grad: make_inputs(length, grad),
                       long_repeats if length >= long_from else repeats, backward=variant != "flex")
        return {**timing, **gflops(variant, length, settings, timing)}

    rows = {n: {"length": n} for n in lengths}
    sweep(rows, [(n, v) for n in lengths for v in variants if n <= MAX_LEN[v]], time_variant, "timing")
    sweep(rows, [(n, v) for n in memory_lengths for v in variants if v in ("sdpa", "blocked", "fused")],
          lambda v, n: {"peak_mib": peak_memory_mib("experiments.bench_sparsemix:memory_step", v, n, settings.to_dict())},
          "peak memory")
    return {
        "machine": machine(),
        "shape": {"B": 1, "H": H, "D": D, "causal": True},
        "settings": settings.to_dict(),
        "variants": variants,
        "repeats": repeats,
        "long_from": long_from,
        "long_repeats": long_repeats,
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
               f"{m.get('cpu_model', m['cpu'])} ({m['threads']} threads)"),
    )


def summary(results: dict) -> str:
    """Markdown tables: speed-ups over SDPA per length, and each trainable variant's peak memory
    against SDPA's; then every variant's GFLOP/s (`gflops`) and its share of SDPA's; then the machine."""
    variants = results["variants"][1:]
    with_memory = [v for v in variants if any("peak_mib" in row.get(v, {}) for row in results["rows"])]
    lines = ["| L | " + " | ".join(f"{v} fwd | {v} fwd+bwd" for v in variants)
             + "".join(f" | peak mem ({v}/SDPA)" for v in with_memory) + " |"]
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for v in variants:
            r = row.get(v, {})
            for key in ("forward_s", "forward_backward_s"):
                cells.append(f"{sdpa[key] / r[key]:.2f}x" if key in r and sdpa.get(key) else "-")
        for v in with_memory:
            mem = row.get(v, {}).get("peak_mib"), sdpa.get("peak_mib")
            cells.append(f"{mem[0]:.0f} / {mem[1]:.0f} MiB" if all(mem) else "-")
        few = sdpa.get("repeats")
        label = f"{row['length']}" + ("" if few is None else " (first call only)" if few == 0 else f" ({few} timed)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    # Per-flop efficiency: each variant's GFLOP/s over the pairs it attends, beside SDPA's.
    lines += ["", "| L | " + " | ".join(f"{v} GFLOP/s fwd | {v} fwd+bwd" for v in results["variants"]) + " |"]
    for row in results["rows"]:
        sdpa = row.get("sdpa", {})
        cells = []
        for v in results["variants"]:
            r = row.get(v, {})
            for key in ("forward_gflops", "forward_backward_gflops"):
                rate = r.get(key)
                share = f" ({rate / sdpa[key]:.2f} of SDPA)" if rate and v != "sdpa" and sdpa.get(key) else ""
                cells.append(f"{rate:.1f}{share}" if rate else "-")
        lines.append(f"| {row['length']} | " + " | ".join(cells) + " |")
    m = results["machine"]
    lines.append(f"\n{m.get('cpu_model', m['cpu'])}, ISA {m['capability']}, {m['threads']} threads, torch {m['torch']}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_sparsemix", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384], help="sequence lengths to time")
    parser.add_argument("--memory_lengths", type=int, nargs="*", default=[16384], help="lengths whose peak memory is measured (fresh process each)")
    parser.add_argument("--variants", nargs="+", default=["sdpa", "blocked", "eager", "flex"], choices=list(MAX_LEN), help="what to time (sdpa is the dense baseline)")
    parser.add_argument("--block_size", type=int, default=SparseMixSettings.block_size, help="SparseMix block size")
    parser.add_argument("--top_k", type=int, default=SparseMixSettings.top_k, help="key blocks kept per query block besides sink and local")
    parser.add_argument("--selector", default="auto", choices=["auto", *SELECTORS], help="what ranks the key blocks (SparseMixSettings.selector; auto: block_rotary on the benchmark's Llama)")
    parser.add_argument("--normalizer", default="softmax", choices=["softmax", "multimax"], help="SparseMix's normalizer (multimax: with non-zero scalars, t1=t2=0.1, t3=t4=0.05, breakpoints -1/1 and -2/2); SDPA stays softmax")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per measurement (median reported)")
    parser.add_argument("--long_from", type=int, default=LONG_FROM, help="lengths from here are timed --long_repeats times")
    parser.add_argument("--long_repeats", type=int, default=1, help="timed repeats after the first call at long lengths (0: the first call alone)")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/bench_sparsemix.json; with --quick outputs/bench_sparsemix_quick.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat; claims nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_sparsemix(args.lengths, args.memory_lengths, args.variants, args.repeats, args.block_size,
                              args.top_k, args.selector, args.long_from, args.long_repeats, args.normalizer)
    results["quick"] = args.quick
    write_results(results, output_path("bench_sparsemix", "quick" if args.quick else None, args.output), plot)
    print(summary(results))
    if args.quick:
        print("SMOKE RUN (--quick): tiny sizes and one repeat; these ratios are not measurements of the targets.")
    return results


if __name__ == "__main__":
    main()
