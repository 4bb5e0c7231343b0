"""MultiMax through `torch.nn.attention.flex_attention`: the modulator as a `score_mod`, masks as a
`BlockMask`. Forward and backward on GPU; forward only on CPU (torch has no CPU flex backward)."""

from __future__ import annotations

import functools

import torch

from ..naive_attention import check_qkv
from .naive import check_theta

__all__ = ["flex_inputs", "flex_is_available", "flex_multimax_attention"]


def flex_is_available() -> tuple[bool, str]:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError as err:  # pragma: no cover - torch < 2.5
        return False, f"torch.nn.attention.flex_attention is unavailable: {err}"
    return True, ""


def flex_inputs(*tensors: torch.Tensor | None, cpu_training_backend: str) -> tuple[torch.Tensor | None, ...]:
    """The tensors as flex can take them: detached when no gradient is needed (torch refuses CPU
    flex for inputs that require grad, even under no_grad); a ValueError naming the backend to use
    when gradients are needed on CPU, where torch has no flex backward."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if needs_grad and tensors[0].device.type == "cpu":
        raise ValueError(
            "the flex backend has no backward on CPU (torch implements FlexAttention's backward for GPU only); "
            f"use backend='{cpu_training_backend}' (or 'auto') to train on CPU"
        )
    return tensors if needs_grad else tuple(None if t is None else t.detach() for t in tensors)


@functools.cache
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Compiled once per process, on first use; flex is only fast compiled.
    return torch.compile(flex_attention, dynamic=False)


def _score_mod(theta, affine, bias, softcap):
    per_head = theta.dim() > 1

    def score_mod(score, b, h, q_idx, kv_idx):
        x = score
        if softcap is not None:
            x = softcap * torch.tanh(x / softcap)
        if bias is not None:
            x = x + bias[b, h, q_idx, kv_idx]
        if affine is not None:
            a, c = (affine[0][h], affine[1][h]) if per_head else (affine[0], affine[1])
            x = (1 + a) * x + c
        th = [theta[i][h] for i in range(8)] if per_head else [theta[i] for i in range(8)]
        t1, t2, t3, t4, b1, d1, b2, d2 = th
        return (
            x + t1 * torch.relu(b1 - x) + t2 * torch.relu(x - d1) + t3 * torch.relu(b2 - x) * torch.relu(b2 - x)
            + t4 * torch.relu(x - d2) * torch.relu(x - d2)
        )

    return score_mod


@functools.lru_cache(maxsize=32)
def _causal_block_mask(q_len, k_len, offset, device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(lambda b, h, q, kv: kv <= q + offset, 1, 1, q_len, k_len, device=device)


def _block_mask(keep, causal_offset, q_len, k_len, device):
    """A BlockMask over the broadcast dims the mask really has (batch/head of size 1 stay 1). Causal
    masks depend on shapes only and are cached; data-dependent masks are built per call."""
    from torch.nn.attention.flex_attention import create_block_mask

    if keep is None:
        return None if causal_offset is None else _causal_block_mask(q_len, k_len, causal_offset, device)

    one_batch, one_head = keep.shape[0] == 1, keep.shape[1] == 1

    def mask_mod(b, h, q_idx, kv_idx):
        # The kernel calls mask_mod with real batch/head indices even when the BlockMask broadcasts.
        allowed = keep[0 if one_batch else b, 0 if one_head else h, q_idx, kv_idx]
        if causal_offset is not None:
            allowed = allowed & (kv_idx <= q_idx + causal_offset)
        return allowed

    return create_block_mask(mask_mod, keep.shape[0], keep.shape[1], q_len, k_len, device=device)


def flex_multimax_attention(
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
    """Same contract as `naive_multimax_attention`; `theta` is `[8]` (shared) or `[8, H, 1, 1]` /
    `[8, H]` (per head). Returns `(out, None)`.

    Raises:
        ValueError: dropout requested, or gradients needed on CPU (flex has no CPU backward).
    """
    if dropout_p != 0.0:
        raise ValueError(f"the flex backend does not support attention dropout (got dropout_p={dropout_p}); use eager")
    if sink_logits is not None:
        raise ValueError("the flex backend has no attention sinks (s_aux) yet; use 'fused' (CPU), 'chunked' or 'eager'")
    check_qkv(query, key, value)
    check_theta(theta)
    query, key, value, theta, affine = flex_inputs(query, key, value, theta, affine, cpu_training_backend="chunked")
    B, H, Q, _ = query.shape
    K = key.shape[-2]
    theta = theta.reshape(8, -1) if theta.dim() > 1 else theta  # [8, H] per head
    if affine is not None and affine.dim() > 1:
        affine = affine.reshape(2, -1)
    if mask is not None:
        mask = mask.expand(*mask.shape[:2], Q, K)
    if bias is not None:
        bias = bias.expand(B, H, Q, K)
    block_mask = _block_mask(mask, K - Q if is_causal else None, Q, K, str(query.device))
    # Keys and values to the query's dtype family, fp32 scores: flex keeps scores in fp32 internally.
    out = _compiled_flex()(
        query, key, value, score_mod=_score_mod(theta.float(), None if affine is None else affine.float(), bias, softcap),
        block_mask=block_mask, scale=scale, enable_gqa=H != key.shape[1],
    )
    return out, None
