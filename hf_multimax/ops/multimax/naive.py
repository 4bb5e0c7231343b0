"""MultiMax reference: fp32, readable, materialises the full score matrix. Ground truth for tests."""

from __future__ import annotations

import torch

from ..naive_attention import naive_attention

# Order of the 8 scalars along dim 0 of `theta` (docs/methods.md, MultiMax section).
THETA_NAMES = ("t1", "t2", "t3", "t4", "b1", "d1", "b2", "d2")

__all__ = [
    "THETA_NAMES",
    "check_theta",
    "naive_multimax_attention",
    "naive_multimax_modulate",
    "naive_multimax_modulate_backward",
]


def check_theta(theta: torch.Tensor) -> None:
    if theta.shape[0] != 8:
        raise ValueError(f"theta must have 8 rows ({', '.join(THETA_NAMES)}), got shape {tuple(theta.shape)}")


def naive_multimax_modulate(
    x: torch.Tensor, theta: torch.Tensor, affine: torch.Tensor | None = None
) -> torch.Tensor:
    """The MultiMax modulator sigma, applied elementwise.

    sigma(x) = x + t1*relu(b1-x) + t2*relu(x-d1) + t3*relu(b2-x)^2 + t4*relu(x-d2)^2

    Every term reads the original x. With all of theta zero, sigma is the identity.

    Args:
        x (`torch.Tensor`): scores of any shape.
        theta (`torch.Tensor`): `[8, *S]`, the scalars in `THETA_NAMES` order; `S` broadcasts against x
            (`()` for shared scalars, `(H, 1, 1)` for per-head scalars on `[B, H, Q, K]` scores).
        affine (`torch.Tensor`, *optional*): `[2, *S]` as (a, c): sigma is applied to `(1 + a) * x + c`.
            Default: `None` (no affine).

    Examples:
        >>> x = torch.randn(4)
        >>> torch.equal(naive_multimax_modulate(x, torch.zeros(8)), x)
        True
    """
    check_theta(theta)
    if affine is not None:
        if affine.shape[0] != 2:
            raise ValueError(f"affine must have 2 rows (scale delta a, shift c), got shape {tuple(affine.shape)}")
        x = (1 + affine[0]) * x + affine[1]
    t1, t2, t3, t4, b1, d1, b2, d2 = theta.unbind(0)
    # Written as few kernels as autograd allows: this runs on every score of every layer.
    below1 = torch.sub(b1, x).clamp_(min=0)
    y = torch.addcmul(x, t1, below1)
    y = torch.addcmul(y, t2, torch.sub(x, d1).clamp_(min=0))
    y = torch.addcmul(y, t3, torch.sub(b2, x).clamp_(min=0).square_())
    return torch.addcmul(y, t4, torch.sub(x, d2).clamp_(min=0).square_())


def _reduce_to(x, shape):
    return x.sum() if len(shape) == 0 else x.sum_to_size(shape)


def naive_multimax_modulate_backward(
    dy: torch.Tensor, s: torch.Tensor, theta: torch.Tensor, affine: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Hand-written backward of `naive_multimax_modulate` for the fused kernels, which recompute
    scores instead of keeping an autograd graph.

    Args:
        dy (`torch.Tensor`): gradient w.r.t. the modulated scores sigma(x).
        s (`torch.Tensor`): the scores before the affine (x = s without affine).
        theta, affine: as in `naive_multimax_modulate`.

    Returns:
        `(ds, dtheta [8, *S], daffine [2, *S] or None)`, with sigma'(x) = 1 - t1*[x<b1] + t2*[x>d1]
        - 2*t3*relu(b2-x) + 2*t4*relu(x-d2).
    """
    x = s if affine is None else (1 + affine[0]) * s + affine[1]
    t1, t2, t3, t4, b1, d1, b2, d2 = theta.unbind(0)
    below1, above1 = torch.relu(b1 - x), torch.relu(x - d1)
    below2, above2 = torch.relu(b2 - x), torch.relu(x - d2)
    shape = theta.shape[1:]
    dtheta = torch.stack(
        [
            _reduce_to(dy * below1, shape),
            _reduce_to(dy * above1, shape),
            _reduce_to(dy * below2.square(), shape),
            _reduce_to(dy * above2.square(), shape),
            _reduce_to(dy * t1 * (x < b1), shape),
            _reduce_to(-dy * t2 * (x > d1), shape),
            _reduce_to(dy * 2 * t3 * below2, shape),
            _reduce_to(-dy * 2 * t4 * above2, shape),
        ]
    )
    dx = dy * (1 - t1 * (x < b1) + t2 * (x > d1) - 2 * t3 * below2 + 2 * t4 * above2)
    daffine = None
    if affine is not None:
        daffine = torch.stack([_reduce_to(dx * s, affine.shape[1:]), _reduce_to(dx, affine.shape[1:])])
        dx = dx * (1 + affine[0])
    return dx, dtheta, daffine


def naive_multimax_attention(
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
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(sigma(scores)) @ V with masks applied after the modulator.

    Args:
        query (`torch.Tensor`): `[B, H, Q, D]`.
        key (`torch.Tensor`): `[B, Hkv, K, D]`, `H % Hkv == 0` (grouped-query attention).
        value (`torch.Tensor`): `[B, Hkv, K, Dv]`.
        theta (`torch.Tensor`): `[8, *S]` MultiMax scalars, `S` broadcastable to `[B, H, Q, K]`.
        scale (`float`, *optional*): score scale. Default: `D ** -0.5`.
        mask (`torch.Tensor`, *optional*): boolean, broadcastable to `[B, H, Q, K]`, True = attend.
        bias (`torch.Tensor`, *optional*): additive score bias (a position bias is part of the true
            score, so it is added before the modulator, after any soft-capping, as HF's eager path
            orders them), broadcastable to `[B, H, Q, K]`.
        is_causal (`bool`): mask keys after each query, aligned to the end (KV-cache decoding).
            Combined with `mask` when both are given. Default: `False`.
        softcap (`float`, *optional*): `softcap * tanh(s / softcap)` on the scores before sigma (Gemma 2).
        affine (`torch.Tensor`, *optional*): `[2, *S]`, see `naive_multimax_modulate`.
        dropout_p (`float`): dropout on the probabilities. Default: `0.0`.
        sink_logits (`torch.Tensor`, *optional*): `[H]` attention-sink logits (gpt-oss): each joins its head's
            softmax denominator as a key without a value, unmodulated (it is a learned logit, not a
            score). Default: `None`.

    Returns:
        `(out [B, H, Q, Dv] in value's dtype, probs [B, H, Q, K] in fp32 or wider)`. Rows with no key to
        attend give zero probabilities and zero output.
    """
    acc = torch.promote_types(query.dtype, torch.float32)
    theta = theta.to(acc)
    affine = None if affine is None else affine.to(acc)
    return naive_attention(
        query, key, value, score_mod=lambda scores: naive_multimax_modulate(scores, theta, affine), scale=scale,
        mask=mask, bias=bias, is_causal=is_causal, softcap=softcap, dropout_p=dropout_p, sink_logits=sink_logits,
    )
