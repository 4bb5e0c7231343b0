"""SparseMix decoding against dense SDPA at long context, measured in the same run.

A 2-layer Llama (hidden 512, 8 heads of 64, MLP 1024, vocabulary 1000), random weights, the SparseMix
models with the same weights and a trained-looking selector (the script defaults to SparseMix's defaults,
block 32, top-18). For each cache (`dynamic`: transformers' `DynamicCache` with its own layers; `static`;
`growing`: the plugin's `SparseMixCache`, whose layers grow in place) and each model: the prompt
(`context` random tokens) is prefilled once (timed once), then greedy `generate` continues from a copy
of that cache for `new_tokens` tokens, every one a decoding step; every (cache, model) pair is
timed once per repeat, all interleaved (the load of a shared machine drifts), and the median is
reported as decoding tokens/s, with its ratio to dense SDPA on the same cache.

`default` is `generate()` given no cache argument at all (what a user gets without flags: for SparseMix
models the plugin's growing cache, for SDPA transformers' `DynamicCache`): each run prefills the prompt
itself, and only its decoding steps are timed (from the first generated token to the last, stamped by a
stopping criterion: `new_tokens - 1` steps). Its ratio is to SDPA's `default` (= `dynamic`) row;
`speedup_vs_sdpa_static` also gives it against SDPA with a static cache, the fastest dense choice.

Writes JSON and a PNG chart, prints the table (from the repository root):

    .venv/bin/python -m experiments.bench_sparsemix_decode --threads 1              # 16k context
    .venv/bin/python -m experiments.bench_sparsemix_decode --threads 1 --models sparsemix_block \\
        --output benchmarks/results/sparsemix_decode_default.json                   # the no-flags row (issue 31)
    .venv/bin/python -m experiments.bench_sparsemix_decode --quick                  # smoke run: tiny sizes, claims nothing
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import time

import torch

from hf_multimax.layers.sparsemix import SparseMixSettings

from .harness import HelpFormatter, machine, output_path, write_results

__all__ = ["QUICK", "bench_sparsemix_decode", "decode_summary", "main"]

VARIANTS = {"sdpa": None, "sparsemix_block": "block", "sparsemix_block_norms": "block_norms",
            "sparsemix_block_rotary": "block_rotary", "sparsemix_token": "token"}
CACHES = ("dynamic", "static", "growing", "default")
QUICK = {"context": 512, "new_tokens": 4, "repeats": 1, "block_size": 16, "top_k": 2}


def make_models(block_size: int, top_k: int, layers: int = 2, names=tuple(VARIANTS)) -> dict:
    import hf_multimax  # noqa: F401  (registers attn_implementation="sparsemix")
    from transformers import AutoModelForCausalLM, LlamaConfig

    # rope_theta 1e9 as the retrieval experiment's model: "block_rotary" then reads 14 of the 32 pairs whole.
    config = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1024, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1 << 16,
                         rope_parameters={"rope_type": "default", "rope_theta": 1e9})
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="sdpa").eval()
    models = {"sdpa": dense}
    for name, selector in VARIANTS.items():
        if selector is None or name not in names:
            continue
        sparse_config = copy.deepcopy(config)
        sparse_config.sparsemix = {"block_size": block_size, "top_k": top_k, "selector": selector}
        model = AutoModelForCausalLM.from_config(sparse_config, attn_implementation="sparsemix").eval()
        model.load_state_dict(dense.state_dict(), strict=False)
        with torch.no_grad():  # trained-looking: away from the zero start
            for layer in model.model.layers:
                scorer = layer.self_attn.sparsemix
                zero_start = scorer.w_key if selector != "token" else scorer.w_weight
                zero_start.normal_(std=zero_start.shape[-2] ** -0.5)
        models[name] = model
    return models


def _new_cache(model, cache: str, max_len: int):
    from transformers import DynamicCache, StaticCache

    from hf_multimax.integrations.sparsemix_generation import SparseMixCache

    if cache == "static":
        return StaticCache(config=model.config, max_cache_len=max_len)
    if cache == "growing":
        return SparseMixCache(config=model.config, capacity=max_len)
    return DynamicCache(config=model.config)


class _StepClock:
    """A stopping criterion that never stops: the time each generated token is ready."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


@torch.no_grad()
def bench_sparsemix_decode(context: int, new_tokens: int, repeats: int, block_size: int, top_k: int,
                           names=tuple(VARIANTS), caches=CACHES) -> dict:
    """Every measurement of the module docstring, for the models `names` (of `VARIANTS`; SDPA, the
    baseline, always) and the caches `caches` (of `CACHES`)."""
    models = make_models(block_size, top_k, names=names)
    prompt = torch.randint(0, 1000, (1, context + 1), generator=torch.Generator().manual_seed(0))
    # Every (cache, model) is timed once per repeat, all interleaved: on a shared machine the load drifts, and
    # the rows are compared with one another (default against SDPA static), not only within a cache.
    decoders, prefill_s, cache_layers = {}, {}, {}
    for cache in (c for c in CACHES if c in caches):
        for name, model in models.items():
            decoders[cache, name] = _decoder(cache, name, model, prompt, context, new_tokens, prefill_s, cache_layers)
    for key, decode in decoders.items():  # warm-up
        decode()
    times = {key: [] for key in decoders}
    for _ in range(repeats):
        for key, decode in decoders.items():
            times[key].append(decode())
    rows = []
    for (cache, name), ts in times.items():
        median = statistics.median(ts)
        row = {"cache": cache, "model": name, "prefill_s": round(prefill_s[cache, name], 3),
               "decode_s": round(median, 4), "tokens_per_s": round(new_tokens / median, 2),
               "times_s": [round(t, 4) for t in ts]}
        if (cache, name) in cache_layers:
            row["cache_layers"] = cache_layers[cache, name]
        rows.append(row)
    for r in rows:
        dense = next(d for d in rows if d["cache"] == r["cache"] and d["model"] == "sdpa")
        r["speedup_vs_sdpa"] = round(r["tokens_per_s"] / dense["tokens_per_s"], 3)
    static = next((r for r in rows if r["cache"] == "static" and r["model"] == "sdpa"), None)
    for r in rows:
        if r["cache"] == "default" and static is not None:
            r["speedup_vs_sdpa_static"] = round(r["tokens_per_s"] / static["tokens_per_s"], 3)
    return {"machine": machine(), "threads": torch.get_num_threads(), "load_average": list(os.getloadavg()),
            "context": context, "new_tokens": new_tokens,
            "repeats": repeats, "model": "Llama, 2 layers, hidden 512, 8 heads of 64, MLP 1024",
            "sparsemix": {"block_size": block_size, "top_k": top_k}, "rows": rows}


def _decoder(cache, name, model, prompt, context, new_tokens, prefill_s, cache_layers):
    """A zero-argument call that decodes `new_tokens` tokens with `cache` and returns its seconds."""
    from transformers import StoppingCriteriaList

    if cache == "default":  # generate() with no cache argument: it prefills, only its decoding steps are timed
        def decode():
            clock = _StepClock()
            t0 = time.perf_counter()
            out = model.generate(prompt[:, :context], attention_mask=torch.ones_like(prompt[:, :context]),
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 stopping_criteria=StoppingCriteriaList([clock]), return_dict_in_generate=True)
            assert out.sequences.shape[1] == context + new_tokens
            cache_layers[cache, name] = sorted({type(layer).__name__ for layer in getattr(out.cache, "layers", [])})
            prefill_s[cache, name] = clock.stamps[0] - t0
            # new_tokens - 1 decoding steps, scaled to new_tokens for the same tokens/s as the other rows
            return (clock.stamps[-1] - clock.stamps[0]) * new_tokens / (new_tokens - 1)

        return decode
    prefilled = _new_cache(model, cache, context + new_tokens + 1)
    t0 = time.perf_counter()
    model(prompt[:, :context], cache=prefilled, use_cache=True)
    prefill_s[cache, name] = time.perf_counter() - t0

    def decode():
        c = copy.deepcopy(prefilled)
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), cache=c, max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False)
        seconds = time.perf_counter() - t0
        assert out.shape[1] == prompt.shape[1] + new_tokens
        return seconds

    return decode


def decode_summary(results: dict) -> str:
    lines = [f"decoding at {results['context']} tokens of context, {results['new_tokens']} new tokens, "
             f"{results['threads']} thread(s), median of {results['repeats']}; {results['machine']}; "
             f"load average at the end {results.get('load_average')}", "",
             "| cache | model | prefill s | decode tokens/s | / SDPA (same cache) | / SDPA static |",
             "|---|---|---|---|---|---|"]
    for r in results["rows"]:
        vs_static = f"{r['speedup_vs_sdpa_static']:.2f}x" if "speedup_vs_sdpa_static" in r else ""
        lines.append(f"| {r['cache']} | {r['model']} | {r['prefill_s']:.2f} | {r['tokens_per_s']:.1f} | "
                     f"{r['speedup_vs_sdpa']:.2f}x | {vs_static} |")
    return "\n".join(lines)


def plot_decode(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    names = [n for n in VARIANTS if any(r["model"] == n for r in results["rows"])]
    caches = [c for c in CACHES if any(r["cache"] == c for r in results["rows"])]
    width = 0.8 / len(caches)
    for i, cache in enumerate(caches):
        rows = {r["model"]: r for r in results["rows"] if r["cache"] == cache}
        ax.bar([j + width * i for j in range(len(names))], [rows[n]["tokens_per_s"] for n in names], width=width,
               label="generate() with no cache argument" if cache == "default" else f"{cache} cache")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(names))], names, fontsize=8)
    ax.set_ylabel("decode tokens/s")
    ax.set_title(f"decoding at {results['context']} context, {results['threads']} thread(s)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m experiments.bench_sparsemix_decode", description=__doc__,
                                     formatter_class=HelpFormatter)
    parser.add_argument("--context", type=int, default=16384, help="prompt tokens in the cache before decoding")
    parser.add_argument("--new_tokens", type=int, default=32, help="tokens generated per timed run")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per model (median reported)")
    parser.add_argument("--block_size", type=int, default=SparseMixSettings.block_size, help="SparseMix block size")
    parser.add_argument("--top_k", type=int, default=SparseMixSettings.top_k, help="key blocks kept per query block besides sink and local")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument("--output", default=None, help="JSON path, the PNG beside it (default: benchmarks/results/bench_sparsemix_decode.json; with --quick outputs/bench_sparsemix_decode_quick.json)")
    parser.add_argument("--models", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="what to time (sdpa, the baseline, always is; sparsemix_<selector> for each selector)")
    parser.add_argument("--caches", nargs="+", default=list(CACHES), choices=list(CACHES),
                        help="which caches to time (default: generate() with no cache argument)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny sizes, one repeat; claims nothing")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        vars(args).update(QUICK)
    results = bench_sparsemix_decode(args.context, args.new_tokens, args.repeats, args.block_size, args.top_k,
                                     names=args.models, caches=args.caches)
    results["quick"] = args.quick
    write_results(results, output_path("bench_sparsemix_decode", "quick" if args.quick else None, args.output), plot_decode)
    print(decode_summary(results))
    if args.quick:
        print("SMOKE RUN (--quick): tiny sizes and one repeat; these ratios are not measurements of the targets.")
    return results


if __name__ == "__main__":
    main()
