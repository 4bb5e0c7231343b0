"""Attention metrics: tensors in, numbers out, batched over any leading dims.

`probs` are attention rows `[..., K]` (zeros on masked keys); `scores` the matching inputs of the
normaliser (for MultiMax: the scaled scores before the modulator).
"""

from __future__ import annotations

import torch

__all__ = [
    "attention_to_sink",
    "entropy",
    "multimodality",
    "relative_log_scores",
    "selection_margin",
    "sparsity",
    "top_k_mass",
]


def entropy(probs: torch.Tensor, normalized: bool = True) -> torch.Tensor:
    """Shannon entropy of each row `[...]`. With `normalized`, divided by the log of the number of
    keys the row gives weight to (masked keys have zero probability), so 1 = uniform over the
    attended keys and 0 = one-hot."""
    h = -(probs * probs.clamp_min(1e-30).log()).sum(-1)
    if not normalized:
        return h
    support = (probs > 0).sum(-1).clamp_min(2)
    return h / support.to(h.dtype).log()


def top_k_mass(probs: torch.Tensor, k: int = 1) -> torch.Tensor:
    """Probability mass on the `k` largest entries of each row `[...]`."""
    if not 1 <= k <= probs.shape[-1]:
        raise ValueError(f"k={k} must be between 1 and the row length {probs.shape[-1]}")
    return probs.topk(k, dim=-1).values.sum(-1)


def attention_to_sink(probs: torch.Tensor, sink: int = 0) -> torch.Tensor:
    """Probability each row puts on the sink key (the first token by default) `[...]`."""
    return probs[..., sink]


def selection_margin(probs: torch.Tensor) -> torch.Tensor:
    """How decisively each row picks its top key: log p_top1 - log p_top2 `[...]`, which equals the
    gap between the two largest normaliser inputs (modulated scores for MultiMax). +inf when only
    one key carries weight."""
    top = probs.topk(2, dim=-1).values
    return top[..., 0].log() - top[..., 1].log()


def multimodality(scores: torch.Tensor, probs: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """MultiMax paper Def. 3.3, per row `[...]`:
    M = 1 - (1/N) * sum over entries with eps < x_n < x_max of (p_max - p_n).
    High when the entries above `eps` keep probabilities close to the top one."""
    x_max = scores.amax(-1, keepdim=True)
    p_max = probs.amax(-1, keepdim=True)
    middle = (scores > eps) & (scores < x_max)
    return 1 - ((p_max - probs) * middle).sum(-1) / scores.shape[-1]


def sparsity(scores: torch.Tensor, probs: torch.Tensor, eps: float = 0.0, s: float = 0.01) -> torch.Tensor:
    """MultiMax paper Def. 3.2, per row `[...]`: S = (1/L) * sum over entries with x_l < eps of
    exp(-p_l / s), with a fixed reference probability `s` (a row-dependent one collapses S toward
    e^-1/L). High when the entries below `eps` get (near) zero probability."""
    if s <= 0:
        raise ValueError(f"s={s} must be > 0")
    below = scores < eps
    return (torch.exp(-probs / s) * below).sum(-1) / scores.shape[-1]


def relative_log_scores(probs: torch.Tensor) -> torch.Tensor:
    """x = log p - log p_max per row `[..., K]`: the normaliser's input up to a row shift (exact for
    softmax and MultiMax, whose outputs are softmax of the modulated scores). Zero-probability keys
    get -1e4. Lets S and M be computed from a model's attention probabilities alone."""
    log_p = probs.clamp_min(1e-45).log() - probs.amax(-1, keepdim=True).clamp_min(1e-45).log()
    return torch.where(probs > 0, log_p, torch.full_like(log_p, -1e4))
