"""SparseMix block geometry, the block scorer and top-k block selection. Pure tensor maths.

Blocks are aligned to absolute positions: key block j holds keys [j*B, (j+1)*B); queries are placed
at absolute positions `q_offset + i` (`q_offset = K - Q` for causal attention, so a KV-cache step
sits at the end, else 0), so query block a holds the queries whose positions fall in [a*B, (a+1)*B).
A query block keeps the sink block (0), its local block (a) and the `top_k` best-scored other blocks
it may see (causal: no future blocks; with a sliding window of W: no block that ends before the
window of the block's first query, keys `q - W + 1 .. q`, as transformers' `sliding_window_overlay`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import torch

__all__ = [
    "BlockGeometry",
    "block_geometry",
    "block_key_features",
    "block_statistics",
    "rotary_norms_and_slow_pairs",
    "rotary_pair_norms",
    "pool_blocks",
    "scorer_block_scores",
    "select_blocks",
    "selection_mask",
    "slot_layout",
    "candidate_blocks",
]


@dataclasses.dataclass(frozen=True)
class BlockGeometry:
    """Where the queries and keys of one call sit in blocks of `block_size`."""

    q_len: int
    k_len: int
    block_size: int
    q_offset: int  # absolute position of query 0
    causal: bool
    window: int | None = None  # causal sliding window: query q sees keys q - window + 1 .. q

    @property
    def q_block0(self) -> int:  # absolute index of the first query block
        return self.q_offset // self.block_size

    @property
    def front_pad(self) -> int:  # rows before query 0 in its block
        return self.q_offset % self.block_size

    @property
    def n_q_blocks(self) -> int:
        return -(-(self.front_pad + self.q_len) // self.block_size)

    @property
    def n_k_blocks(self) -> int:
        return -(-self.k_len // self.block_size)


def block_geometry(q_len: int, k_len: int, block_size: int, causal: bool, window: int | None = None) -> BlockGeometry:
    """The call's geometry; `window` (causal only) is a sliding window of that many keys per query."""
    if causal and q_len > k_len:
        raise ValueError(f"causal attention needs at least as many keys as queries, got Q={q_len}, K={k_len}")
    if window is not None and (not causal or not isinstance(window, int) or window < 1):
        raise ValueError(f"window={window!r} must be a positive int of a causal call (causal={causal})")
    return BlockGeometry(q_len, k_len, block_size, k_len - q_len if causal else 0, causal, window)


def pool_blocks(x: torch.Tensor, block_size: int, front_pad: int = 0, with_max: bool = True) -> torch.Tensor:
    """Mean and max of each block of tokens: `[B, H, L, D]` -> `[B, H, n_blocks, 2D]` (fp32), or the
    mean only (`[..., D]`) without `with_max`.

    The first block starts `front_pad` positions before token 0; padding rows (front and tail) are
    left out of both statistics.
    """
    if front_pad == 0 and x.shape[2] <= block_size:  # one block (a decoding step's last block): no padding
        x = x.float()
        mean = x.mean(dim=2, keepdim=True)
        return torch.cat([mean, x.amax(dim=2, keepdim=True)], dim=-1) if with_max else mean
    padded, real = _blocked_rows(x.float(), block_size, front_pad)
    count = real.sum(dim=1, keepdim=True).clamp_min(1)  # [n_blocks, 1]
    # Block sums as one batched product with a row of ones, which BLAS runs ~4x faster than a sum
    # over the middle dimension (padding rows are zeros).
    mean = torch.matmul(padded.new_ones(1, block_size), padded).squeeze(-2) / count
    if not with_max:
        return mean
    real = real[..., None]
    peak = (padded if bool(real.all()) else padded.masked_fill(~real, float("-inf"))).amax(dim=3)
    return torch.cat([mean, peak], dim=-1)


def _blocked_rows(x: torch.Tensor, block_size: int, front_pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`[B, H, L, D]` -> (`[B, H, n_blocks, block_size, D]` zero-padded, `[n_blocks, block_size]` real rows)."""
    B, H, L, D = x.shape
    n_blocks = -(-(front_pad + L) // block_size)
    tail = n_blocks * block_size - front_pad - L
    if front_pad or tail:  # aligned inputs (long prefill) are a view, not a copy
        x = torch.nn.functional.pad(x, (0, 0, front_pad, tail))
    padded = x.view(B, H, n_blocks, block_size, D)
    real = torch.nn.functional.pad(torch.ones(L, dtype=torch.bool, device=x.device), (front_pad, tail))
    return padded, real.view(n_blocks, block_size)


def block_statistics(x: torch.Tensor, block_size: int, front_pad: int = 0,
                     pair_norms: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """What the block scorer pools of `x` `[B, H, L, D]`: `(pool_blocks(x) [B, H, n, 2D], pool_blocks of
    its rotary pair norms [B, H, n, D] or None)`, blocks as in `pool_blocks`. The reference of
    `fused.fused_block_statistics`, which reads `x` once."""
    norms = pool_blocks(rotary_pair_norms(x), block_size, front_pad) if pair_norms else None
    return pool_blocks(x, block_size, front_pad), norms


def scorer_block_scores(
    query: torch.Tensor,
    key: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    geometry: BlockGeometry,
    scale: float,
    q_blocks: torch.Tensor | None = None,
    key_features: torch.Tensor | None = None,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    statistics: Callable[..., tuple] = block_statistics,
) -> torch.Tensor:
    """Block scores of the SparseMix scorer, one selection per key/value head.

        score[a, j] = scale * mean_q(a) . mean_k(j) + (pool_q(a) Wq) . (pool_k(j) Wk)

    The first term is the parameter-free mean-pooled gate (MoBA); the second is a learned rank-r
    correction on mean+max pooled queries and keys (SeerAttention-style pooling), zero while `w_key`
    is zero. Query heads of a group are averaged. (Per-token query scores smooth-maxed over the
    block, and smooth-maxed projected keys, were tried on the retrieval task: no better recall, and
    the per-token part cost a quarter of the sparse attention's time at 16k.)

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`.
        w_query, w_key (`torch.Tensor`): `[Hkv, 2F, r]`, F = D, or the size of `features`' output.
        geometry (`BlockGeometry`): from `block_geometry`.
        scale (`float`): the attention scale.
        q_blocks (`torch.Tensor`, *optional*): relative indices of the query blocks to score.
            Default: all.
        key_features (`torch.Tensor`, *optional*): `block_key_features(key, w_key, block_size, features)`,
            when already known.
        features (*optional*): what the learned term pools of each query and key token instead of
            the token itself, `features(x, F)` -> `[..., F]`: `rotary_pair_norms` (the `"block_norms"`
            selector) or `rotary_norms_and_slow_pairs` (`"block_rotary"`).
        statistics (*optional*): `block_statistics`, or its one-pass C++ twin
            `fused_block_statistics` (CPU). Default: `block_statistics`.

    Returns:
        `[B, Hkv, n, n_k_blocks]` fp32 scores, `n` = `n_q_blocks` or `len(q_blocks)`.
    """
    Hkv = key.shape[1]
    mean_q, learned = _scorer_inputs(query, w_query.shape[-2] // 2, features,
                                     lambda x, norms: _pooled_queries(x, Hkv, geometry, norms, statistics))
    if q_blocks is not None:
        mean_q, learned = mean_q.index_select(2, q_blocks), learned.index_select(2, q_blocks)
    if key_features is None:
        key_features = block_key_features(key, w_key, geometry.block_size, features, statistics)
    # Both terms in one product: [scale * mean_q, pool_q Wq] . [mean_k, pool_k Wk].
    query_features = torch.cat([mean_q * scale, torch.matmul(learned, w_query.float())], -1)
    return torch.matmul(query_features, key_features.transpose(-1, -2))


def _scorer_inputs(x: torch.Tensor, width: int, features, stats) -> tuple[torch.Tensor, torch.Tensor]:
    """What the scorer reads of `x` `[B, H, L, D]` per block: `(mean [.., D], learned [.., 2F])`, the
    raw means for the gate and the pooled (mean+max) input of the learned term; `stats(x, pair_norms)`
    pools tokens to blocks as `block_statistics` does."""
    D = x.shape[-1]
    if features is None:
        pooled, _ = stats(x, False)
        return pooled[..., :D], pooled
    if features is rotary_pair_norms:
        pooled, norms = stats(x, True)
        return pooled[..., :D], norms
    if features is rotary_norms_and_slow_pairs:
        # The slow pairs are raw features: their block means and maxima are slices of the raw ones,
        # so only the norms are built per token (building every token's features first took half
        # the scorer's time at 16k).
        raw, norms = stats(x, True)
        half, n = D // 2, (width - D // 2) // 2
        mean, peak = raw[..., :D], raw[..., D:]
        slow = [m[..., i - n : i] for m in (mean, peak) for i in (half, D)]
        return mean, torch.cat([norms[..., :half], *slow[:2], norms[..., half:], *slow[2:]], dim=-1)
    # Other features: the raw tokens feed only the gate.
    pooled, _ = stats(x, False)
    learned, _ = stats(features(x, width), False)
    return pooled[..., :D], learned


def _pooled_queries(x: torch.Tensor, n_kv_heads: int, geometry: BlockGeometry, pair_norms: bool,
                    statistics: Callable[..., tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`statistics` of each query block, averaged over the query heads of a group."""
    B, H, Q, F = x.shape
    if Q == 1:  # decoding: one query is its own mean and max
        x = x.float()
        raw, norms = torch.cat([x, x], dim=-1), None
        if pair_norms:
            n = rotary_pair_norms(x)
            norms = torch.cat([n, n], dim=-1)
    else:
        raw, norms = statistics(x, geometry.block_size, geometry.front_pad, pair_norms)
    if H == n_kv_heads:
        return raw, norms
    group = lambda t: None if t is None else t.view(B, n_kv_heads, H // n_kv_heads, *t.shape[2:]).mean(dim=2)
    return group(raw), group(norms)


def rotary_pair_norms(x: torch.Tensor, width: int | None = None) -> torch.Tensor:
    """`[..., D]` -> `[..., D / 2]`: the norm of each pair of features that rotary position embeddings
    rotate together (dims i and i + D/2, transformers' `rotate_half` layout), which the rotation leaves
    unchanged: features of a token's content that do not depend on its position. (`width`, the
    size the scorer's projection reads, is D / 2 here.)"""
    x = x.float()
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    # One new tensor, updated in place (a 16k forward, 1 thread: 216 ms, against 225 ms with `hypot`,
    # whose overflow guard fp32 attention inputs do not need; allocating a second tensor for the sum
    # doubled the selection's time; a norm over a strided pair axis is ~50x slower).
    return (a * a).addcmul_(b, b).sqrt_()


def rotary_norms_and_slow_pairs(x: torch.Tensor, width: int) -> torch.Tensor:
    """`[..., D]` -> `[..., width]`: `rotary_pair_norms`, then both features of the n = (width - D/2) / 2
    slowest rotary pairs as they are. The slow pairs are the last of each half (`rotate_half` lays
    the frequencies out from fast to slow); turning little over the whole context, they keep the
    direction within a pair that the norms drop and that distinguishes one content from another,
    without moving with position as the faster pairs do."""
    x = x.float()
    half = x.shape[-1] // 2
    n = (width - half) // 2
    norms = rotary_pair_norms(x)
    if n == 0:
        return norms
    return torch.cat([norms, x[..., half - n:half], x[..., 2 * half - n:]], dim=-1)


def block_key_features(key: torch.Tensor, w_key: torch.Tensor, block_size: int,
                       features: Callable[[torch.Tensor], torch.Tensor] | None = None,
                       statistics: Callable[..., tuple] = block_statistics) -> torch.Tensor:
    """What the block scorer reads of each key block: `[B, Hkv, n_blocks, D + r]`, the block's mean
    key beside its pooled (mean+max) key, or pooled `features(key)`, projected by `w_key`. Per block, so
    a KV cache's features grow by appending blocks (see `integrations.sparsemix_decoding`).
    `statistics` as in `scorer_block_scores`."""
    mean, learned = _scorer_inputs(key, w_key.shape[-2] // 2, features,
                                   lambda x, pair_norms: statistics(x, block_size, 0, pair_norms))
    return torch.cat([mean, torch.matmul(learned, w_key.float())], -1)


def candidate_blocks(geometry: BlockGeometry, *, sink: bool, local: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`(allowed, forced)`, both `[n_q_blocks, n_k_blocks]` bool: the blocks each query block may
    see, and those it keeps whatever the scores (sink, local; the sink only while the window reaches it)."""
    return _candidates(geometry.n_q_blocks, geometry.n_k_blocks, geometry.q_block0, geometry.causal,
                       _window_in_blocks(geometry), sink=sink, local=local, device=device)


def _window_in_blocks(g: BlockGeometry) -> tuple[int, int] | None:
    """The sliding window counted in key blocks: `(first, reach)`. Query q sees keys from q - window + 1,
    which block (q - window + 1) // bs holds: `first` is that block for the call's first query, and a
    later query block a, whose first query is a * bs, reaches back to block a - reach. Both change once
    per block while decoding (they key `_slot_layout`'s cache)."""
    if g.window is None:
        return None
    bs = g.block_size
    return (g.q_offset - g.window + 1) // bs, -((1 - g.window) // bs)


def _candidates(nQB: int, nKB: int, q_block0: int, causal: bool, window: tuple[int, int] | None, *, sink: bool,
                local: bool, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.arange(nQB, device=device)[:, None] + q_block0
    j = torch.arange(nKB, device=device)[None, :]
    allowed = (j <= a) if causal else torch.ones_like(j <= a)
    if window is not None:
        first, reach = window
        lowest = (a - reach).clamp_min(0)
        lowest[0] = max(first, 0)  # the first query block's first query may sit past its start
        allowed &= j >= lowest
    forced = torch.zeros_like(allowed)
    if sink:
        forced |= (j == 0) & allowed
    if local:
        forced |= (j == a) & allowed
    return allowed, forced


def select_blocks(
    scores: torch.Tensor,
    geometry: BlockGeometry,
    *,
    top_k: int,
    sink: bool = True,
    local: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The key blocks each query block attends.

    Args:
        scores (`torch.Tensor`): `[B, Hkv, n_q_blocks, n_k_blocks]` from `scorer_block_scores`.
        geometry (`BlockGeometry`): the call's geometry.
        top_k (`int`): blocks chosen by score besides the forced ones.
        sink, local (`bool`): always keep block 0 / the query block's own block.

    Returns:
        `(block_idx, block_valid)`, both `[B, Hkv, n_q_blocks, S]` with `S = 2 + min(top_k, n_k_blocks)`:
        slot 0 the sink, slot 1 the local block, then the top-k; `block_valid` is False for slots
        that hold no block (sink == local: the local slot holds it; fewer candidates than top_k; an
        option turned off).
    """
    hidden, fixed_idx, fixed_ok = slot_layout(scores, geometry, sink=sink, local=local)  # checks the shape first
    B, Hkv, nQB, nKB = scores.shape
    k = min(top_k, nKB)
    top_val, top_idx = scores.masked_fill(hidden, float("-inf")).topk(k, dim=-1)
    top_ok = top_val > float("-inf")  # what top-k took from the hidden blocks (or NaN scores) is not kept
    # Empty slots point at block 0 (a valid address); they are masked out everywhere.
    top_idx.masked_fill_(~top_ok, 0)
    block_idx = torch.cat([fixed_idx.expand(B, Hkv, nQB, 2), top_idx], dim=-1)
    block_valid = torch.cat([fixed_ok.expand(B, Hkv, nQB, 2), top_ok], dim=-1)
    return block_idx, block_valid


def slot_layout(scores: torch.Tensor, geometry: BlockGeometry, *, sink: bool, local: bool):
    """What a selection of `scores` (`[B, Hkv, n_q_blocks, n_k_blocks]`) takes of the geometry:
    `(hidden [nQB, nKB], fixed_idx [nQB, 2], fixed_ok [nQB, 2])`, the blocks top-k may not pick and
    the fixed slots (sink, local) with their validity (read-only tensors, cached)."""
    if scores.dim() != 4 or tuple(scores.shape[-2:]) != (geometry.n_q_blocks, geometry.n_k_blocks):
        raise ValueError(f"scores must be [B, Hkv, {geometry.n_q_blocks}, {geometry.n_k_blocks}] for this geometry, "
                         f"got {tuple(scores.shape)}")
    nQB, nKB = scores.shape[-2:]
    return _slot_layout(nQB, nKB, geometry.q_block0, geometry.causal, _window_in_blocks(geometry), sink, local,
                        scores.device)


@functools.lru_cache(maxsize=32)
def _slot_layout(nQB: int, nKB: int, q_block0: int, causal: bool, window: tuple[int, int] | None, sink: bool,
                 local: bool, device: torch.device):
    """What `select_blocks` needs of the geometry alone: the blocks top-k may not pick `[nQB, nKB]`, and
    the fixed slots (sink, local) `[nQB, 2]` with their validity. Cached (read-only tensors): while
    decoding the geometry changes once per block, and these are a dozen small ops per call."""
    allowed, forced = _candidates(nQB, nKB, q_block0, causal, window, sink=sink, local=local, device=device)
    a = torch.arange(nQB, device=device) + q_block0
    sink_idx = torch.zeros(nQB, dtype=torch.long, device=device)
    local_idx = a.clamp(max=nKB - 1)
    no = torch.zeros(nQB, dtype=torch.bool, device=device)
    local_ok = forced.gather(1, local_idx[:, None])[:, 0] & (local_idx == a) if local else no
    # When the local block is block 0 it sits in the local slot and the sink slot stays empty, so the
    # local slot always holds the query block's own block (the kernels mask its causal triangle there).
    sink_ok = forced[:, 0] & ~(local_ok & (local_idx == 0)) if sink else no
    fixed_ok = torch.stack([sink_ok, local_ok], dim=-1)
    fixed_idx = torch.stack([sink_idx, local_idx], dim=-1).masked_fill(~fixed_ok, 0)
    return ~(allowed & ~forced), fixed_idx, fixed_ok


def selection_mask(block_idx: torch.Tensor, block_valid: torch.Tensor, geometry: BlockGeometry, n_heads: int) -> torch.Tensor:
    """The selection as a dense boolean mask `[B, H, Q, K]` over real queries and keys (True = the
    key's block is kept for the query's block). Causality is not included. For references and tests."""
    B, Hkv, nQB, _ = block_idx.shape
    bs = geometry.block_size
    kept = torch.zeros(B, Hkv, nQB, geometry.n_k_blocks + 1, dtype=torch.bool, device=block_idx.device)
    # Invalid slots write into a spare column that is dropped.
    target = block_idx.masked_fill(~block_valid, geometry.n_k_blocks)
    kept.scatter_(-1, target, True)
    kept = kept[..., :-1]
    tokens = kept.repeat_interleave(bs, dim=2).repeat_interleave(bs, dim=3)
    tokens = tokens[:, :, geometry.front_pad : geometry.front_pad + geometry.q_len, : geometry.k_len]
    return tokens.repeat_interleave(n_heads // Hkv, dim=1)
