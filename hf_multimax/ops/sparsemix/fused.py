"""SparseMix's exact attention over the selected key blocks through the fused C++ CPU kernel of
MultiMax (`ops/multimax/csrc/fused_cpu.cpp`): each block of queries multiplies its selected key
blocks one after another into one row of scores per query, with the same vectorised row code, masks
and normalizer (softmax, or MultiMax when `theta` is given), then P.V block by block.

It also trains, with softmax or MultiMax: the forward keeps the rows' log-sum-exp and the backward
recomputes each tile over the same blocks (FlashAttention-2's recipe), adding the key/value
gradients back into the blocks in place and, with MultiMax, summing the scalars' gradients (fp64
across rows, as the dense kernel). Attention sinks are folded in from the rows' log-sum-exp, in the
backward too, as `blocked` does (its module docstring: the C++ backward runs on the sinked output
unchanged).
"""

from __future__ import annotations

import torch

from ..multimax.fused import _columns, load_fused_extension
from ..naive_attention import check_qkv, post_mask
from ..sink import check_sink, fold_sink
from .layout import check_selection
from .selection import BlockGeometry, _slot_layout, _window_in_blocks, block_geometry, block_statistics, slot_layout

__all__ = ["DECODE_FEATURES", "fused_block_statistics", "fused_select_blocks", "fused_sparsemix_attention",
           "fused_sparsemix_decode"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 `[B, Hkv, K, D]` the kernel reads in place: contiguous, or a static KV cache's buffer cut at
    its real length (each head's rows contiguous, heads a buffer apart), which copying would cost as
    much as dense decoding reads."""
    B, H, K, D = t.shape
    s = t.stride()
    if t.dtype == torch.float32 and s[3] == 1 and s[2] == D and s[1] >= K * D and s[0] == H * s[1]:
        return t
    return t.float().contiguous()


class _FusedSparseMix(torch.autograd.Function):
    """Softmax, or MultiMax when `theta` is given, over the selected blocks, forward and backward in
    C++ (the backward also returns the scalars' gradients). The output is a `[B, H, Q, Dv]` view of
    `[B, Q, H, Dv]` memory, the layout attention functions return."""

    @staticmethod
    def forward(ctx, query, key, value, theta, affine, sink, block_idx, block_valid, mask, block_size: int,
                q_offset: int, causal: bool, scale: float):
        q, k, v = query.detach().float().contiguous(), _rows(key.detach()), _rows(value.detach())
        modulated = theta is not None
        theta_c, affine_c = _columns(theta.detach() if modulated else torch.zeros(8),
                                     None if affine is None else affine.detach())
        out, lse = load_fused_extension().sparse_forward(
            q, k, v, theta_c, affine_c, mask, block_idx, block_valid, block_size, q_offset, causal, scale,
            affine is not None, True,
        )
        sigma = None
        if sink is not None:
            sigma = torch.sigmoid(lse - sink.float().view(1, -1, 1))  # [B, H, Q]: the mass kept beside the sink
            out = out * sigma[..., None]
        ctx.save_for_backward(q, k, v, theta_c, affine_c, out, lse, block_idx, block_valid, mask, sigma, sink)
        ctx.args = block_size, q_offset, causal, scale, modulated, affine is not None
        ctx.dtypes = query.dtype, key.dtype, value.dtype
        ctx.scalar_shapes = (None if theta is None else (theta.shape, theta.dtype),
                             None if affine is None else (affine.shape, affine.dtype))
        return out.to(query.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, theta_c, affine_c, out, lse, block_idx, block_valid, mask, sigma, sink = ctx.saved_tensors
        block_size, q_offset, causal, scale, modulated, has_affine = ctx.args
        grad_out = grad_out.float()
        dsink = None
        if sigma is not None:  # d out / d sink = -out (1 - sigma); the tiles see the gradient of the unsinked output
            dsink = (-(grad_out * out).sum(-1) * (1 - sigma)).sum(dim=(0, 2)).to(sink.dtype)
            grad_out = grad_out * sigma[..., None]
        if grad_out.stride(-1) != 1:
            grad_out = grad_out.contiguous()
        dq, dk, dv, dscalars = load_fused_extension().sparse_backward(
            q, k, v, theta_c, affine_c, has_affine, modulated, mask, block_idx, block_valid, block_size, q_offset,
            causal, scale, out, grad_out, lse,
        )
        dq, dk, dv = (g.to(dtype) for g, dtype in zip((dq, dk, dv), ctx.dtypes))
        dtheta = daffine = None
        if modulated:
            per_head = dscalars.sum(0).t()  # [10, H]; shared scalars (one column) sum over the heads
            grads = [per_head[:8], per_head[8:]]
            for i, (shaped, columns) in enumerate(zip(ctx.scalar_shapes, (theta_c, affine_c))):
                if shaped is not None:
                    g = grads[i].sum(1, keepdim=True) if columns.shape[1] == 1 else grads[i]
                    grads[i] = g.reshape(shaped[0]).to(shaped[1])
            dtheta, daffine = grads[0], grads[1] if has_affine else None
        return dq, dk, dv, dtheta, daffine, dsink, None, None, None, None, None, None, None


def fused_sparsemix_attention(
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
    """Same contract as `naive_sparsemix_attention` on CPU tensors, gradients included.

    Examples:
        >>> from hf_multimax.ops.sparsemix import block_geometry, select_blocks
        >>> q = k = v = torch.randn(1, 2, 200, 16)
        >>> g = block_geometry(200, 200, 64, causal=True)
        >>> idx, ok = select_blocks(torch.randn(1, 2, g.n_q_blocks, g.n_k_blocks), g, top_k=1)
        >>> fused_sparsemix_attention(q, k, v, idx, ok, block_size=64, is_causal=True)[0].shape
        torch.Size([1, 2, 200, 16])
    """
    if query.device.type != "cpu":
        raise ValueError(f"the fused backend runs on CPU tensors, got {query.device}")
    _, n_kv_heads = check_qkv(query, key, value)
    B, H, Q, D = query.shape
    K = key.shape[-2]
    geometry = block_geometry(Q, K, block_size, is_causal)
    check_selection(block_idx, block_valid, B, n_kv_heads, geometry)
    scale = D ** -0.5 if scale is None else scale
    mask = None if mask is None else post_mask(mask, B, H, Q, K)
    block_idx, block_valid = block_idx.contiguous(), block_valid.contiguous()
    if sink_logits is not None:
        check_sink(sink_logits, H)
    if affine is not None and theta is None:
        theta = torch.zeros(8, dtype=affine.dtype)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                       for t in (query, key, value, theta, affine, sink_logits)):
        out = _FusedSparseMix.apply(query, key, value, theta, affine, sink_logits, block_idx, block_valid, mask,
                                    block_size, geometry.q_offset, bool(is_causal), float(scale))
        return out.to(value.dtype), None
    theta_c, affine_c = _columns(torch.zeros(8) if theta is None else theta, affine)
    out, lse = load_fused_extension().sparse_forward(
        query.float().contiguous(), _rows(key), _rows(value), theta_c, affine_c, mask, block_idx, block_valid,
        block_size, geometry.q_offset, bool(is_causal), float(scale), affine is not None, True,
    )
    if sink_logits is not None:
        out = fold_sink(out, lse, sink_logits)
    return out.to(value.dtype), None


def fused_select_blocks(
    scores: torch.Tensor, geometry: BlockGeometry, *, top_k: int, sink: bool = True, local: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """`select_blocks` (the reference, same arguments and result) in one C++ call, for CPU scores.
    While decoding, the reference's ten small tensor ops took ~0.08 ms of a ~0.7 ms attention call at
    16k (1 thread). The same blocks, best first; a NaN score is passed over here where the
    reference's top-k takes it first and then leaves its slot empty."""
    hidden, fixed_idx, fixed_ok = slot_layout(scores, geometry, sink=sink, local=local)
    scores = scores.float()
    if scores.stride(-1) != 1:
        scores = scores.contiguous()
    idx, ok = load_fused_extension().select_top_blocks(scores, hidden, fixed_idx, fixed_ok, min(top_k, scores.shape[-1]))
    return idx, ok


def fused_block_statistics(x: torch.Tensor, block_size: int, front_pad: int = 0,
                           pair_norms: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`block_statistics` (the reference, same arguments and result) in one C++ pass over `x`, for CPU
    tensors that need no gradient (the selection has none); others go to the reference. At 16k (8
    heads, 1 thread) the reference's tensor ops took ~70 ms of the ~90 ms selection."""
    if x.device.type != "cpu" or (x.requires_grad and torch.is_grad_enabled()):
        return block_statistics(x, block_size, front_pad, pair_norms)
    x = x.float()
    if x.stride(-1) != 1 and x.shape[-1] > 1:
        x = x.contiguous()
    raw, norms = load_fused_extension().block_statistics(x, block_size, front_pad, pair_norms)
    return raw, norms if pair_norms else None


# The block scorers the one-call decoding step computes the query features of (the C++ enum
# `DecodeFeatures`); the token indexer has no decoding step of its own.
DECODE_FEATURES = {"block": 0, "block_norms": 1, "block_rotary": 2}


def fused_sparsemix_decode(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    weights: tuple[torch.Tensor, ...],
    key_summary: torch.Tensor,
    *,
    selector: str,
    block_size: int,
    top_k: int,
    sink: bool = True,
    local: bool = True,
    causal: bool = True,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One decoding step of softmax SparseMix in one C++ call: the block scorer's scores of the cached
    block summaries, the top-k selection and the one-row kernel. The same as
    `select_sparsemix_blocks(..., key_summary=key_summary)` followed by `fused_sparsemix_attention`
    (the references: `select_blocks` and `naive_sparsemix_attention`), without their ~20 small tensor
    ops and Python calls per layer and token. Inference only (no graph).

    Args:
        query (`torch.Tensor`): `[B, H, 1, D]`, one query row.
        key, value (`torch.Tensor`): `[B, Hkv, K, D]` / `[B, Hkv, K, Dv]`, read in place when fp32 with
            contiguous (batch, head) rows (a static cache's buffer cut at its length).
        weights (`tuple`): `(w_query, w_key)` of the block scorer `selector`.
        key_summary (`torch.Tensor`): `block_key_features(key, w_key, block_size, features)`,
            `[B, Hkv, ceil(K / block_size), D + r]` (the last block's entry may be a placeholder when
            `local` keeps that block anyway).
        selector (`str`): one of `DECODE_FEATURES`.
        block_size, top_k, sink, local, causal, scale, mask, window: as in `sparsemix_attention`.

    Returns:
        `(out [B, H, 1, Dv], block_idx [B, Hkv, 1, S], block_valid [B, Hkv, 1, S])`; `out` is a view of
        `[B, 1, H, Dv]` memory, the layout attention functions return.
    """
    if query.device.type != "cpu":
        raise ValueError(f"the fused decoding step runs on CPU tensors, got {query.device}")
    if selector not in DECODE_FEATURES:
        raise ValueError(f"the fused decoding step supports the block scorers {tuple(DECODE_FEATURES)}, got {selector!r}")
    if query.dim() != 4 or query.shape[-2] != 1:
        raise ValueError(f"the fused decoding step takes one query row [B, H, 1, D], got {tuple(query.shape)}")
    _, n_kv_heads = check_qkv(query, key, value)
    B, H, _, D = query.shape
    K = key.shape[-2]
    geometry = block_geometry(1, K, block_size, causal, window)
    w_query = weights[0].detach().float().contiguous()
    F = D + w_query.shape[-1]
    if tuple(key_summary.shape) != (B, n_kv_heads, geometry.n_k_blocks, F):
        raise ValueError(f"key_summary must be [B, Hkv, n_k_blocks, D + r] = {(B, n_kv_heads, geometry.n_k_blocks, F)}, "
                         f"got {tuple(key_summary.shape)}")
    summary = key_summary.float()
    if summary.stride(-1) != 1 or summary.stride(-2) != F:
        summary = summary.contiguous()
    win = w_query.shape[-2]
    slow = (win - D) // 4 if selector == "block_rotary" else 0
    if (selector != "block" and D % 2) or win != {"block": 2 * D, "block_norms": D}.get(selector, D + 4 * slow):
        raise ValueError(f"w_query [Hkv, {win}, r] does not fit the {selector!r} scorer of heads of {D} (inputs: 2D for "
                         "'block', D for 'block_norms', D + 4 * slow pairs for 'block_rotary'; an even D for the last two)")
    # The geometry's slot layout (cached per geometry), as `slot_layout` gives `select_blocks`.
    hidden, fixed_idx, fixed_ok = _slot_layout(1, geometry.n_k_blocks, geometry.q_block0, geometry.causal,
                                               _window_in_blocks(geometry), sink, local, query.device)
    scale = D ** -0.5 if scale is None else scale
    mask = None if mask is None else post_mask(mask, B, H, 1, K)
    out, _, block_idx, block_valid = load_fused_extension().sparse_decode_step(
        query.detach().float().contiguous(), _rows(key.detach()), _rows(value.detach()), mask, summary, w_query,
        DECODE_FEATURES[selector], slow, hidden, fixed_idx, fixed_ok, min(top_k, geometry.n_k_blocks), block_size,
        bool(causal), float(scale),
    )
    return out.to(value.dtype), block_idx, block_valid
