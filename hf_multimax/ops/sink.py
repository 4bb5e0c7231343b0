"""Attention sinks for kernels that normalise over the keys alone.

A sink (gpt-oss's `s_aux`) is one learned logit per query head that joins the softmax denominator as a
key with no value. A kernel that returns its rows' log-sum-exp `lse` over the keys gets the sink's
output without a change inside: out * sum(e^y) / (sum(e^y) + e^sink) = out * sigmoid(lse - sink).
Autograd reaches the sink through this product and the keys through `lse` (the kernels' backwards
take a gradient of `lse`). `naive_attention(..., sink_logits=)` is the reference.
"""

from __future__ import annotations

import torch

__all__ = ["check_sink", "fold_sink"]


def check_sink(sink_logits: torch.Tensor, n_heads: int) -> None:
    if sink_logits.shape != (n_heads,):
        raise ValueError(f"sink_logits must hold one logit per query head, shape ({n_heads},), got {tuple(sink_logits.shape)}")


def fold_sink(out: torch.Tensor, lse: torch.Tensor, sink_logits: torch.Tensor) -> torch.Tensor:
    """`out [B, H, Q, Dv]` normalised over the keys and their `lse [B, H, Q]` (+inf for a row that sees
    no key, whose output is zero) -> the output with the sink in the denominator, fp32."""
    return out.float() * torch.sigmoid(lse.float() - sink_logits.float().view(1, -1, 1)).unsqueeze(-1)
