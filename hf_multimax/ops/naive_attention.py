"""Reference attention with a pluggable score modulation and normaliser: fp32, materialises the
scores. The MultiMax and entmax references are this with their own pieces."""

from __future__ import annotations

from typing import Callable

import torch

from .sink import check_sink

__all__ = ["check_qkv", "naive_attention", "post_mask", "score_shaped"]


def check_qkv(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> tuple[int, int]:
    """Validate `[B, H, Q, D]` / `[B, Hkv, K, D]` inputs of every attention kernel; returns (H, Hkv)."""
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        raise ValueError(
            f"query/key/value must be 4-D [B, H, L, D]; got {tuple(query.shape)}, {tuple(key.shape)}, {tuple(value.shape)}"
        )
    n_heads, n_kv_heads = query.shape[1], key.shape[1]
    if n_heads % n_kv_heads != 0 or value.shape[1] != n_kv_heads:
        raise ValueError(
            f"query heads ({n_heads}) must be a multiple of key/value heads ({n_kv_heads}, {value.shape[1]})"
        )
    return n_heads, n_kv_heads


def score_shaped(t: torch.Tensor, B: int, H: int, Q: int, K: int) -> torch.Tensor:
    """A mask or bias broadcast to `[B, H, Q, K]` without copying (zero strides), keys contiguous:
    how the fused kernels read it, row by row."""
    while t.dim() < 4:
        t = t.unsqueeze(0)
    t = t.expand(B, H, Q, K)
    return t if t.stride(-1) == 1 else t.contiguous()


def post_mask(mask: torch.Tensor, B: int, H: int, Q: int, K: int) -> torch.Tensor:
    """A boolean keep mask as what the fused kernels add to the modulated scores: 0 keeps, -inf
    hides (added after the modulator, so it never passes through it)."""
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be boolean (True = attend), got {mask.dtype}; pass additive masks as bias")
    additive = torch.zeros(mask.shape, device=mask.device).masked_fill_(~mask, float("-inf"))
    return score_shaped(additive, B, H, Q, K)


def naive_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    score_mod: Callable[[torch.Tensor], torch.Tensor] | None = None,
    normalizer: Callable[..., torch.Tensor] = torch.softmax,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    is_causal: bool = False,
    softcap: float | None = None,
    dropout_p: float = 0.0,
    sink_logits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """normalizer(score_mod(scores)) @ V, masks applied after `score_mod` (see
    `naive_multimax_attention` for the argument shapes). `normalizer(x, dim=-1)` must give zero
    weight to -inf entries."""
    n_heads, n_kv_heads = check_qkv(query, key, value)
    batch, q_len, k_len = query.shape[0], query.shape[-2], key.shape[-2]
    if scale is None:
        scale = query.shape[-1] ** -0.5

    # Scores in fp32 at least, whatever the input dtype (fp64 stays fp64 for gradcheck). Grouped
    # query heads are folded into the row axis of their key/value head instead of copying K and V:
    # head h reads key/value head h // groups.
    acc = torch.promote_types(query.dtype, torch.float32)
    grouped_q = query.to(acc).reshape(batch, n_kv_heads, -1, query.shape[-1])
    scores = torch.matmul(grouped_q, key.to(acc).transpose(-1, -2)).mul_(scale).view(batch, n_heads, q_len, k_len)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if bias is not None:
        scores = scores + bias.to(acc)
    if score_mod is not None:
        scores = score_mod(scores)

    keep = mask
    # A single query (decoding) aligned to the end sees every key: no causal mask to build.
    if is_causal and scores.shape[-2] > 1:
        q_len, k_len = scores.shape[-2:]
        causal = torch.ones(q_len, k_len, dtype=torch.bool, device=scores.device).tril(k_len - q_len)
        keep = causal if keep is None else keep & causal
    if sink_logits is not None:
        # An attention sink (gpt-oss's `s_aux`): one learned logit per head that joins the softmax's
        # denominator as an extra key with no value; it is not a score, so it is not modulated.
        if normalizer is not torch.softmax:
            raise ValueError("an attention sink joins a softmax denominator; this normaliser is not softmax")
        check_sink(sink_logits, n_heads)
        if keep is not None:  # a row with no key puts all its mass on the sink: no NaN to avoid
            scores = scores.masked_fill(~keep, float("-inf"))
        sink_col = sink_logits.to(acc).view(1, n_heads, 1, 1).expand(batch, n_heads, scores.shape[-2], 1)
        probs = torch.softmax(torch.cat([scores, sink_col], dim=-1), dim=-1)[..., :-1]
    elif keep is not None:
        # Rows with no allowed key are zeroed after the normaliser; give them finite scores first so
        # neither the forward nor the backward sees NaN.
        has_key = keep.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~keep, float("-inf")).masked_fill(~has_key, 0.0)
    if sink_logits is None:
        probs = normalizer(scores, dim=-1)
    if keep is not None:
        probs = probs * keep
    if dropout_p > 0.0:
        probs = torch.nn.functional.dropout(probs, p=dropout_p)
    grouped_p = probs.to(value.dtype).view(batch, n_kv_heads, -1, k_len)
    out = torch.matmul(grouped_p, value).view(batch, n_heads, q_len, value.shape[-1])
    return out, probs
