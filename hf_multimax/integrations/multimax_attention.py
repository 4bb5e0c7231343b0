"""MultiMax as a transformers attention implementation: the HF-signature function and its mask."""

from __future__ import annotations

import torch
from transformers.masking_utils import sdpa_mask

from ..layers.multimax import MultiMaxModulator
from ..ops.multimax import BACKENDS

__all__ = ["multimax_attention_forward", "multimax_mask", "resolve_backend", "split_float_mask"]


def multimax_mask(*args, **kwargs):
    """Boolean 4-D mask (True = attend), always materialised for causal models.

    `sdpa_mask` returns None for unpadded causal input and leaves causality to SDPA's `is_causal`;
    we ask for the explicit mask instead so every kernel sees the same thing.
    """
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def split_float_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An additive float mask -> (boolean keep mask, finite bias or None).

    Masked entries (-inf or near finfo.min) become False; any finite non-zero values (a position
    bias some models fold into the mask) come back as a bias to add before the modulator.
    """
    keep = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return keep, (bias if bool(bias.any()) else None)


def resolve_backend(name: str, query: torch.Tensor) -> str:
    """`auto` -> the fastest backend that supports this device, dtype and need for gradients."""
    if name != "auto":
        return name
    return "eager"  # the only backend so far; the fast ones extend this table (issue: fast backends)


def _modulator(module: torch.nn.Module) -> MultiMaxModulator:
    modulator = getattr(module, "multimax", None)
    if not isinstance(modulator, MultiMaxModulator):
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation='multimax' but has no MultiMax scalars. "
            "Build the model with from_pretrained/from_config(attn_implementation='multimax') or call "
            "model.set_attn_implementation('multimax') after `import hf_multimax`."
        )
    return modulator


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
    modulator = _modulator(module)
    if kwargs.get("s_aux") is not None:
        raise ValueError("multimax does not support attention sinks (s_aux) yet; use attn_implementation='eager'")

    theta = modulator.theta()
    affine = modulator.affine_params()
    if modulator.num_heads is not None:
        if modulator.num_heads != query.shape[1]:
            raise ValueError(
                f"{type(module).__name__} has per-head MultiMax scalars for {modulator.num_heads} heads "
                f"but the query has {query.shape[1]} heads"
            )
        theta = theta[:, :, None, None]  # [8, H, 1, 1] against scores [B, H, Q, K]
        affine = None if affine is None else affine[:, :, None, None]

    mask, bias = attention_mask, None
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype != torch.bool:
            mask, bias = split_float_mask(mask)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", False)
    # HF hands over a mask that already encodes causality (and windows); only without one does the
    # module's own causality apply.
    is_causal = bool(is_causal) and mask is None

    kernel = BACKENDS[resolve_backend(modulator.backend, query)]
    out, probs = kernel(
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
        dropout_p=dropout if module.training else 0.0,
    )
    return out.transpose(1, 2).contiguous(), probs
