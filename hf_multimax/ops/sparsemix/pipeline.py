"""The SparseMix pipeline, written once: block geometry -> scorer block scores -> top-k selection ->
exact attention over the kept blocks. The attention function, the benchmark and the retrieval
experiment all call these two functions. Pure tensor maths.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .distill import scorer_kl
from .fused import fused_block_statistics, fused_select_blocks, fused_sparsemix_attention
from .indexer import indexer_block_scores, indexer_keys, indexer_kl
from .selection import (
    BlockGeometry,
    block_geometry,
    block_key_features,
    block_statistics,
    rotary_norms_and_slow_pairs,
    rotary_pair_norms,
    scorer_block_scores,
    select_blocks,
)

__all__ = ["SELECTORS", "Selector", "select_sparsemix_blocks", "sparsemix_attention", "statistics_for"]


@dataclasses.dataclass(frozen=True)
class Selector:
    """What ranks the key blocks, as the three things SparseMix asks of it, each a function of the
    layer's selector weights (what `SparseMixScorer` returns):

    - `block_scores(query, key, weights, geometry, scale, mask, key_summary, statistics=...)`:
      `[B, Hkv, nQB, nKB]` block scores, top-k of which are kept (`statistics`: how the block scorers
      pool, `block_statistics` or its C++ twin; the token indexer pools nothing);
    - `kl(query, key, weights, geometry, q_blocks, **kl_options)`: its distillation term on the
      sampled query blocks (`kl_options`: `scale, sink, local, mask, score_mod, target_power`);
    - `summarize(key, weights, block_size, statistics=...)`: what it reads of the keys, which a KV cache keeps and
      extends while decoding (`key_summary` above): one entry per block of keys
      (`summary_per_block`) or per key.
    """

    block_scores: Callable[..., torch.Tensor]
    kl: Callable[..., torch.Tensor]
    summarize: Callable[..., torch.Tensor]
    summary_per_block: bool


def _block_scorer(features=None) -> Selector:
    """The block scorer, pooling each query and key token, or `features` of it, for its learned term."""

    def kl(query, key, weights, geometry, q_blocks, **kl_options):
        sampled = scorer_block_scores(query.detach(), key.detach(), *weights, geometry, kl_options["scale"],
                                      q_blocks=q_blocks, features=features)
        return scorer_kl(sampled, query, key, geometry, q_blocks, **kl_options)

    return Selector(
        block_scores=lambda q, k, w, g, scale, mask, summary, statistics=block_statistics: scorer_block_scores(
            q, k, *w, g, scale, key_features=summary, features=features, statistics=statistics),
        kl=kl,
        summarize=lambda key, w, block_size, statistics=block_statistics: block_key_features(
            key, w[1], block_size, features, statistics),
        summary_per_block=True,
    )


# The block scorer (pooled queries and keys); the same on position-free features (the norms of the
# pairs rotary embeddings rotate: its ranking does not change with a block's distance, so it carries
# over to contexts longer than it was trained on); the same on those norms and the pairs that turn
# little over the model's context, kept whole; and the token-level indexer (DSA's lightning indexer).
SELECTORS = {
    "block": _block_scorer(),
    "block_norms": _block_scorer(rotary_pair_norms),
    "block_rotary": _block_scorer(rotary_norms_and_slow_pairs),
    "token": Selector(
        block_scores=lambda q, k, w, g, scale, mask, summary, statistics=None: indexer_block_scores(
            q, k, w, g, mask=mask, keys=summary),
        kl=indexer_kl,
        summarize=lambda key, w, block_size, statistics=None: indexer_keys(key, w[1]),
        summary_per_block=False,
    ),
}


def statistics_for(kernel: Callable) -> Callable[..., tuple]:
    """How the block scorers pool blocks beside `kernel`: the fused kernel's extension pools too (one
    pass over the queries or keys instead of about ten tensor ops), as it selects (one call instead of
    ten small ops per decoding step); other kernels pool with the reference."""
    return fused_block_statistics if kernel is fused_sparsemix_attention else block_statistics


@torch.no_grad()
def select_sparsemix_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    *,
    block_size: int,
    top_k: int,
    sink: bool = True,
    local: bool = True,
    causal: bool = True,
    scale: float | None = None,
    selector: str = "block",
    mask: torch.Tensor | None = None,
    key_summary: torch.Tensor | None = None,
    select: Callable[..., tuple[torch.Tensor, torch.Tensor]] = select_blocks,
    window: int | None = None,
    statistics: Callable[..., tuple] = block_statistics,
) -> tuple[BlockGeometry, torch.Tensor, torch.Tensor]:
    """The key blocks each query block keeps (the selection is not differentiable: no graph).

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`.
        weights (`tuple`): what the layer's `SparseMixScorer` returns: `(w_query, w_key)` of the block
            scorers (`[Hkv, 2 * D, rank]` each, `[Hkv, D, rank]` for `"block_norms"`, `[Hkv, D + 4 * n, rank]`
            for `"block_rotary"` with n slow pairs) or
            `(w_query, w_key, w_weight)` of the token indexer.
        block_size, top_k, sink, local: as in `SparseMixSettings`.
        causal (`bool`): no future blocks. Default: `True`.
        scale (`float`, *optional*): the attention scale. Default: `D ** -0.5`.
        selector (`str`): one of `SELECTORS`, the kind of `weights`. Default: `"block"`.
        mask (`torch.Tensor`, *optional*): boolean keep mask; the token indexer ranks unmasked keys only.
        key_summary (`torch.Tensor`, *optional*): what the selector reads of the keys, when already
            known (a KV cache's, kept up to date while decoding): `block_key_features(key, w_key,
            block_size, features)` for the block scorers, `indexer_keys(key, w_key)` for `"token"`.
        select (`Callable`): the top-k of the block scores: `select_blocks`, or its one-call C++ twin
            `fused_select_blocks` (CPU). Default: `select_blocks`.
        window (`int`, *optional*): the model's causal sliding window (query q sees keys q - window + 1
            .. q): no block wholly before a query block's window is kept, the sink block included.
            Default: `None`.
        statistics (`Callable`): how the block scorers pool blocks: `block_statistics`, or its one-pass
            C++ twin `fused_block_statistics` (CPU). Default: `block_statistics`.

    Returns:
        `(geometry, block_idx [B, Hkv, n_q_blocks, S], block_valid [B, Hkv, n_q_blocks, S])`.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    geometry = block_geometry(query.shape[-2], key.shape[-2], block_size, causal, window)
    if selector not in SELECTORS:
        raise ValueError(f"selector={selector!r} is not supported; allowed values: {tuple(SELECTORS)}")
    scores = SELECTORS[selector].block_scores(query, key, weights, geometry, scale, mask, key_summary,
                                              statistics=statistics)
    block_idx, block_valid = select(scores, geometry, top_k=top_k, sink=sink, local=local)
    return geometry, block_idx, block_valid


def sparsemix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    *,
    kernel: Callable,
    block_size: int,
    top_k: int,
    sink: bool = True,
    local: bool = True,
    causal: bool = True,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    affine: torch.Tensor | None = None,
    selector: str = "block",
    key_summary: torch.Tensor | None = None,
    window: int | None = None,
    sink_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Scorer, selection and `kernel` (one of `BACKENDS`) in one call: `out [B, H, Q, Dv]`. `window` as in
    `select_sparsemix_blocks` (the mask hides the window's keys inside kept blocks); `sink_logits` `[H]`
    attention sinks, passed to the kernel.

    Examples:
        >>> from hf_multimax.ops.sparsemix import BACKENDS
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> w = torch.randn(2, 32, 4)
        >>> sparsemix_attention(q, k, v, (w, w), kernel=BACKENDS["blocked"], block_size=64, top_k=1).shape
        torch.Size([1, 2, 300, 16])
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    _, block_idx, block_valid = select_sparsemix_blocks(
        query, key, weights, block_size=block_size, top_k=top_k, sink=sink, local=local, causal=causal,
        scale=scale, selector=selector, mask=mask, key_summary=key_summary, window=window,
        select=fused_select_blocks if kernel is fused_sparsemix_attention else select_blocks,
        statistics=statistics_for(kernel),
    )
    out, _ = kernel(query, key, value, block_idx, block_valid, block_size=block_size, scale=scale, mask=mask,
                    is_causal=causal, theta=theta, affine=affine, sink_logits=sink_logits)
    return out
