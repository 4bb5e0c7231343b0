"""SparseMix fast backend: tiles of query blocks over their gathered key/value blocks in a custom
autograd Function that keeps only the output and the row log-sum-exp and recomputes each tile in
backward (the FlashAttention recipe over gathered blocks). Extra memory is one tile, not the
gathered keys and values of the whole sequence; key/value gradients are scattered back with
`index_add_`. With softmax on CPU each tile runs torch's fused flash-attention kernels (forward and
backward); MultiMax, and other devices, run the same tiles as explicit tensor code.

Attention sinks are folded in from the rows' log-sum-exp (`ops.sink`): out * sigmoid(lse - sink). The
backward needs no gradient of lse: with the sinked output O' and its gradient G, the tiles' backward
run on (O', G * sigmoid) computes what the chain through lse adds, since rowsum(G sigma * O') =
rowsum(G sigma * O) - rowsum(G * O) sigma (1 - sigma), the second term being lse's gradient (see
`_sink_rows`). So torch's flash backward, which reads O only for rowsum(dO * O), serves unchanged.
"""

from __future__ import annotations

import torch

from ..multimax.naive import naive_multimax_modulate_backward
from ..sink import check_sink
from .layout import SparseLayout
from .naive import tile_scores

__all__ = ["blocked_sparsemix_attention"]


def _softmax_parts(y: torch.Tensor):
    """Unnormalised probabilities, row sums and log-sum-exp of masked (-inf) scores."""
    m = y.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key
    p = torch.exp(y - m)
    denom = p.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    # +inf log-sum-exp makes the backward's recomputed probabilities exactly zero on empty rows.
    lse = torch.where(has_key, m + torch.log(denom), torch.full_like(denom, float("inf")))
    return p, torch.where(has_key, denom, torch.ones_like(denom)), lse


def _sink_rows(layout: SparseLayout, sink: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`[H]` sink logits -> one per row of the blocked queries `[1, Hkv, 1, G * bs]` (rows are (query
    head in the group, token))."""
    bs = layout.geometry.block_size
    return sink.to(dtype).view(layout.n_kv_heads, layout.groups, 1).expand(-1, -1, bs).reshape(1, layout.n_kv_heads, 1, -1)


def _fold_sink(out: torch.Tensor, lse: torch.Tensor, sink: torch.Tensor | None, layout: SparseLayout):
    """`(out * sigma, sigma)` for blocked outputs `[B, Hkv, nQB, G*bs, Dv]` and their rows' lse
    `[B, Hkv, nQB, G*bs]` (fp32): sigma = sigmoid(lse - sink) is the mass the rows keep beside the sink
    (lse = +inf or -inf where a row sees no key, whose output is zero either way)."""
    if sink is None:
        return out, None
    sigma = torch.sigmoid(lse - _sink_rows(layout, sink, lse.dtype))
    return (out.to(sigma.dtype) * sigma[..., None]).to(out.dtype), sigma


def _sink_backward(grad_out: torch.Tensor, out: torch.Tensor, sigma: torch.Tensor | None, sink: torch.Tensor | None,
                   layout: SparseLayout):
    """`(gradient for the unsinked tiles, the sink's gradient [H] or None)` from the gradient of the
    sinked output `out`: d out'/d sink = -out' (1 - sigma), summed over every row of a head."""
    if sigma is None:
        return grad_out, None
    acc = sigma.dtype
    per_row = -(grad_out.to(acc) * out.to(acc)).sum(-1) * (1 - sigma)  # [B, Hkv, nQB, G*bs]
    bs = layout.geometry.block_size
    dsink = per_row.view(*per_row.shape[:3], layout.groups, bs).sum(dim=(0, 2, 4)).reshape(-1)
    return (grad_out.to(acc) * sigma[..., None]).to(grad_out.dtype), dsink.to(sink.dtype)


class _BlockedSparseMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_blocks, k_flat, v_flat, theta, affine, sink, layout: SparseLayout, scale: float):
        q_blocks, k_flat, v_flat = q_blocks.detach(), k_flat.detach(), v_flat.detach()
        B, Hkv, nQB, rows, _ = q_blocks.shape
        out = torch.empty(B, Hkv, nQB, rows, v_flat.shape[-1], dtype=layout.acc, device=q_blocks.device)
        lse = torch.empty(B, Hkv, nQB, layout.groups, layout.geometry.block_size, 1, dtype=layout.acc,
                          device=q_blocks.device)
        for c0, c1 in layout.chunks():
            # The scale goes on the query tile (1/S of the score tile's size), not on a full-size copy.
            _, y = tile_scores(layout, q_blocks[:, :, c0:c1].to(layout.acc) * scale, layout.gather(k_flat, c0, c1))
            p, denom, lse[:, :, c0:c1] = _softmax_parts(layout.mask_tile_(y, c0, c1))
            # Normalised after the product: Dv columns to divide instead of S * bs.
            pv = torch.matmul(p.flatten(3, 4), layout.gather(v_flat, c0, c1).to(layout.acc))
            out[:, :, c0:c1] = pv.div_(denom.flatten(3, 4))
        out, sigma = _fold_sink(out, lse.flatten(3, 5), sink, layout)
        ctx.save_for_backward(q_blocks, k_flat, v_flat, out, lse, sigma, sink)
        ctx.layout, ctx.scale = layout, scale
        ctx.param_shapes = tuple(None if t is None else (t.shape, t.dtype) for t in (theta, affine))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_blocks, k_flat, v_flat, out, lse, sigma, sink = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        bs = layout.geometry.block_size
        acc = layout.acc
        grad_out, dsink = _sink_backward(grad_out, out, sigma, sink, layout)
        grad_out = grad_out.to(acc)
        dq = torch.empty(q_blocks.shape, dtype=acc, device=q_blocks.device)
        dk = torch.zeros(k_flat.shape, dtype=acc, device=k_flat.device)
        dv = torch.zeros(v_flat.shape, dtype=acc, device=v_flat.device)
        theta, affine = layout.theta, layout.affine
        dtheta = None if theta is None else torch.zeros_like(theta)
        daffine = None if affine is None else torch.zeros_like(affine)
        for c0, c1 in layout.chunks():
            q_tile = q_blocks[:, :, c0:c1].to(acc) * scale
            k_tile, v_tile = layout.gather(k_flat, c0, c1).to(acc), layout.gather(v_flat, c0, c1).to(acc)
            s, y = tile_scores(layout, q_tile, k_tile)
            do = grad_out[:, :, c0:c1]  # [B, Hkv, c, G*bs, Dv]
            dp = torch.matmul(do, v_tile.transpose(-1, -2)).view(y.shape)
            delta = (do * out[:, :, c0:c1]).sum(dim=-1).view(y.shape[:-1] + (1,))  # rowsum(dO * O), per tile
            p = torch.exp(layout.mask_tile_(y, c0, c1).sub_(lse[:, :, c0:c1]))
            dy = p * (dp - delta)
            if theta is not None:
                dy, gtheta, gaffine = naive_multimax_modulate_backward(dy, s, theta, affine)
                dtheta += gtheta
                if daffine is not None:
                    daffine += gaffine
            ds = dy.flatten(3, 4)  # [B, Hkv, c, G*bs, S*bs], w.r.t. the scores of the scaled queries
            dq[:, :, c0:c1] = torch.matmul(ds, k_tile).mul_(scale)
            flat_idx = layout.flat_idx[:, :, c0:c1].reshape(-1)
            dk.index_add_(0, flat_idx, torch.matmul(ds.transpose(-1, -2), q_tile).reshape(-1, bs, dk.shape[-1]))
            dv.index_add_(0, flat_idx, torch.matmul(p.flatten(3, 4).transpose(-1, -2), do).reshape(-1, bs, dv.shape[-1]))
        dtheta, daffine = (
            None if g is None else g.reshape(shape).to(dtype)
            for g, (shape, dtype) in zip((dtheta, daffine), (sh or (None, None) for sh in ctx.param_shapes))
        )
        return dq, dk, dv, dtheta, daffine, dsink, None, None


_flash_forward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _flash_tile(layout: SparseLayout, q_blocks, k_flat, v_flat, c0: int, c1: int):
    """A tile's queries `[n, 1, G*bs, D]` and gathered keys/values `[n, 1, S*bs, D]` (n = B*Hkv*c),
    and its additive mask, in the layout torch's CPU flash kernels take (one head: the group's
    query heads are stacked as rows against their shared keys)."""
    rows, cols = q_blocks.shape[-2], layout.block_idx.shape[-1] * layout.geometry.block_size
    q = q_blocks[:, :, c0:c1].reshape(-1, 1, rows, q_blocks.shape[-1])
    k = layout.gather(k_flat, c0, c1).reshape(-1, 1, cols, k_flat.shape[-1])
    v = layout.gather(v_flat, c0, c1).reshape(-1, 1, cols, v_flat.shape[-1])
    return q, k, v, layout.additive_mask(c0, c1, q.dtype).reshape(-1, 1, rows, cols)


class _FlashBlockedSparseMix(torch.autograd.Function):
    """Softmax over the selected blocks with torch's fused CPU flash-attention kernels per tile:
    scores never leave the cache; the backward regathers keys and values and runs the fused backward
    kernel from the saved output and log-sum-exp."""

    @staticmethod
    def forward(ctx, q_blocks, k_flat, v_flat, sink, layout: SparseLayout, scale: float):
        q_blocks, k_flat, v_flat = q_blocks.detach(), k_flat.detach(), v_flat.detach()
        B, Hkv, nQB, rows, _ = q_blocks.shape
        out = torch.empty(B, Hkv, nQB, rows, v_flat.shape[-1], dtype=q_blocks.dtype, device=q_blocks.device)
        lse = torch.empty(B, Hkv, nQB, rows, dtype=torch.promote_types(q_blocks.dtype, torch.float32), device=q_blocks.device)
        for c0, c1 in layout.chunks():
            q, k, v, mask = _flash_tile(layout, q_blocks, k_flat, v_flat, c0, c1)
            o, l = _flash_forward(q, k, v, 0.0, False, attn_mask=mask, scale=scale)
            out[:, :, c0:c1] = o.view(B, Hkv, c1 - c0, rows, -1)
            lse[:, :, c0:c1] = l.view(B, Hkv, c1 - c0, rows)
        out, sigma = _fold_sink(out, lse, sink, layout)
        ctx.save_for_backward(q_blocks, k_flat, v_flat, out, lse, sigma, sink)
        ctx.layout, ctx.scale = layout, scale
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_blocks, k_flat, v_flat, out, lse, sigma, sink = ctx.saved_tensors
        layout, scale = ctx.layout, ctx.scale
        bs = layout.geometry.block_size
        grad_out, dsink = _sink_backward(grad_out, out, sigma, sink, layout)
        grad_out = grad_out.to(q_blocks.dtype)
        dq = torch.empty_like(q_blocks)
        # Key/value gradients gather contributions from every tile that selected a block: fp32 at least.
        acc = lse.dtype
        dk = torch.zeros(k_flat.shape, dtype=acc, device=k_flat.device)
        dv = torch.zeros(v_flat.shape, dtype=acc, device=v_flat.device)
        for c0, c1 in layout.chunks():
            q, k, v, mask = _flash_tile(layout, q_blocks, k_flat, v_flat, c0, c1)
            shape = q.shape[:-1] + (-1,)
            gq, gk, gv = _flash_backward(
                grad_out[:, :, c0:c1].reshape(shape), q, k, v, out[:, :, c0:c1].reshape(shape),
                lse[:, :, c0:c1].reshape(q.shape[:-1]), 0.0, False, attn_mask=mask, scale=scale,
            )
            dq[:, :, c0:c1] = gq.view(dq[:, :, c0:c1].shape)
            flat_idx = layout.flat_idx[:, :, c0:c1].reshape(-1)
            dk.index_add_(0, flat_idx, gk.reshape(-1, bs, dk.shape[-1]).to(acc))
            dv.index_add_(0, flat_idx, gv.reshape(-1, bs, dv.shape[-1]).to(acc))
        return dq, dk.to(k_flat.dtype), dv.to(v_flat.dtype), dsink, None, None


def _use_flash(layout: SparseLayout, query, key, value) -> bool:
    # torch's fused kernels: CPU, softmax, one dtype, equal head dims, float types.
    return (
        query.device.type == "cpu" and layout.theta is None and query.dtype == key.dtype == value.dtype
        and query.dtype in (torch.float32, torch.float64, torch.bfloat16, torch.float16)
        and query.shape[-1] == value.shape[-1]
    )


def blocked_sparsemix_attention(
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
    """Same contract as `naive_sparsemix_attention`, with recomputation in backward.

    Examples:
        >>> from hf_multimax.ops.sparsemix import block_geometry, select_blocks
        >>> q = k = v = torch.randn(1, 2, 200, 16)
        >>> g = block_geometry(200, 200, 64, causal=True)
        >>> idx, ok = select_blocks(torch.randn(1, 2, g.n_q_blocks, g.n_k_blocks), g, top_k=1)
        >>> blocked_sparsemix_attention(q, k, v, idx, ok, block_size=64, is_causal=True)[0].shape
        torch.Size([1, 2, 200, 16])
    """
    layout = SparseLayout(query, key, value, block_idx, block_valid, block_size=block_size, is_causal=is_causal,
                          mask=mask, theta=theta, affine=affine)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    if sink_logits is not None:
        check_sink(sink_logits, layout.n_heads)
    # theta/affine reach the Function as inputs (for their gradients) and through the layout (shaped).
    q_blocks, k_flat, v_flat = layout.blocked_queries(query), layout.flat_blocks(key), layout.flat_blocks(value)
    if _use_flash(layout, query, key, value):
        out = _FlashBlockedSparseMix.apply(q_blocks, k_flat, v_flat, sink_logits, layout, float(scale))
    else:
        out = _BlockedSparseMix.apply(q_blocks, k_flat, v_flat, theta, affine, sink_logits, layout, float(scale))
    return layout.unblock_queries(out).to(value.dtype), None
