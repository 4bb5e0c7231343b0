"""MultiMax as a transformers attention implementation: the HF-signature function and its mask."""

from __future__ import annotations

import torch
from transformers.masking_utils import sdpa_mask

from ..layers.multimax import MultiMaxModulator
from ..ops.multimax import BACKENDS

__all__ = [
    "multimax_attention_forward",
    "multimax_mask",
    "prepare_mask",
    "resolve_backend",
    "split_float_mask",
]


def multimax_mask(*args, **kwargs):
    """Boolean 4-D mask (True = attend), or None where SDPA would get None too.

    Like `sdpa_mask`: unpadded causal input gets None and the attention function applies the
    module's causality itself, which lets the fast kernels skip future key blocks.
    """
    return sdpa_mask(*args, **kwargs)


def split_float_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """An additive float mask -> (boolean keep mask, finite bias or None).

    Masked entries (-inf or near finfo.min) become False; any finite non-zero values (a position
    bias some models fold into the mask) come back as a bias to add before the modulator.
    """
    keep = mask > torch.finfo(mask.dtype).min / 2
    bias = torch.where(keep, mask, torch.zeros((), dtype=mask.dtype, device=mask.device))
    return keep, (bias if bool(bias.any()) else None)


# Below this many scores per (batch, head), materialising them is cheap and the eager kernel wins
# (and needs no compilation); measured crossover on a 2-core CPU in scripts/bench_attention.py.
AUTO_MIN_SCORES = 512 * 512


def prepare_mask(module, attention_mask, key, kwargs) -> tuple[torch.Tensor | None, torch.Tensor | None, bool]:
    """HF's mask -> (boolean keep mask or None, additive bias or None, is_causal)."""
    mask, bias = attention_mask, None
    if mask is not None:
        mask = mask[:, :, :, : key.shape[-2]]
        if mask.dtype != torch.bool:
            mask, bias = split_float_mask(mask)
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)  # as transformers' SDPA path
    # HF hands over a mask that already encodes causality (and windows); only without one does the
    # module's own causality apply.
    return mask, bias, bool(is_causal) and mask is None


def resolve_backend(requested: str, query: torch.Tensor, key: torch.Tensor, *, dropout: float, want_probs: bool) -> str:
    """The backend that runs this call. `auto`, in order:

    | condition | backend |
    |---|---|
    | `output_attentions=True` or attention dropout > 0 | eager (the only one returning probabilities / doing dropout) |
    | CUDA device | flex (forward and backward) |
    | fewer than `AUTO_MIN_SCORES` scores per head | eager |
    | otherwise (CPU, training or inference) | chunked |

    An explicit backend is used as asked; one that cannot serve the call raises `ValueError`.
    """
    if requested != "auto":
        if want_probs and requested != "eager":
            raise ValueError(
                f"output_attentions=True needs the attention probabilities, which multimax backend={requested!r} "
                "does not materialise; use backend 'eager' or 'auto'"
            )
        return requested
    if want_probs or dropout > 0.0:
        return "eager"
    if query.device.type == "cuda":
        return "flex"
    if query.shape[-2] * key.shape[-2] < AUTO_MIN_SCORES:
        return "eager"
    return "chunked"


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

    mask, bias, is_causal = prepare_mask(module, attention_mask, key, kwargs)

    dropout = dropout if module.training else 0.0
    backend = resolve_backend(modulator.backend, query, key, dropout=dropout, want_probs=bool(kwargs.get("output_attentions")))
    out, probs = BACKENDS[backend](
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
