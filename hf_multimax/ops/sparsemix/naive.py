"""SparseMix eager backend: exact attention over the selected key blocks, gathered with
`index_select`, through autograd. Readable; materialises each tile's scores and keeps them for the
backward. The fast kernels match it; tests also check it against dense attention with the selection
as a mask (`selection.selection_mask`)."""

from __future__ import annotations

import torch

from ..multimax.naive import naive_multimax_modulate
from ..sink import check_sink
from .layout import SparseLayout

__all__ = ["naive_sparsemix_attention", "tile_scores"]


def tile_scores(layout: SparseLayout, q_tile: torch.Tensor, k_tile: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(s, y)` for queries already multiplied by the scale: scores and the normalizer's input (MultiMax-modulated when the layout has
    theta), both `[B, Hkv, c, G, bs, S*bs]` in fp32 (or wider)."""
    s = torch.matmul(q_tile.to(layout.acc), k_tile.to(layout.acc).transpose(-1, -2))
    B, Hkv, c = s.shape[:3]
    s = s.view(B, Hkv, c, layout.groups, layout.geometry.block_size, s.shape[-1])
    y = s if layout.theta is None else naive_multimax_modulate(s, layout.theta, layout.affine)
    return s, y


def naive_sparsemix_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    block_idx: torch.Tensor,
    block_valid: torch.Tensor,
    *,
    block_size: int,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    theta: torch.Tensor | None = None,
    affine: torch.Tensor | None = None,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """Attention of each query block over its selected key blocks only.

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`, `H % Hkv == 0`.
        value (`torch.Tensor`): `[B, Hkv, K, Dv]`.
        block_idx, block_valid (`torch.Tensor`): `[B, Hkv, n_q_blocks, S]` from `select_blocks`.
        block_size (`int`): tokens per block (the one the selection was made with).
        scale (`float`, *optional*): score scale. Default: `D ** -0.5`.
        mask (`torch.Tensor`, *optional*): boolean, broadcastable to `[B, H, Q, K]`, True = attend.
        is_causal (`bool`): queries are the last Q positions and see no later key. Default: `False`.
        theta (`torch.Tensor`, *optional*): `[8]` or `[8, H]` MultiMax scalars: the normalizer is
            MultiMax instead of softmax. Default: `None` (softmax).
        affine (`torch.Tensor`, *optional*): `[2]` or `[2, H]` MultiMax affine. Default: `None`.
        sink_logits (`torch.Tensor`, *optional*): `[H]` attention sinks (gpt-oss's `s_aux`): each head's
            logit joins the normaliser's denominator beside the selected keys, as a key without a
            value, unmodulated (a learned logit, not a score). Default: `None`.

    Returns:
        `(out [B, H, Q, Dv] in value's dtype, None)`. Rows with no key to attend give zeros.

    Examples:
        >>> from hf_multimax.ops.sparsemix import block_geometry, select_blocks
        >>> q = k = v = torch.randn(1, 2, 200, 16)
        >>> g = block_geometry(200, 200, 64, causal=True)
        >>> idx, ok = select_blocks(torch.randn(1, 2, g.n_q_blocks, g.n_k_blocks), g, top_k=1)
        >>> naive_sparsemix_attention(q, k, v, idx, ok, block_size=64, is_causal=True)[0].shape
        torch.Size([1, 2, 200, 16])
    """
    layout = SparseLayout(query, key, value, block_idx, block_valid, block_size=block_size, is_causal=is_causal,
                          mask=mask, theta=theta, affine=affine)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    sink = None
    if sink_logits is not None:
        check_sink(sink_logits, layout.n_heads)
        # Per query head h = kv head * G + g, broadcast to the tile's [B, Hkv, c, G, bs, 1].
        sink = sink_logits.to(layout.acc).view(1, layout.n_kv_heads, 1, layout.groups, 1, 1)
    q_blocks = layout.blocked_queries(query).to(layout.acc) * scale
    k_flat, v_flat = layout.flat_blocks(key), layout.flat_blocks(value)
    outs = []
    for c0, c1 in layout.chunks():
        _, y = tile_scores(layout, q_blocks[:, :, c0:c1], layout.gather(k_flat, c0, c1))
        keep = layout.keep(c0, c1)
        if sink is None:
            has_key = keep.any(dim=-1, keepdim=True)
            y = y.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0)
            p = torch.softmax(y, dim=-1) * keep
        else:  # the sink is one more column of the softmax, dropped after it (a row with no key: all on it)
            y = y.masked_fill(~keep, float("-inf"))
            column = sink.expand(*y.shape[:-1], 1)
            p = torch.softmax(torch.cat([y, column], dim=-1), dim=-1)[..., :-1]
        p = p.flatten(3, 4)  # [B, Hkv, c, G*bs, S*bs]
        outs.append(torch.matmul(p, layout.gather(v_flat, c0, c1).to(layout.acc)))
    out = layout.unblock_queries(torch.cat(outs, dim=2))
    return out.to(value.dtype), None
