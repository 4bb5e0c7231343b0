"""SparseMix through `flex_attention`: the selection becomes a `BlockMask` (only the kept key blocks
are visited), MultiMax a `score_mod`. Forward and backward on GPU; forward only on CPU."""

from __future__ import annotations

import torch

from ..multimax.flex import _compiled_flex, _score_mod, flex_inputs
from .layout import SparseLayout

__all__ = ["NO_SINKS", "flex_sparsemix_attention"]

NO_SINKS = "has no attention sinks (s_aux) yet: 'blocked', 'fused' (CPU) and 'eager' have"


def _kv_blocks(idx: torch.Tensor, valid: torch.Tensor, n_k_blocks: int):
    """`(count [B, H, nQB], indices [B, H, nQB, n_k_blocks])` as BlockMask wants them: each row's
    blocks first, then padding."""
    order = torch.argsort((~valid).to(torch.int8), dim=-1, stable=True)
    indices = idx.gather(-1, order).to(torch.int32)
    indices = torch.nn.functional.pad(indices, (0, max(0, n_k_blocks - indices.shape[-1])))
    return valid.sum(-1).to(torch.int32), indices


def _block_mask(layout: SparseLayout, q_len: int, k_len: int):
    from torch.nn.attention.flex_attention import BlockMask

    g, bs = layout.geometry, layout.geometry.block_size
    idx = layout.block_idx.repeat_interleave(layout.groups, dim=1)  # per query head
    valid = layout.block_valid.repeat_interleave(layout.groups, dim=1)
    # The selection is in the mask_mod too, not only in the block lists: torch falls back to eager
    # flex (which evaluates mask_mod everywhere and ignores the lists) when its compile cache is full.
    kept = torch.zeros(*idx.shape[:3], g.n_k_blocks + 1, dtype=torch.bool, device=idx.device)
    kept.scatter_(-1, idx.masked_fill(~valid, g.n_k_blocks), True)
    q_shift = g.q_block0 * bs  # padded query row r sits at absolute position q_shift + r
    hf_mask = layout.mask
    one_batch = hf_mask is not None and hf_mask.shape[0] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        keep = (kv_idx < g.k_len) & kept[b, h, q_idx // bs, kv_idx // bs]
        if g.causal:
            keep = keep & (kv_idx <= q_idx + q_shift)
        if hf_mask is not None:
            # [B, Hkv, G, nQB, bs, nKB, bs] blocked view of the padded mask
            row = hf_mask[0 if one_batch else b, h // layout.groups, h % layout.groups, q_idx // bs, q_idx % bs,
                          kv_idx // bs, kv_idx % bs]
            keep = keep & row
        return keep

    # Blocks that need no mask_mod ("full"): without a mask, every kept block before the query
    # block's own (causal) or every kept block (bidirectional), except the padded last block.
    full = valid.clone() if hf_mask is None else torch.zeros_like(valid)
    if g.causal:
        own = torch.arange(g.n_q_blocks, device=idx.device)[:, None] + g.q_block0
        full &= idx < own
    if layout.k_pad:
        full &= idx != g.n_k_blocks - 1
    partial = valid & ~full
    kv_num, kv_idx = _kv_blocks(idx, partial, g.n_k_blocks)
    full_num, full_idx = _kv_blocks(idx, full, g.n_k_blocks)
    return BlockMask.from_kv_blocks(kv_num, kv_idx, full_num, full_idx, BLOCK_SIZE=bs, mask_mod=mask_mod,
                                    seq_lengths=(q_len, k_len))


def flex_sparsemix_attention(
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
    """Same contract as `naive_sparsemix_attention`, through compiled FlexAttention.

    Raises:
        ValueError: gradients needed on CPU (torch has no CPU FlexAttention backward); attention sinks.
    """
    if sink_logits is not None:
        # TODO(issue 29): fold them from flex's log-sum-exp (return_lse) once its gradient is checked on GPU.
        raise ValueError(f"the flex SparseMix backend {NO_SINKS}")
    layout = SparseLayout(query, key, value, block_idx, block_valid, block_size=block_size, is_causal=is_causal,
                          mask=mask, theta=theta, affine=affine)
    query, key, value, theta, affine = flex_inputs(query, key, value, theta, affine, cpu_training_backend="blocked")
    g = layout.geometry
    q = torch.nn.functional.pad(query, (0, 0, g.front_pad, layout.q_tail))
    k = torch.nn.functional.pad(key, (0, 0, 0, layout.k_pad))
    v = torch.nn.functional.pad(value, (0, 0, 0, layout.k_pad))
    score_mod = None
    if theta is not None:
        th = theta.reshape(8, -1) if theta.dim() > 1 else theta
        af = None if affine is None else (affine.reshape(2, -1) if affine.dim() > 1 else affine)
        score_mod = _score_mod(th.float(), None if af is None else af.float(), None, None)
    block_mask = _block_mask(layout, q.shape[-2], k.shape[-2])
    out = _compiled_flex()(
        q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=layout.groups > 1,
    )
    # Rows with no key: flex returns zeros there already (its lse is -inf); drop the padding rows.
    out = out[:, :, g.front_pad : g.front_pad + g.q_len]
    return out, None
