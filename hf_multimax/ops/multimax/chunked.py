"""Memory-efficient MultiMax attention: query-block tiling with recomputation in backward.

Each block of `block_size` queries sees its full (causally trimmed) row of keys, so the softmax of
a row is exact in one pass; the forward keeps only the output and the row log-sum-exp, and the
backward recomputes scores block by block. Extra memory is O(block_size * K) instead of O(Q * K).
The elementwise body of each tile (modulator, mask, exp, gradients of the 8 scalars) is fused by
`torch.compile` when available; `HF_MULTIMAX_COMPILE=0` runs the same code eagerly.
"""

from __future__ import annotations

import os

import torch

from ..naive_attention import check_qkv
from ..sink import check_sink, fold_sink
from .naive import check_theta, naive_multimax_modulate, naive_multimax_modulate_backward

__all__ = ["DEFAULT_BLOCK_SIZE", "chunked_multimax_attention", "compile_enabled"]

DEFAULT_BLOCK_SIZE = 128  # query rows per block: measured best on a 2-core AVX2 CPU at L=2k..8k
KEY_CHUNK = 1024  # keys per recomputed backward tile: bounds backward memory at long lengths


def _scores(q_blk, k, scale, softcap, bias_blk):
    raw = torch.matmul(q_blk.float(), k.float().transpose(-1, -2)) * scale
    s = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    if bias_blk is not None:
        s = s + bias_blk
    return s


def _keep(s, keep_blk, row0, col0, causal_offset):
    keep = keep_blk
    if causal_offset is not None:
        rows = torch.arange(s.shape[-2], device=s.device)[:, None] + (row0 + causal_offset - col0)
        causal = torch.arange(s.shape[-1], device=s.device)[None, :] <= rows
        keep = causal if keep is None else keep & causal
    return keep


def _forward_tile(
    q_blk, k, v, theta, affine, keep_blk, bias_blk, row0: int, col0: int, causal_offset, scale: float, softcap
):
    s = _scores(q_blk, k, scale, softcap, bias_blk)
    x = s if affine is None else (1 + affine[0]) * s + affine[1]
    y = naive_multimax_modulate(x, theta)
    keep = _keep(y, keep_blk, row0, col0, causal_offset)
    if keep is not None:
        y = y.masked_fill(~keep, float("-inf"))
    m = y.amax(dim=-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # rows with no key
    p = torch.exp(y - m)
    denom = p.sum(dim=-1, keepdim=True)
    has_key = denom > 0
    out = torch.matmul(p, v.float()) / torch.where(has_key, denom, torch.ones_like(denom))
    # +inf log-sum-exp makes the backward's recomputed probabilities exactly zero on empty rows.
    lse = torch.where(has_key, m + torch.log(denom), torch.full_like(denom, float("inf")))
    return out, lse


def _backward_tile(
    q_blk, k, v, theta, affine, keep_blk, bias_blk, row0: int, col0: int, causal_offset, scale: float, softcap, do_blk,
    lse_blk, delta_blk,
):
    raw = torch.matmul(q_blk.float(), k.float().transpose(-1, -2)) * scale
    s = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    if bias_blk is not None:
        s = s + bias_blk
    x = s if affine is None else (1 + affine[0]) * s + affine[1]
    y = naive_multimax_modulate(x, theta)
    p = torch.exp(y - lse_blk)
    keep = _keep(y, keep_blk, row0, col0, causal_offset)
    if keep is not None:
        p = torch.where(keep, p, torch.zeros_like(p))
    do = do_blk.float()
    dp = torch.matmul(do, v.float().transpose(-1, -2))
    dy = p * (dp - delta_blk)  # dL/dsigma

    dx, dtheta, daffine = naive_multimax_modulate_backward(dy, s, theta, affine)
    if softcap is not None:
        dx = dx * (1 - torch.tanh(raw / softcap).square())
    dx = dx * scale
    dq = torch.matmul(dx, k.float())
    dk = torch.matmul(dx.transpose(-1, -2), q_blk.float())
    dv = torch.matmul(p.transpose(-1, -2), do)
    return dq, dk, dv, dtheta, daffine


_TILES: dict[tuple[str, bool], object] = {}


def compile_enabled() -> bool:
    return os.environ.get("HF_MULTIMAX_COMPILE", "1") != "0"


def _tile(name):
    """The tile function, compiled once per process on first use (never at import); inside a model
    that is being compiled as a whole, the plain function (the outer graph fuses it)."""
    if torch.compiler.is_compiling():
        return {"forward": _forward_tile, "backward": _backward_tile}[name]
    key = (name, compile_enabled())
    if key not in _TILES:
        fn = {"forward": _forward_tile, "backward": _backward_tile}[name]
        _TILES[key] = _without_duck_shapes(torch.compile(fn, dynamic=True)) if key[1] else fn
    return _TILES[key]


def _without_duck_shapes(compiled):
    """Duck shaping would tie dims that happen to be equal on the first call (a 128-query block
    against 128 keys, block size == head dim) and recompile when they differ; we want one graph
    for every length."""
    from torch.fx.experimental import _config as fx_config

    def call(*args):
        with fx_config.patch(use_duck_shape=False):
            return compiled(*args)

    return call


def _blocks(n_queries, n_keys, block_size, causal_offset, keep):
    """(row0, row1, col0, col1) per query block: the key range the block can attend. Causal blocks
    stop at their last query; with a boolean mask the range shrinks to the keys any row of the block
    keeps (padding, sliding windows, a causal mask handed over by transformers). Empty ranges are
    yielded as col0 == col1. Under torch.compile the mask is not read here (the range would depend on
    its values, which a graph cannot): the tiles apply it, so only the saving is lost."""
    for r0 in range(0, n_queries, block_size):
        r1 = min(n_queries, r0 + block_size)
        c0, c1 = 0, n_keys if causal_offset is None else max(0, min(n_keys, r1 + causal_offset))
        if keep is not None and c1 > 0 and not torch.compiler.is_compiling():
            used = keep[..., r0:r1, :c1].reshape(-1, c1).any(dim=0).nonzero()
            c0, c1 = (int(used[0]), int(used[-1]) + 1) if len(used) else (0, 0)
        yield r0, r1, c0, c1


def _slice(t, r0, r1, c0, c1):
    return None if t is None else t[..., r0:r1, c0:c1].contiguous()


def _rows(t, r0, r1):
    # Contiguous copies (1/block_size of a tile's work): a view's strides depend on the full length,
    # and torch.compile would guard on them and recompile for every new sequence length.
    return t[:, :, r0:r1].contiguous()


class _ChunkedMultiMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, theta, affine, keep, bias, causal_offset, scale, softcap, block_size):
        tile = _tile("forward")
        # Detached views for the tiles: compiled code guards on requires_grad.
        q, k, v, theta = q.detach(), k.detach(), v.detach(), theta.detach()
        affine = None if affine is None else affine.detach()
        B, H, Q, _ = q.shape
        out = torch.empty(B, H, Q, v.shape[-1], dtype=torch.float32, device=q.device)
        lse = torch.empty(B, H, Q, 1, dtype=torch.float32, device=q.device)
        for r0, r1, c0, c1 in _blocks(Q, k.shape[-2], block_size, causal_offset, keep):
            if c0 == c1:  # nothing to attend: zero output, and +inf lse so backward sees p = 0
                out[:, :, r0:r1], lse[:, :, r0:r1] = 0.0, float("inf")
                continue
            out[:, :, r0:r1], lse[:, :, r0:r1] = tile(
                _rows(q, r0, r1), _rows(k, c0, c1), _rows(v, c0, c1), theta, affine, _slice(keep, r0, r1, c0, c1),
                _slice(bias, r0, r1, c0, c1), r0, c0, causal_offset, scale, softcap,
            )
        ctx.save_for_backward(q, k, v, theta, affine, keep, bias, out, lse)
        ctx.config = (causal_offset, scale, softcap, block_size)
        return out.to(v.dtype), lse.squeeze(-1)

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, theta, affine, keep, bias, out, lse = (
            None if t is None else t.detach() for t in ctx.saved_tensors
        )
        causal_offset, scale, softcap, block_size = ctx.config
        tile = _tile("backward")
        delta = (grad_out.float() * out).sum(dim=-1, keepdim=True)
        if grad_lse is not None:  # d lse / d y = p: the same as lowering delta (an attention sink reads lse)
            delta = delta - grad_lse.float().unsqueeze(-1)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
        # The scalars' gradients add one tile's sum after another: float64 totals keep the error of
        # the sum bounded by a tile's, whatever the number of tiles.
        dtheta = torch.zeros_like(theta, dtype=torch.float64)
        daffine = None if affine is None else torch.zeros_like(affine, dtype=torch.float64)
        for r0, r1, b0, b1 in _blocks(q.shape[-2], k.shape[-2], block_size, causal_offset, keep):
            # With the row log-sum-exp known, key chunks are independent: chunking them bounds the
            # recomputed tiles' memory without any online rescaling.
            q_blk, do_blk = _rows(q, r0, r1), _rows(grad_out, r0, r1)
            lse_blk, delta_blk = _rows(lse, r0, r1), _rows(delta, r0, r1)
            for c0 in range(b0, b1, KEY_CHUNK):
                c1 = min(b1, c0 + KEY_CHUNK)
                gq, gk, gv, gtheta, gaffine = tile(
                    q_blk, _rows(k, c0, c1), _rows(v, c0, c1), theta, affine, _slice(keep, r0, r1, c0, c1),
                    _slice(bias, r0, r1, c0, c1), r0, c0, causal_offset, scale, softcap, do_blk, lse_blk, delta_blk,
                )
                dq[:, :, r0:r1] += gq
                dk[:, :, c0:c1] += gk
                dv[:, :, c0:c1] += gv
                dtheta += gtheta
                if daffine is not None:
                    daffine += gaffine
        return (
            dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dtheta.to(theta.dtype),
            None if affine is None else daffine.to(affine.dtype), None, None, None, None, None, None,
        )


def chunked_multimax_attention(
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
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tuple[torch.Tensor, None]:
    """Same contract as `naive_multimax_attention`, in O(block_size * K) extra memory.

    Returns `(out [B, H, Q, Dv] in value's dtype, None)`: probabilities are never materialised.
    Dropout is not supported (`dropout_p` must be 0).

    Examples:
        >>> q = k = v = torch.randn(1, 2, 300, 16)
        >>> out, _ = chunked_multimax_attention(q, k, v, torch.zeros(8), is_causal=True)
        >>> out.shape
        torch.Size([1, 2, 300, 16])
    """
    if dropout_p != 0.0:
        raise ValueError(f"the chunked backend does not support attention dropout (got dropout_p={dropout_p}); use eager")
    n_heads, n_kv_heads = check_qkv(query, key, value)
    check_theta(theta)
    if not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be a positive int")
    if n_heads != n_kv_heads:
        key = key.repeat_interleave(n_heads // n_kv_heads, dim=1)
        value = value.repeat_interleave(n_heads // n_kv_heads, dim=1)
    if scale is None:
        scale = query.shape[-1] ** -0.5
    q_len, k_len = query.shape[-2], key.shape[-2]
    # Masks broadcast over batch/head but are sliced per query block: give them full Q, K dims.
    if mask is not None:
        mask = mask.expand(*mask.shape[:-2], q_len, k_len)
    if bias is not None:
        bias = bias.float().expand(*bias.shape[:-2], q_len, k_len)
    causal_offset = k_len - q_len if is_causal else None
    out, lse = _ChunkedMultiMax.apply(
        query, key, value, theta, affine, mask, bias, causal_offset, float(scale), softcap, block_size
    )
    if sink_logits is not None:
        check_sink(sink_logits, n_heads)
        out = fold_sink(out, lse, sink_logits).to(value.dtype)
    return out, None
