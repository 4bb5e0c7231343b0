"""sparsemax and 1.5-entmax as transformers attention implementations (baselines for MultiMax)."""

from __future__ import annotations

import torch

from ..ops.entmax import naive_entmax_attention
from .attention_utils import prepare_inputs, refuse_unsupported

__all__ = ["entmax_attention_forward"]


def entmax_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, *, normalizer,
                             **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers `AttentionInterface` function; `normalizer` is bound at registration."""
    refuse_unsupported(kwargs, normalizer)
    key, value, mask, bias, is_causal = prepare_inputs(module, query, key, value, attention_mask, kwargs)
    out, probs = naive_entmax_attention(
        query, key, value, normalizer=normalizer, scale=scaling, mask=mask, bias=bias, is_causal=is_causal,
        softcap=kwargs.get("softcap"), dropout_p=dropout if module.training else 0.0,
    )
    return out.transpose(1, 2).contiguous(), probs
