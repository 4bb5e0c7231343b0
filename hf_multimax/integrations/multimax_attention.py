"""MultiMax as a transformers attention implementation: the HF-signature function."""

from __future__ import annotations

import functools
import logging
import os

import torch

from ..layers.multimax import MultiMaxModulator, MultiMaxSettings
from ..ops.backends import DISABLE_ENV
from ..ops.multimax import BACKENDS
from .attention_utils import (PLANS, attention_call, fold_selection, layer_outputs, prepare_inputs, refuse_unsupported,
                              score_bias_kwargs, settings_of)

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
    refuse_unsupported(kwargs, "multimax", computes=("s_aux",))
    # A sparse-attention indexer's selection (DeepSeek-V3.2's `indices`, MiniMax-M3's `block_indices`) joins
    # the mask, as the model's eager/SDPA branch folds it; the call then has a mask (no decoding plan).
    attention_mask, kwargs = fold_selection(module, query, key, attention_mask, kwargs)
    # gpt-oss's attention sinks: one logit per head in the softmax denominator (unmodulated: a learned
    # logit, not a score), as its eager function does.
    sink_logits = kwargs.get("s_aux")
    # transformers records attentions asked for by the forward's kwarg or by config.output_attentions
    # (which reaches the attention function only through the config).
    want_probs = bool(kwargs.get("output_attentions") or getattr(module.config, "output_attentions", False))
    # The prepared decoding kernel takes no bias and no sinks: such calls take the full path.
    decoding = (not torch.compiler.is_compiling() and attention_mask is None and not torch.is_grad_enabled()
                and not module.training and not want_probs and query.device.type == "cpu"
                and not score_bias_kwargs(kwargs) and sink_logits is None)
    settings = settings_of(module, MultiMaxSettings)
    plan_state = _plan_state(module, settings, kwargs.get("softcap")) if decoding else None
    run = None if plan_state is None else PLANS.get(module, "decoding", plan_state)
    if run is not None:
        if query.shape[2] == 1:  # one new token sees every cached key, causal or not
            is_causal = False
        else:
            key, value, _, _, is_causal = prepare_inputs(module, query, key, value, None, kwargs)
        scale = query.shape[-1] ** -0.5 if scaling is None else scaling
        return run(query, key, value, scale, is_causal).transpose(1, 2).contiguous(), None
    theta, affine = multimax_params(module, query.shape[1], settings)
    if theta.dim() == 2:  # per head: [8, H] -> [8, H, 1, 1] against scores [B, H, Q, K]
        theta = theta[:, :, None, None]
        affine = None if affine is None else affine[:, :, None, None]

    key, value, mask, bias, is_causal = prepare_inputs(module, query, key, value, attention_mask, kwargs)
    dropout = dropout if module.training else 0.0
    call = attention_call(query, key, value, theta, affine, want_probs=want_probs,
                          dropout=dropout, sink_logits=sink_logits)
    backend = _resolve_backend(settings.backend, call, bias)
    if plan_state is not None and backend.prepare_inference is not None:
        _plan_decoding(module, plan_state, settings, call, kwargs.get("softcap"))
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
        **({} if sink_logits is None else {"sink_logits": sink_logits}),
    )
    return out.transpose(1, 2).contiguous(), probs


# The backends whose kernels differentiate the additive score bias. The others take it as a constant
# (chunked, fused and triton return no gradient for it), which would leave a learned position bias
# (T5's relative_attention_bias) untrained without a word.
# TODO(issue 27): an AttentionCall field for it in ops/backends.py, so each backend declares it there.
_BIAS_GRAD_BACKENDS = ("eager",)


def _resolve_backend(requested: str, call, bias: torch.Tensor | None):
    """`BACKENDS.resolve`, except that a call whose bias needs a gradient runs on a backend that gives it."""
    if bias is None or not (torch.is_grad_enabled() and bias.requires_grad):
        return BACKENDS.resolve(requested, call)
    if requested == "auto":
        return BACKENDS.resolve(_BIAS_GRAD_BACKENDS[0], call)
    if requested not in _BIAS_GRAD_BACKENDS:
        raise ValueError(
            f"multimax backend={requested!r} cannot train the additive score bias this call carries (e.g. T5's "
            f"position_bias): its kernel returns no gradient for it. Use backend 'auto' (it picks one that does) or "
            f"one of {_BIAS_GRAD_BACKENDS}, or freeze the bias's parameters"
        )
    return BACKENDS.resolve(requested, call)


def _plan_state(module, settings, softcap) -> tuple | None:
    """What MultiMax's decoding plan depends on (`PLANS`' rule): the settings, the MultiMax layer and
    its parameters, softcap and the backend opt-out variable; None for a wrapped layer (PEFT, FSDP,
    ZeRO-3 supply their parameters at call time)."""
    layer = module._modules.get(MultiMaxModulator.attr)
    if type(layer) is not MultiMaxModulator or layer._forward_hooks or layer._forward_pre_hooks:
        return None
    return PLANS.state_of(layer, settings, softcap, os.environ.get(DISABLE_ENV, ""))


def _plan_decoding(module, state: tuple, settings, call, softcap) -> None:
    """Decoding calls the attention of every layer once per token: while `state` holds, the next
    unmasked no-gradient call runs the backend's prepared kernel directly. Any other call (masks,
    gradients, training, probabilities) takes the full path."""
    backend = BACKENDS.resolve_for_any_length(settings.backend, call)
    if backend is None or backend.prepare_inference is None:
        return
    layer = state[0]
    PLANS.put(module, "decoding", state, backend.prepare_inference(layer.theta().detach(), layer.affine_params(), softcap))
