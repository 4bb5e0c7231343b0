"""The scorer's training signal: KL from the dense attention mass per key block to the scorer's block
distribution, on a sample of query blocks (the DeepSeek DSA / SeerAttention recipe)."""

from __future__ import annotations

from typing import Callable

import torch

from ..naive_attention import naive_attention
from .selection import BlockGeometry, candidate_blocks

__all__ = ["dense_block_mass", "dense_rows", "kl_terms", "sample_query_blocks", "scorer_kl"]


def sample_query_blocks(geometry: BlockGeometry, n: int, *, sink: bool, local: bool, device=None) -> torch.Tensor:
    """Up to `n` distinct query blocks (relative indices) that have at least one block to choose."""
    allowed, forced = candidate_blocks(geometry, sink=sink, local=local, device=device)
    eligible = (allowed & ~forced).any(dim=-1).nonzero()[:, 0]
    return eligible[torch.randperm(len(eligible), device=device)[:n]]


def dense_rows(
    query: torch.Tensor,
    key: torch.Tensor,
    geometry: BlockGeometry,
    q_block: int,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Dense attention probabilities `[B, H, rows, K]` of the real query rows of query block `q_block`
    (relative index), causal as the geometry says, under `mask` and `score_mod`."""
    bs = geometry.block_size
    r0 = max(0, q_block * bs - geometry.front_pad)
    r1 = min(geometry.q_len, (q_block + 1) * bs - geometry.front_pad)
    rows = query[:, :, r0:r1]
    keep = None
    if geometry.causal:
        q_pos = torch.arange(r0, r1, device=query.device)[:, None] + geometry.q_offset
        keep = torch.arange(geometry.k_len, device=query.device)[None, :] <= q_pos
    if mask is not None:
        rows_mask = mask[:, :, r0:r1] if mask.shape[-2] > 1 else mask
        keep = rows_mask if keep is None else rows_mask & keep
    return naive_attention(rows, key, key, score_mod=score_mod, scale=scale, mask=keep)[1]


def dense_block_mass(
    query: torch.Tensor,
    key: torch.Tensor,
    geometry: BlockGeometry,
    q_block: int,
    *,
    scale: float,
    mask: torch.Tensor | None = None,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
    pool: str = "max",
) -> torch.Tensor:
    """Dense attention mass of query block `q_block` (relative index) on each key block, averaged
    over the query heads of each key/value head, then pooled over the block's queries: `[B, Hkv,
    n_k_blocks]`. `pool="max"` (SeerAttention's max-pooled target; the default) keeps a block that
    one query needs; `pool="mean"` sums to 1 and lets the block's other queries outvote it."""
    if pool not in ("max", "mean"):
        raise ValueError(f"pool={pool!r} is not supported; allowed values: ('max', 'mean')")
    probs = dense_rows(query, key, geometry, q_block, scale=scale, mask=mask, score_mod=score_mod)
    bs = geometry.block_size
    pad = geometry.n_k_blocks * bs - geometry.k_len
    mass = torch.nn.functional.pad(probs, (0, pad)).unflatten(-1, (geometry.n_k_blocks, bs)).sum(-1)
    B, H, n_rows = mass.shape[:3]
    n_kv = key.shape[1]
    mass = mass.view(B, n_kv, H // n_kv, n_rows, -1).mean(2)  # [B, Hkv, rows, nKB]
    return mass.amax(-2) if pool == "max" else mass.mean(-2)


def kl_terms(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise `target * (log target - log_q)`, summed by the caller: 0 where the target is 0
    (also where `log_q` is -inf, outside the candidates)."""
    return torch.xlogy(target, target) - torch.where(target > 0, target * log_q, torch.zeros_like(log_q))


def scorer_kl(
    scores: torch.Tensor,
    query: torch.Tensor,
    key: torch.Tensor,
    geometry: BlockGeometry,
    q_blocks: torch.Tensor,
    *,
    scale: float,
    sink: bool,
    local: bool,
    mask: torch.Tensor | None = None,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
    target_power: float = 1.0,
) -> torch.Tensor:
    """Mean over batch, key/value heads and the sampled query blocks of KL(target || scorer), over the
    blocks the scorer chooses among (allowed and not forced). The target is the detached dense
    attention mass (max-pooled over the block's queries) raised to `target_power` and renormalised
    over those blocks (computed in log space: a power of 64 underflows fp32 otherwise).

    Args:
        scores (`torch.Tensor`): `[B, Hkv, len(q_blocks), n_k_blocks]` scorer output for the sampled
            query blocks (`scorer_block_scores(..., q_blocks=q_blocks)`), with its graph.
        query, key (`torch.Tensor`): the attention inputs (detached here).
        q_blocks (`torch.Tensor`): relative query-block indices from `sample_query_blocks`.
    """
    allowed, forced = candidate_blocks(geometry, sink=sink, local=local, device=scores.device)
    query, key = query.detach(), key.detach()
    terms = []
    for n, a in enumerate(q_blocks.tolist()):
        cand = allowed[a] & ~forced[a]
        with torch.no_grad():
            mass = dense_block_mass(query, key, geometry, a, scale=scale, mask=mask, score_mod=score_mod)
            log_t = (target_power * mass.clamp_min(1e-30).log()).masked_fill(~cand, float("-inf"))
            target = torch.softmax(log_t, dim=-1) * (mass * cand).sum(-1, keepdim=True).gt(0)
        log_s = torch.log_softmax(scores[:, :, n].float().masked_fill(~cand, float("-inf")), dim=-1)
        terms.append(kl_terms(target, log_s).sum(-1).mean())
    if not terms:
        return scores.sum() * 0.0
    return torch.stack(terms).mean()
