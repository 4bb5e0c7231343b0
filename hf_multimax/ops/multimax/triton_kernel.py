"""MultiMax attention as Triton kernels for GPU, forward and backward, in FlashAttention-2's structure
with the modulator inside the tile: one program per block of queries walks the keys with an online
softmax; the backward recomputes tiles from the row log-sum-exp, one program per block of keys for
dK, dV and the scalars' gradients, one per block of queries for dQ.

Runs where Triton runs: CUDA, and the CPU under `TRITON_INTERPRET=1` (how the tests check it against
`naive`). Inputs are computed in fp32 inside the tiles whatever their dtype.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from ..naive_attention import check_qkv, post_mask, score_shaped
from .naive import check_theta

__all__ = ["triton_is_available", "triton_multimax_attention"]


def triton_is_available() -> tuple[bool, str]:
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed"
    return True, ""


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    import triton

    from . import _triton_tiles as tiles

    return triton, tiles.forward_kernel, tiles.dkdv_kernel, tiles.dq_kernel


BLOCK_M, BLOCK_N = 32, 32


def _strides3(t):
    return (t.stride(0), t.stride(1), t.stride(2)) if t is not None else (0, 0, 0)


class _TritonMultiMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, theta, affine, post, bias, causal, scale, softcap, has_affine):
        triton, fwd, _, _ = _kernels()
        B, H, Q, D = q.shape
        HKV, K = k.shape[1], k.shape[2]
        block_d = max(16, triton.next_power_of_2(D))
        out = torch.empty(B, H, Q, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, Q, dtype=torch.float32, device=q.device)
        dummy = q.new_zeros(1, dtype=torch.float32)
        fwd[(triton.cdiv(Q, BLOCK_M), B * H)](
            q, k, v, theta, affine, bias if bias is not None else dummy, post if post is not None else dummy, out, lse,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(out), *_strides3(bias), *_strides3(post),
            theta.stride(0) if theta.shape[0] > 1 else 0, affine.stride(0) if affine.shape[0] > 1 else 0,
            H, HKV, Q, K, D, scale, softcap, K - Q,
            CAUSAL=causal, HAS_BIAS=bias is not None, HAS_POST=post is not None, HAS_SOFTCAP=softcap > 0,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d,
        )
        ctx.save_for_backward(q, k, v, theta, affine, post, bias, out, lse)
        ctx.config = (causal, scale, softcap, has_affine)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        triton, _, dkdv, dqk = _kernels()
        q, k, v, theta, affine, post, bias, out, lse = ctx.saved_tensors
        causal, scale, softcap, has_affine = ctx.config
        B, H, Q, D = q.shape
        HKV, K = k.shape[1], k.shape[2]
        block_d = max(16, triton.next_power_of_2(D))
        do = grad_out.float().contiguous()
        delta = (do * out).sum(-1).contiguous()
        dq = torch.zeros_like(q, dtype=torch.float32)
        dk = torch.zeros(B, H, K, D, dtype=torch.float32, device=q.device)
        dv = torch.zeros(B, H, K, v.shape[-1], dtype=torch.float32, device=q.device)
        n_blocks = triton.cdiv(K, BLOCK_N)
        dscalars = torch.zeros(B * H * n_blocks, 16, dtype=torch.float64, device=q.device)
        dummy = q.new_zeros(1, dtype=torch.float32)
        common = dict(CAUSAL=causal, HAS_BIAS=bias is not None, HAS_POST=post is not None, HAS_SOFTCAP=softcap > 0,
                      BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=block_d)
        masks = (bias if bias is not None else dummy, post if post is not None else dummy)
        head_strides = (theta.stride(0) if theta.shape[0] > 1 else 0, affine.stride(0) if affine.shape[0] > 1 else 0)
        dkdv[(n_blocks, B * H)](
            q, k, v, do, lse, delta, theta, affine, *masks, dk, dv, dscalars,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(bias), *_strides3(post),
            *head_strides, *_strides3(dk), H, HKV, Q, K, D, scale, softcap, K - Q, **common,
        )
        dqk[(triton.cdiv(Q, BLOCK_M), B * H)](
            q, k, v, do, lse, delta, theta, affine, *masks, dq,
            *_strides3(q), *_strides3(k), *_strides3(v), *_strides3(do), *_strides3(bias), *_strides3(post),
            *head_strides, H, HKV, Q, K, D, scale, softcap, K - Q, **common,
        )
        group = H // HKV
        if group > 1:
            dk = dk.view(B, HKV, group, K, -1).sum(2)
            dv = dv.view(B, HKV, group, K, -1).sum(2)
        per_head = dscalars.view(B, H, n_blocks, 16).sum((0, 2)).float()  # [H, 16]
        dtheta, daffine = per_head[:, :8], per_head[:, 8:10]
        if theta.shape[0] == 1:
            dtheta, daffine = dtheta.sum(0, keepdim=True), daffine.sum(0, keepdim=True)
        return dq, dk, dv, dtheta, daffine if has_affine else None, None, None, None, None, None, None


def triton_multimax_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    theta: torch.Tensor,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    affine: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, None]:
    """Same contract as `naive_multimax_attention` (no dropout, no probabilities), through Triton.
    Returns `(out [B, H, Q, Dv] in value's dtype, None)`."""
    if dropout_p != 0.0:
        raise ValueError(f"the triton backend does not support attention dropout (got dropout_p={dropout_p}); use eager")
    if sink_logits is not None:
        raise ValueError("the triton backend has no attention sinks (s_aux) yet; use 'fused' (CPU), 'chunked' or 'eager'")
    if query.device.type != "cuda" and not interpreting():
        raise ValueError(f"the triton backend runs on CUDA tensors (or the CPU with TRITON_INTERPRET=1), got {query.device}")
    check_qkv(query, key, value)
    check_theta(theta)
    if query.shape[-1] != value.shape[-1]:
        raise ValueError("the triton backend needs equal query and value head sizes; use 'flex' or 'eager'")
    B, H, Q, D = query.shape
    K = key.shape[-2]
    scale = D ** -0.5 if scale is None else scale
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap={softcap!r} must be positive or None")
    post = None if mask is None else post_mask(mask, B, H, Q, K)
    if bias is not None:
        bias = score_shaped(bias.float(), B, H, Q, K)
    theta_h = theta.float().reshape(8, -1).t().contiguous()  # [1 or H, 8]
    affine_h = (torch.zeros(1, 2, device=query.device) if affine is None
                else affine.float().reshape(2, -1).t().contiguous())
    q, k, v = (t.contiguous() for t in (query, key, value))
    out = _TritonMultiMax.apply(q, k, v, theta_h, affine_h, post, bias, bool(is_causal), float(scale),
                                float(softcap or 0.0), affine is not None)
    return out.to(value.dtype), None

