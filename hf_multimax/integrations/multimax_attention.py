"""MultiMax as a transformers attention implementation: the HF-signature function."""

from __future__ import annotations

import functools
import logging

import torch

from ..layers.multimax import MultiMaxModulator, MultiMaxSettings
from ..ops.multimax import BACKENDS
from .attention_utils import attention_call, layer_outputs, prepare_inputs, settings_of

__all__ = ["multimax_attention_forward", "multimax_params"]

logger = logging.getLogger(__name__)


def multimax_params(module: torch.nn.Module, n_heads: int, settings: MultiMaxSettings | None = None):
    """`(theta, affine)` of the module's MultiMax layer as the settings in its config ask (read here
    unless the caller has them), with per-head scalars checked against the query's heads."""
    settings = settings or settings_of(module, MultiMaxSettings)
    theta, affine = layer_outputs(module, MultiMaxModulator, settings)
    if module.training and torch.is_grad_enabled() and not theta.requires_grad and not bool(theta.any()):
        _warn_frozen_at_identity()
    if theta.dim() == 2 and theta.shape[1] != n_heads:
        raise ValueError(
            f"{type(module).__name__} has per-head MultiMax scalars for {theta.shape[1]} heads "
            f"but the query has {n_heads} heads"
        )
    return theta, affine


@functools.cache
def _warn_frozen_at_identity() -> None:
    logger.warning(
        "The MultiMax scalars are frozen at identity while the model trains, so its attention stays softmax. With "
        "PEFT, train them beside the adapters with LoraConfig(..., modules_to_save=['multimax']); otherwise set "
        "requires_grad=True on them."
    )


def multimax_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers `AttentionInterface` function: query [B, H, Q, D], key/value [B, Hkv, K, D].

    Returns `(out [B, Q, H, Dv], probs [B, H, Q, K] or None)`.
    """
    if kwargs.get("s_aux") is not None:
        raise ValueError("multimax does not support attention sinks (s_aux) yet; use attn_implementation='eager'")
    settings = settings_of(module, MultiMaxSettings)
    theta, affine = multimax_params(module, query.shape[1], settings)
    if theta.dim() == 2:  # per head: [8, H] -> [8, H, 1, 1] against scores [B, H, Q, K]
        theta = theta[:, :, None, None]
        affine = None if affine is None else affine[:, :, None, None]

    key, value, mask, bias, is_causal = prepare_inputs(module, query, key, value, attention_mask, kwargs)
    dropout = dropout if module.training else 0.0
    call = attention_call(query, key, value, theta, affine, want_probs=bool(kwargs.get("output_attentions")),
                          dropout=dropout)
    backend = BACKENDS.resolve(settings.backend, call)
    out, probs = backend.kernel(
        query,
        key,
        value,
        theta,
        scale=scaling,
        mask=mask,
        bias=bias,
        is_causal=is_causal,
        softcap=kwargs.get("softcap"),
        affine=affine,
        dropout_p=dropout,
    )
    return out.transpose(1, 2).contiguous(), probs
