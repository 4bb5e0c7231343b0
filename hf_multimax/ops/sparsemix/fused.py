"""SparseMix's exact attention over the selected key blocks through the fused C++ CPU kernel of
MultiMax (`ops/multimax/csrc/fused_cpu.cpp`): each block of queries multiplies its selected key
blocks, copied side by side, in one score product and one P.V product per head, with the same
vectorised row code, masks and normalizer (softmax, or MultiMax when `theta` is given). Forward only:
calls that need gradients run `blocked`, whose softmax forward on CPU is this kernel (it returns the
log-sum-exp the backward needs).
"""

from __future__ import annotations

import torch

from ..multimax.fused import _columns, load_fused_extension
from ..naive_attention import check_qkv, post_mask
from .layout import check_selection
from .selection import block_geometry

__all__ = ["fused_sparsemix_attention", "fused_sparsemix_forward"]


def _rows(t: torch.Tensor) -> torch.Tensor:
    """fp32 `[B, Hkv, K, D]` the kernel reads in place: contiguous, or a static KV cache's buffer cut at
    its real length (each head's rows contiguous, heads a buffer apart), which copying would cost as
    much as dense decoding reads."""
    B, H, K, D = t.shape
    s = t.stride()
    if t.dtype == torch.float32 and s[3] == 1 and s[2] == D and s[1] >= K * D and s[0] == H * s[1]:
        return t
    return t.float().contiguous()


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
) -> tuple[torch.Tensor, None]:
    """Same contract as `naive_sparsemix_attention` on CPU tensors without gradient.

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
    tensors = (query, key, value, theta, affine)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        raise ValueError("the fused SparseMix backend has no backward; use backend 'blocked' (or 'auto') to train")
    out, _ = fused_sparsemix_forward(query, key, value, block_idx, block_valid, block_size=block_size, scale=scale,
                                     mask=mask, is_causal=is_causal, theta=theta, affine=affine)
    return out.to(value.dtype), None


def fused_sparsemix_forward(
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
    heads_last: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's fp32 `out [B, H, Q, Dv]` and the rows' log-sum-exp `[B, H, Q]` (+inf where a row
    sees no key), which the `blocked` backend's backward recomputes the tiles from. With
    `heads_last` the output is a view of `[B, Q, H, Dv]` memory, the layout attention functions
    return; else contiguous. No autograd: inputs are read as they are."""
    _, n_kv_heads = check_qkv(query, key, value)
    B, H, Q, D = query.shape
    K = key.shape[-2]
    geometry = block_geometry(Q, K, block_size, is_causal)
    check_selection(block_idx, block_valid, B, n_kv_heads, geometry)
    scale = D ** -0.5 if scale is None else scale
    theta_c, affine_c = _columns(torch.zeros(8) if theta is None else theta, affine)
    out, lse = load_fused_extension().sparse_forward(
        query.detach().float().contiguous(), _rows(key.detach()), _rows(value.detach()), theta_c, affine_c,
        None if mask is None else post_mask(mask, B, H, Q, K), block_idx.contiguous(), block_valid.contiguous(),
        block_size, geometry.q_offset, bool(is_causal), float(scale), affine is not None, heads_last,
    )
    return out, lse
