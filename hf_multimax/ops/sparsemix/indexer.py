"""SparseMix's token-level indexer: per-token key scores aggregated to the blocks the kernels gather.
Pure tensor maths.

The indexer is DeepSeek V3.2's lightning indexer (DSA) computed from the attention call's own inputs
(for key/value head g: the post-RoPE queries of its group's query heads side by side as x_q, its
own keys as x_k):

    I(t, s) = sum_j w_j(t) * ReLU(q_j(t) . k(s)),   q_j(t) = x_q(t) W_q[j],  k(s) = x_k(s) W_k,  w(t) = x_q(t) W_w

with `n` small heads of size `d`, one indexer per key/value head (DSA has one per layer; a selection
shared by the heads was measured worse on the retrieval task, needle recall 0.60 against 0.75: the
dense target averages a retrieval head with heads that look elsewhere).
Where DSA keeps each query's top-k tokens, SparseMix keeps blocks: the indexer's distribution
`p_t = softmax_s I(t, s)` over the keys query `t` attends is summed per key block and max-pooled over
the block's queries, which estimates the block scorer's KL target (the max-pooled dense attention
mass). A single query that needs a far block pulls it in, however the block's other queries look;
a query whose attention rests on the sink and its own block puts little mass anywhere else, so it
does not outvote it. (Normalising over the free blocks only measured the same, 0.61 against 0.60
with a shared indexer; the full softmax is kept because it estimates the block scorer's target.)

Training (`indexer_kl`): KL from the dense attention of sampled query rows (averaged over the
group's query heads, as DSA's L1-normalised head sum) to `p_t`, plus the block scorer's KL on the
resulting block scores (the ranking is what top-k needs).
"""

from __future__ import annotations

from typing import Callable

import torch

from .distill import dense_rows, kl_terms, scorer_kl
from .selection import BlockGeometry

__all__ = ["indexer_block_scores", "indexer_features", "indexer_keys", "indexer_kl", "indexer_logits"]


def indexer_keys(key: torch.Tensor, w_key: torch.Tensor) -> torch.Tensor:
    """The indexer's key of every token, per key/value head: `[B, Hkv, K, D]` -> `[B, Hkv, K, d]`
    (fp32). Per token, so a KV cache's summary grows by appending (`integrations.sparsemix_decoding`)."""
    if w_key.dim() != 3 or w_key.shape[:2] != (key.shape[1], key.shape[-1]):
        raise ValueError(f"indexer w_key {tuple(w_key.shape)} does not fit {key.shape[1]} key/value heads of size "
                         f"{key.shape[-1]}: [Hkv, D, d] expected")
    return torch.matmul(key.float(), w_key.float())


def indexer_features(query, key, w_query, w_key, w_weight, keys: torch.Tensor | None = None):
    """The indexer's per-token queries, weights and keys (fp32), per key/value head `g`: its queries
    read the `G` query heads of its group side by side, its keys the head's own keys.

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`.
        w_query (`torch.Tensor`): `[Hkv, G * D, n * d]`.
        w_key (`torch.Tensor`): `[Hkv, D, d]`.
        w_weight (`torch.Tensor`): `[Hkv, G * D, n]`.
        keys (`torch.Tensor`, *optional*): `indexer_keys(key, w_key)`, when already known.

    Returns:
        `(q [B, Hkv, Q, n, d], w [B, Hkv, Q, n], k [B, Hkv, K, d])`, scaled so that I starts O(1).
    """
    B, H, Q, D = query.shape
    Hkv = key.shape[1]
    G, n, d = H // Hkv, w_weight.shape[-1], w_key.shape[-1]
    if w_query.shape != (Hkv, G * D, n * d) or w_weight.shape != (Hkv, G * D, n):
        raise ValueError(
            f"indexer weights {tuple(w_query.shape)}, {tuple(w_weight.shape)} do not fit {Hkv} key/value heads of "
            f"{G} query heads of size {D} and {n} indexer heads of size {d}"
        )
    xq = query.float().view(B, Hkv, G, Q, D).transpose(2, 3).reshape(B, Hkv, Q, G * D)
    q = torch.matmul(xq, w_query.float()).view(B, Hkv, Q, n, d) * d**-0.5
    w = torch.matmul(xq, w_weight.float()) * n**-0.5
    return q, w, indexer_keys(key, w_key) if keys is None else keys


def indexer_logits(q: torch.Tensor, w: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """`I(t, s)` for rows `q [B, Hkv, R, n, d]`, `w [B, Hkv, R, n]` and keys `k [B, Hkv, K, d]`:
    `[B, Hkv, R, K]`."""
    B, Hkv, R, n, d = q.shape
    K = k.shape[2]
    s = torch.matmul(q.reshape(B, Hkv, R * n, d), k.transpose(-1, -2)).relu()  # [B, Hkv, R*n, K]
    return torch.matmul(w.reshape(-1, 1, n), s.view(-1, n, K)).view(B, Hkv, R, K)


def _allowed_keys(geometry: BlockGeometry, rows: torch.Tensor, k_len: int, mask: torch.Tensor | None) -> torch.Tensor:
    """Which of the first `k_len` keys each query row (relative index) attends: `[1 or B, 1, R, k_len]`
    (causal: keys up to the row's position; `mask` `[B, 1 or H, Q or 1, K]`: a key hidden from
    every head is left out)."""
    keys = torch.arange(k_len, device=rows.device)
    keep = (keys[None, :] <= (rows + geometry.q_offset)[:, None]) if geometry.causal else keys[None, :] >= 0
    keep = keep[None].expand(1, len(rows), k_len)
    if mask is not None:
        m = mask.any(1)
        m = m[:, rows] if m.shape[1] > 1 else m.expand(-1, len(rows), -1)
        keep = keep & m[..., :k_len]
    return keep[:, None]


def _log_softmax_over(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """log-softmax over the kept entries; -inf elsewhere and on rows that keep nothing."""
    x = logits.masked_fill(~keep, float("-inf"))
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    return x - lse.clamp_min(torch.finfo(x.dtype).min)  # empty row: -inf - min = -inf, not NaN


def indexer_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    geometry: BlockGeometry,
    *,
    mask: torch.Tensor | None = None,
    row_budget: int = 1 << 22,
    keys: torch.Tensor | None = None,
) -> torch.Tensor:
    """Block scores from the indexer: `score[a, j] = max_{t in a} log sum_{s in j} p_t(s)`.

    Args:
        query, key (`torch.Tensor`): `[B, H, Q, D]`, `[B, Hkv, K, D]`.
        weights (`tuple`): `(w_query, w_key, w_weight)` of `indexer_features`.
        geometry (`BlockGeometry`): from `block_geometry`.
        mask (`torch.Tensor`, *optional*): boolean keep mask `[B, 1 or H, Q, K]`.
        row_budget (`int`): indexer scores held at once (query blocks are processed in chunks).
        keys (`torch.Tensor`, *optional*): `indexer_keys(key, weights[1])`, when already known.

    Returns:
        `[B, Hkv, n_q_blocks, n_k_blocks]` fp32; -inf where a block holds no key the block's queries
        attend. `select_blocks` ranks the free blocks only (not the sink, the local block or the future).
    """
    q, w, k = indexer_features(query, key, *weights, keys=keys)
    B, Hkv, Q, n = w.shape
    g, bs = geometry, geometry.block_size
    scores = torch.full((B, Hkv, g.n_q_blocks, g.n_k_blocks), float("-inf"), device=query.device)
    step = max(1, row_budget // max(1, B * Hkv * bs * n * g.k_len))
    for c0 in range(0, g.n_q_blocks, step):
        c1 = min(g.n_q_blocks, c0 + step)
        rows = _rows_of(g, c0, c1, query.device)
        logp = _row_log_probs(q, w, k, g, rows, c1, mask)
        mass = _block_log_mass(logp, bs)  # [B, Hkv, R, nkb]
        # Rows -> their query blocks; max over each block's rows.
        blocks = (rows + g.front_pad) // bs - c0
        pooled = torch.full((*mass.shape[:2], c1 - c0, mass.shape[-1]), float("-inf"), device=query.device)
        pooled.scatter_reduce_(2, blocks[None, None, :, None].expand(B, Hkv, -1, mass.shape[-1]), mass, reduce="amax")
        scores[:, :, c0:c1, : mass.shape[-1]] = pooled
    return scores


def _rows_of(g: BlockGeometry, c0: int, c1: int, device) -> torch.Tensor:
    """The real query rows (relative indices) of query blocks [c0, c1)."""
    return torch.arange(max(0, c0 * g.block_size - g.front_pad), min(g.q_len, c1 * g.block_size - g.front_pad),
                        device=device)


def _row_log_probs(q, w, k, g: BlockGeometry, rows: torch.Tensor, c1: int, mask) -> torch.Tensor:
    """log p_t over the keys of `rows` (query blocks up to `c1`): `[B, Hkv, R, k_len]`, where causal
    calls stop at the last key block those queries see."""
    k_len = min(g.k_len, (c1 + g.q_block0) * g.block_size) if g.causal else g.k_len
    r0, r1 = int(rows[0]), int(rows[-1]) + 1
    logits = indexer_logits(q[:, :, r0:r1], w[:, :, r0:r1], k[:, :, :k_len])
    return _log_softmax_over(logits, _allowed_keys(g, rows, k_len, mask))


def _block_log_mass(logp: torch.Tensor, bs: int) -> torch.Tensor:
    """log of the probability mass per key block: `[..., K]` -> `[..., ceil(K / bs)]`."""
    k_len = logp.shape[-1]
    nkb = -(-k_len // bs)
    logp = torch.nn.functional.pad(logp, (0, nkb * bs - k_len), value=float("-inf"))
    return torch.logsumexp(logp.unflatten(-1, (nkb, bs)), dim=-1)


def indexer_kl(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
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
    """The indexer's training term on the sampled query blocks, per key/value head, the sum of:

    - the rows' KL (DSA's): mean over the real rows of KL(target_t || p_t) over the keys row t
      attends, the target being the row's detached dense attention (`score_mod`: the MultiMax
      modulator) averaged over the group's query heads (fully masked rows left out);
    - the blocks' KL (the block scorer's, `scorer_kl`): the indexer's block scores against the
      sharpened max-pooled dense block mass, over the blocks the query block chooses among. The rows'
      KL alone fits every row alike, and the block ranking, which top-k is about, came out worse
      than the block scorer's (needle recall 0.75 against 0.82 on the retrieval task).

    Gradients reach the indexer weights only (query and key are detached).
    """
    query, key = query.detach(), key.detach()
    q, w, k = indexer_features(query, key, *weights)
    g = geometry
    row_terms, block_scores = [], []
    for a in q_blocks.tolist():
        rows = _rows_of(g, a, a + 1, query.device)
        logp = _row_log_probs(q, w, k, g, rows, a + 1, mask)  # [B, Hkv, R, k_len]
        with torch.no_grad():
            probs = dense_rows(query, key, g, a, scale=scale, mask=mask, score_mod=score_mod)  # [B, H, R, K]
            target = probs.view(probs.shape[0], k.shape[1], -1, *probs.shape[2:]).mean(2)[..., : logp.shape[-1]]
            has_mass = target.sum(-1) > 0  # fully masked rows have none
        kl = kl_terms(target, logp).sum(-1)
        row_terms.append((kl * has_mass).sum() / has_mass.sum().clamp_min(1))
        mass = _block_log_mass(logp, g.block_size).amax(2)  # [B, Hkv, nkb]
        block_scores.append(torch.nn.functional.pad(mass, (0, g.n_k_blocks - mass.shape[-1]), value=float("-inf")))
    if not row_terms:
        return sum(p.sum() for p in weights) * 0.0
    blocks_kl = scorer_kl(torch.stack(block_scores, dim=2), query, key, g, q_blocks, scale=scale, sink=sink,
                          local=local, mask=mask, score_mod=score_mod, target_power=target_power)
    return torch.stack(row_terms).mean() + blocks_kl
