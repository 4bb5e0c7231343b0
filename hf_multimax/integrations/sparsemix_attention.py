"""SparseMix as a transformers attention implementation: the HF-signature function.

Per call: short inputs (every block would be kept) and `dense_warmup` run the dense path, which is
transformers' SDPA function (softmax) or our MultiMax function, so the converted model computes
exactly what the dense one does. Longer inputs: the scorer picks blocks, the chosen backend runs
exact attention over them. In training the layer's KL term is left on `module.sparsemix.kl` for
the model-level hook (`sparsemix_hooks`) to add to the loss.
"""

from __future__ import annotations

import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from ..layers.multimax import MultiMaxModulator
from ..layers.sparsemix import SparseMixScorer
from ..ops.multimax import naive_multimax_modulate
from ..ops.sparsemix import (
    BACKENDS,
    block_geometry,
    sample_query_blocks,
    scorer_block_scores,
    scorer_kl,
    select_blocks,
)
from .multimax_attention import multimax_attention_forward, prepare_mask

__all__ = ["resolve_sparsemix_backend", "sparsemix_attention_forward"]


def resolve_sparsemix_backend(requested: str, query: torch.Tensor) -> str:
    """`auto`: flex on CUDA (forward and backward there), `blocked` elsewhere (on this CPU it beat
    compiled flex's forward and is the only fast path with a backward). Explicit names pass through."""
    if requested != "auto":
        return requested
    return "flex" if query.device.type == "cuda" else "blocked"


def _scorer(module: torch.nn.Module) -> SparseMixScorer:
    scorer = getattr(module, "sparsemix", None)
    if not isinstance(scorer, SparseMixScorer):
        raise RuntimeError(
            f"{type(module).__name__} runs with attn_implementation='sparsemix' but has no SparseMix scorer. "
            "Build the model with from_pretrained/from_config(attn_implementation='sparsemix') or call "
            "model.set_attn_implementation('sparsemix') after `import hf_multimax`."
        )
    return scorer


def _multimax_inputs(module, n_heads: int):
    """(theta, affine, score_mod) of the MultiMax normalizer, shaped for the sparse kernels."""
    modulator = getattr(module, "multimax", None)
    if not isinstance(modulator, MultiMaxModulator):
        raise RuntimeError(f"{type(module).__name__} has sparsemix.normalizer='multimax' but no MultiMax scalars")
    theta, affine = modulator.theta(), modulator.affine_params()
    if modulator.num_heads is not None and modulator.num_heads != n_heads:
        raise ValueError(f"per-head MultiMax scalars for {modulator.num_heads} heads, the query has {n_heads}")
    shape = (1, 1) if modulator.num_heads is not None else ()
    th = theta.detach().reshape(*theta.shape, *shape)
    af = None if affine is None else affine.detach().reshape(*affine.shape, *shape)
    return theta, affine, lambda s: naive_multimax_modulate(s, th.to(s.dtype), None if af is None else af.to(s.dtype))


def sparsemix_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """transformers `AttentionInterface` function: query `[B, H, Q, D]`, key/value `[B, Hkv, K, D]`.

    Returns `(out [B, Q, H, Dv], None)` (probabilities only from the dense MultiMax path).
    """
    scorer = _scorer(module)
    settings = scorer.settings
    if kwargs.get("s_aux") is not None:
        raise ValueError("sparsemix does not support attention sinks (s_aux) yet; use attn_implementation='eager'")
    causal = bool(kwargs.get("is_causal", getattr(module, "is_causal", True)))
    geometry = block_geometry(query.shape[-2], key.shape[-2], settings.block_size, causal)
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    sparse = geometry.n_k_blocks > settings.kept_blocks and not settings.dense_warmup
    mask, bias, _ = prepare_mask(module, attention_mask, key, kwargs)
    multimax = settings.normalizer == "multimax"
    theta, affine, score_mod = _multimax_inputs(module, query.shape[1]) if multimax else (None, None, None)

    if module.training and (settings.kl_weight > 0 or settings.dense_warmup) and geometry.n_k_blocks > settings.kept_blocks:
        blocks = sample_query_blocks(geometry, settings.kl_query_blocks, sink=settings.sink, local=settings.local,
                                     device=query.device)
        # Only the sampled blocks need the scorer's graph.
        sampled = scorer_block_scores(query.detach(), key.detach(), scorer.w_query, scorer.w_key, geometry, scaling,
                                      q_blocks=blocks)
        scorer.kl = scorer_kl(sampled, query, key, geometry, blocks, scale=scaling, sink=settings.sink,
                              local=settings.local, mask=mask, score_mod=score_mod,
                              target_power=settings.kl_target_power)
    if sparse:
        with torch.no_grad():
            scores = scorer_block_scores(query, key, scorer.w_query, scorer.w_key, geometry, scaling)

    if not sparse:
        dense = multimax_attention_forward if multimax else sdpa_attention_forward
        return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)

    if bias is not None:
        raise ValueError("sparsemix does not support additive position biases in the attention mask; use 'multimax' or 'sdpa'")
    if kwargs.get("softcap") is not None:
        raise ValueError("sparsemix does not support attention soft-capping (Gemma 2); use 'multimax' or 'eager'")
    if kwargs.get("output_attentions"):
        raise ValueError("output_attentions=True needs dense probabilities, which sparsemix never materialises on long inputs")
    if module.training and dropout > 0.0:
        raise ValueError(
            f"sparsemix does not apply attention dropout on the sparse path (got dropout={dropout}); set the model's "
            "attention dropout to 0 for training on long inputs"
        )
    block_idx, block_valid = select_blocks(scores, geometry, top_k=settings.top_k, sink=settings.sink, local=settings.local)
    backend = resolve_sparsemix_backend(settings.backend, query)
    out, _ = BACKENDS[backend](
        query, key, value, block_idx, block_valid, block_size=settings.block_size, scale=scaling, mask=mask,
        is_causal=causal, theta=theta, affine=affine,
    )
    return out.transpose(1, 2).contiguous(), None
