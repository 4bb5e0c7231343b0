"""Where a SparseMix decoding step's time goes, next to the memory-bandwidth floor of what it reads.

The benchmark's model (`bench_sparsemix_decode.make_models`: 2-layer Llama, hidden 512, 8 heads of 64,
MLP 1024), a static cache prefilled with `context` tokens, then `steps` single-token forwards (each
a decoding step at the next position). Three variants alternate within each repeat (a shared
machine's load drifts) and medians are reported: dense SDPA, SparseMix through its one-call decoding
step (`fused`), and the same SparseMix model with that step switched off (`unfused`: scorer,
`fused_select_blocks`, fused kernel, what decoding ran before the step). Each step is split by
timers wrapped around the pieces (seconds per step, both layers together):

- `outside`: everything but the attention functions (embeddings, projections, rotary, MLP, norms,
  the cache update, the logits);
- `summary`: keeping the cache's per-block key summary up to date (`cached_key_summary`);
- `selector`: the block scores (`Selector.block_scores`);
- `topk`: the top-k selection (`fused_select_blocks`);
- `kernel`: the C++ attention kernel over the kept blocks (the extension's call alone);
- `fused_step`: the one-call C++ decoding step (selector scores, top-k and kernel), when it runs;
- `glue`: the rest of the attention function (argument checks, mask handling, layout, dispatch).

The floor: bytes one step reads that depend on the context (the kept key/value blocks and the
selector's block summaries) plus the model's weights, divided by the bandwidth a single thread
reaches (a large read and a large copy, measured here).

    .venv/bin/python -m experiments.profile_sparsemix_decode --threads 1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import statistics
import time

import torch

__all__ = ["main", "measure_bandwidth", "profile_decode"]

PIECES = ("summary", "selector", "topk", "kernel", "fused_step")
_GLUE_HELPERS = ("refuse_unsupported", "fold_selection", "settings_of", "layer_outputs", "prepare_inputs",
                 "_drop_empty_cache_tail", "block_geometry", "attention_call", "call_is_causal")


def measure_bandwidth(mib: int = 512, repeats: int = 5) -> dict:
    """Single-thread memory bandwidth, GB/s: a read (sum of a large fp32 tensor) and a copy (counted
    as bytes read + bytes written)."""
    x = torch.ones(mib << 18)
    y = torch.empty_like(x)
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        y.copy_(x)
        copies.append(time.perf_counter() - t0)
    nbytes = x.numel() * 4
    return {"read_gb_s": round(nbytes / min(reads) / 1e9, 2), "copy_gb_s": round(2 * nbytes / min(copies) / 1e9, 2)}


class _Timers:
    """Seconds spent in each wrapped piece, summed until `take()`."""

    def __init__(self):
        self.spent = collections.defaultdict(float)

    def wrap(self, name, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] += time.perf_counter() - t0

        return timed

    def take(self) -> dict:
        spent, self.spent = dict(self.spent), collections.defaultdict(float)
        return spent


@contextlib.contextmanager
def _instrumented(timers: _Timers, detail: bool = False):
    """Timers around the attention functions and the pieces of SparseMix's (restored on exit)."""
    import dataclasses

    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from hf_multimax.integrations import sparsemix_attention as attn_mod
    from hf_multimax.ops.multimax.fused import load_fused_extension
    from hf_multimax.ops.sparsemix import pipeline

    ext = load_fused_extension()
    saved = []

    def patch(obj, name, new, setter=setattr):
        old = obj[name] if isinstance(obj, dict) else getattr(obj, name)
        saved.append((obj, name, old))
        if isinstance(obj, dict):
            obj[name] = new
        else:
            setter(obj, name, new)
        return old

    try:
        for name in ("sdpa", "sparsemix"):
            patch(ALL_ATTENTION_FUNCTIONS._global_mapping, name,
                  timers.wrap("attention", ALL_ATTENTION_FUNCTIONS._global_mapping[name]))
        patch(attn_mod, "cached_key_summary", timers.wrap("summary", attn_mod.cached_key_summary))
        for sel, spec in list(pipeline.SELECTORS.items()):
            patch(pipeline.SELECTORS, sel, dataclasses.replace(spec, block_scores=timers.wrap("selector", spec.block_scores)))
        patch(pipeline, "fused_select_blocks", timers.wrap("topk", pipeline.fused_select_blocks))
        patch(ext, "sparse_forward", timers.wrap("kernel", ext.sparse_forward))
        if hasattr(attn_mod, "fused_sparsemix_decode"):
            patch(attn_mod, "fused_sparsemix_decode", timers.wrap("decode_wrapper", attn_mod.fused_sparsemix_decode))
        if detail:  # the attention function's helpers, each timed on its own (what `glue` is made of)
            for name in _GLUE_HELPERS:
                patch(attn_mod, name, timers.wrap(f"glue:{name}", getattr(attn_mod, name)))
        if hasattr(ext, "sparse_decode_step"):
            patch(ext, "sparse_decode_step", timers.wrap("fused_step", ext.sparse_decode_step))
        yield
    finally:
        for obj, name, old in reversed(saved):
            if isinstance(obj, dict):
                obj[name] = old
            else:
                setattr(obj, name, old)


def _split(runs: list[dict]) -> dict:
    """Medians of each timer over the runs, with `outside` and `glue` derived (module docstring)."""
    split = {key: statistics.median([r.get(key, 0.0) for r in runs]) for key in sorted({k for r in runs for k in r})}
    for key in ("attention", *PIECES):
        split.setdefault(key, 0.0)
    split["outside"] = split["step"] - split["attention"]
    split["glue"] = split["attention"] - sum(split[k] for k in PIECES)
    return split


@torch.no_grad()
def profile_decode(context: int, steps: int, repeats: int, block_size: int, top_k: int,
                   model_name: str = "sparsemix_block_rotary", detail: bool = False) -> dict:
    """The step times and the split (module docstring) of three variants, interleaved in every repeat:
    `sdpa`, `fused` (SparseMix with its one-call decoding step) and `unfused` (the same model with the
    step switched off: scorer, `fused_select_blocks` and the fused kernel, as before the step existed).
    `detail` also times the attention function's helpers one by one (`glue:<name>`) and the Python
    wrapper of the fused step (`decode_wrapper`), whose timers then add their own cost to the step."""
    from transformers import StaticCache

    from hf_multimax.integrations import sparsemix_attention

    from .bench_sparsemix_decode import make_models

    models = make_models(block_size, top_k, names=("sdpa", model_name))
    variants = {"sdpa": models["sdpa"], "fused": models[model_name], "unfused": models[model_name]}
    prompt = torch.randint(0, 1000, (1, context), generator=torch.Generator().manual_seed(0))
    prefilled = {}
    for name, model in models.items():
        cache = StaticCache(config=model.config, max_cache_len=context + steps + 1)
        model(prompt, cache=cache, use_cache=True)
        prefilled[name] = cache
    timers = _Timers()
    runs = {name: [] for name in variants}
    step_features = sparsemix_attention.DECODE_FEATURES

    def run(name):
        model = variants[name]
        cache = copy.deepcopy(prefilled["sdpa" if name == "sdpa" else model_name])
        sparsemix_attention.DECODE_FEATURES = {} if name == "unfused" else step_features
        token = prompt[:, -1:]
        total = 0.0
        spent = collections.Counter()
        try:
            for i in range(steps + 1):
                pos = torch.tensor([context + i])
                timers.take()
                t0 = time.perf_counter()
                logits = model(token, cache=cache, use_cache=True, position_ids=pos[None], cache_position=pos).logits
                dt = time.perf_counter() - t0
                token = logits[:, -1:].argmax(-1)
                if i == 0:
                    continue  # the first step after the copy: the summary is taken over, caches are cold
                total += dt
                spent.update(timers.take())
        finally:
            sparsemix_attention.DECODE_FEATURES = step_features
        return {"step": total / steps, **{k: v / steps for k, v in spent.items()}}

    with _instrumented(timers, detail):
        for name in variants:  # warm-up
            run(name)
        for _ in range(repeats):
            for name in variants:
                runs[name].append(run(name))
    split = {name: _split(r) for name, r in runs.items()}
    step_s = {name: s["step"] for name, s in split.items()}
    return {"context": context, "steps": steps, "repeats": repeats, "model": model_name,
            "step_s": step_s, "tokens_per_s": {k: 1 / v for k, v in step_s.items()},
            "speedup_vs_sdpa": {k: step_s["sdpa"] / v for k, v in step_s.items()},
            "split_s": split, "floor": floor_bytes(models[model_name], context, block_size, top_k)}


def floor_bytes(model, context: int, block_size: int, top_k: int) -> dict:
    """Bytes a decoding step must read (both layers): the kept key/value blocks, the selector's block
    summaries (the last, partial block's placeholder aside), the weights (the selectors' included), and
    what dense SDPA reads of the cache instead of the kept blocks."""
    cfg = model.config
    layers, hkv = cfg.num_hidden_layers, cfg.num_key_value_heads
    d = cfg.hidden_size // cfg.num_attention_heads
    kept = min(top_k + 2, -(-context // block_size))
    kv = layers * hkv * kept * block_size * d * 4 * 2
    scorer = model.model.layers[0].self_attn.sparsemix
    width = d + scorer.w_key.shape[-1]
    summary = layers * hkv * (context // block_size) * width * 4
    # Every weight once, but of the input embedding only the token's row.
    embedding = model.get_input_embeddings().weight
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights -= (embedding.shape[0] - 1) * embedding.shape[1] * embedding.element_size()
    dense_kv = layers * hkv * context * d * 4 * 2
    return {"kept_kv_bytes": kv, "summary_bytes": summary, "weight_bytes": weights, "dense_kv_bytes": dense_kv}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--context", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--block_size", type=int, default=32)
    parser.add_argument("--top_k", type=int, default=18)
    parser.add_argument("--model", default="sparsemix_block_rotary")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=None)
    parser.add_argument("--detail", action="store_true", help="also time the attention function's helpers")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    bw = measure_bandwidth()
    res = profile_decode(args.context, args.steps, args.repeats, args.block_size, args.top_k, args.model, args.detail)
    res["bandwidth"] = bw
    f = res["floor"]
    gbs = bw["read_gb_s"] * 1e9
    res["floor_s"] = {"attention": (f["kept_kv_bytes"] + f["summary_bytes"]) / gbs,
                      "weights": f["weight_bytes"] / gbs, "sdpa_attention": f["dense_kv_bytes"] / gbs}
    import json
    import os

    res["load_average"] = list(os.getloadavg())
    text = json.dumps(res, indent=1)
    print(text)
    if args.output:
        with open(args.output, "w") as fh:
            fh.write(text + "\n")
    return res


if __name__ == "__main__":
    main()
