"""Attach SparseMix scorers to HF models whose config asks for SparseMix, and add the scorers' KL
term to the model's loss.

Called from the same `PreTrainedModel` hooks as MultiMax (`model_hooks`). The KL term reaches the
loss through a forward hook on the model: when a training forward returns a `loss` (labels were
given), `kl_weight * mean over layers of KL` is added to it and reported as `outputs.sparsemix_kl`.
Without labels, `sparsemix_kl_loss(model)` returns the term to add yourself.
"""

from __future__ import annotations

import logging

import torch
from transformers import PreTrainedModel

from ..layers.sparsemix import SparseMixScorer, SparseMixSettings

logger = logging.getLogger(__name__)

__all__ = [
    "SPARSEMIX_NAME",
    "freeze_all_but_scorers",
    "is_sparsemix_name",
    "sparsemix_kl_loss",
    "sparsemix_settings",
    "sync_sparsemix",
]

SPARSEMIX_NAME = "sparsemix"


def is_sparsemix_name(name) -> bool:
    return SparseMixSettings.is_own_name(name)


def sparsemix_settings(config, fallback=None) -> SparseMixSettings:
    """`config.sparsemix` validated (see `ConfigSettings.from_config`)."""
    return SparseMixSettings.from_config(config, fallback)


def _kv_heads_and_dim(module: torch.nn.Module, config) -> tuple[int, int]:
    heads = next((getattr(module, a) for a in ("num_heads", "num_attention_heads", "n_heads")
                  if isinstance(getattr(module, a, None), int)), None) or config.num_attention_heads
    groups = getattr(module, "num_key_value_groups", 1)
    kv_heads = getattr(config, "num_key_value_heads", None) or heads // groups
    head_dim = next((getattr(module, a) for a in ("head_dim", "attention_head_size")
                     if isinstance(getattr(module, a, None), int)), None)
    if head_dim is None:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return kv_heads, head_dim


def _is_untrained(scorer: SparseMixScorer) -> bool:
    return scorer.w_key.is_meta or not bool(scorer.w_key.detach().any())


def sync_sparsemix(model: PreTrainedModel, attention_modules) -> None:
    """Give every attention module whose config asks for SparseMix a scorer, remove scorers where it
    no longer does, persist the settings in the config and install the KL loss hook. Idempotent.

    Args:
        attention_modules: `(name, module, config)` for every module calling the AttentionInterface.
    """
    found = False
    for name, module, config in attention_modules:
        existing = getattr(module, "sparsemix", None)
        if not is_sparsemix_name(config._attn_implementation):
            if isinstance(existing, SparseMixScorer):
                if not _is_untrained(existing):
                    logger.warning("Removing the trained SparseMix scorer of %s: the new attention does not use it.", name)
                del module.sparsemix
            continue
        found = True
        settings = sparsemix_settings(config, fallback=model.config)
        kv_heads, head_dim = _kv_heads_and_dim(module, config)
        if isinstance(existing, SparseMixScorer):
            if (existing.num_kv_heads, existing.head_dim, existing.rank) == (kv_heads, head_dim, settings.scorer_rank):
                existing.settings = settings
                continue
            if not _is_untrained(existing):
                raise ValueError(
                    f"{name} holds a trained SparseMix scorer of rank {existing.rank} that does not fit the settings "
                    f"{settings.to_dict()}; switch with set_attn_implementation('sdpa') first to drop it"
                )
        ref = next(module.parameters(), None)
        scorer = SparseMixScorer(kv_heads, head_dim, settings.scorer_rank, settings)
        if ref is not None:
            scorer = scorer.to(ref.device)  # meta while from_pretrained builds; initialised with the weights
        module.sparsemix = scorer

    config = model.config
    if not found:
        if is_sparsemix_name(config.__dict__.get("attn_implementation")):
            delattr(config, "attn_implementation")
        return
    config.sparsemix = sparsemix_settings(config).to_dict()
    if is_sparsemix_name(config._attn_implementation):
        # Persisted so a reload needs no flags and a load without the plugin fails loudly.
        config.attn_implementation = SPARSEMIX_NAME
    if isinstance(getattr(model, "_keys_to_ignore_on_load_missing", None), set):
        model._keys_to_ignore_on_load_missing.add(r"\.sparsemix\.")
    if getattr(model, "_sparsemix_kl_hook", None) is None:
        model._sparsemix_kl_hook = model.register_forward_hook(_add_kl_to_loss)


def _scorers(model: torch.nn.Module):
    return [m for m in model.modules() if isinstance(m, SparseMixScorer)]


def sparsemix_kl_loss(model: torch.nn.Module, clear: bool = True) -> torch.Tensor | None:
    """`kl_weight * mean KL` over the layers of the last training forward, or None if no layer
    computed one (eval mode, short inputs, kl_weight 0). `clear` forgets the stored terms."""
    scorers = [s for s in _scorers(model) if s.kl is not None]
    if not scorers:
        return None
    loss = torch.stack([s.kl * s.settings.kl_weight for s in scorers]).mean()
    if clear:
        for s in scorers:
            s.kl = None
    return loss


def _add_kl_to_loss(model, args, output):
    loss = getattr(output, "loss", None) if not isinstance(output, tuple) else None
    if not model.training or loss is None:
        return output
    kl = sparsemix_kl_loss(model)
    if kl is not None:
        output["loss"] = loss + kl.to(loss.dtype)
        output["sparsemix_kl"] = model._sparsemix_last_kl = kl.detach()
    return output


def freeze_all_but_scorers(model: torch.nn.Module) -> int:
    """Dense warm-up: train the SparseMix scorers only (with `sparsemix.dense_warmup=True` the model
    stays exactly dense while they learn). Returns the number of trainable parameters left."""
    count = 0
    for module in model.modules():
        for param in module.parameters(recurse=False):
            param.requires_grad_(isinstance(module, SparseMixScorer))
            count += param.numel() if isinstance(module, SparseMixScorer) else 0
    if count == 0:
        raise ValueError("the model has no SparseMix scorers: build it with attn_implementation='sparsemix'")
    return count
