"""The SparseMix pipeline, written once: block geometry -> scorer block scores -> top-k selection ->
exact attention over the kept blocks. The attention function, the benchmark and the retrieval
experiment all call these two functions. Pure tensor maths.
"""

from __future__ import annotations

from typing import Callable

import torch

from .selection import BlockGeometry, block_geometry, scorer_block_scores, select_blocks

__all__ = ["select_sparsemix_blocks", "sparsemix_attention"]


@torch.no_grad()
def select_sparsemix_blocks(
    query: torch.Tensor,
    key: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
    *,
    block_size: int,
    top_k: int,
    sink: bool = True,
    local: bool = True,
    causal: bool = True,
    scale: float | None = None,
) -> tuple[BlockGeometry, torch.Tensor, torch.Tensor]:
    """The key blocks each query block keeps (the selection is not differentiable: no graph).

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`.
        w_query, w_key (`torch.Tensor`): the scorer projections `[Hkv, 2 * D, rank]`.
        block_size, top_k, sink, local: as in `SparseMixSettings`.
        causal (`bool`): no future blocks. Default: `True`.
        scale (`float`, *optional*): the attention scale. Default: `D ** -0.5`.

    Returns:
        `(geometry, block_idx [B, Hkv, n_q_blocks, S], block_valid [B, Hkv, n_q_blocks, S])`.
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    geometry = block_geometry(query.shape[-2], key.shape[-2], block_size, causal)
    scores = scorer_block_scores(query, key, w_query, w_key, geometry, scale)
    block_idx, block_valid = select_blocks(scores, geometry, top_k=top_k, sink=sink, local=local)
    return geometry, block_idx, block_valid


def sparsemix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    w_query: torch.Tensor,
    w_key: torch.Tensor,
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
) -> torch.Tensor:
    """Scorer, selection and `kernel` (one of `BACKENDS`) in one call: `out [B, H, Q, Dv]`.

    Examples:
        >>> from hf_multimax.ops.sparsemix import BACKENDS
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> w = torch.randn(2, 32, 4)
        >>> sparsemix_attention(q, k, v, w, w, kernel=BACKENDS["blocked"], block_size=64, top_k=1).shape
        torch.Size([1, 2, 300, 16])
    """
    if scale is None:
        scale = query.shape[-1] ** -0.5
    _, block_idx, block_valid = select_sparsemix_blocks(
        query, key, w_query, w_key, block_size=block_size, top_k=top_k, sink=sink, local=local, causal=causal,
        scale=scale,
    )
    out, _ = kernel(query, key, value, block_idx, block_valid, block_size=block_size, scale=scale, mask=mask,
                    is_causal=causal, theta=theta, affine=affine)
    return out
