"""`TrainerCallback`s that log the MultiMax scalars and how sharp attention is."""

from __future__ import annotations

import math

import torch
from transformers import TrainerCallback

from ..analysis.metrics import (
    entropy,
    multimodality,
    relative_log_scores,
    selection_margin,
    sparsity,
    top_k_mass,
)
from ..layers.multimax import MultiMaxModulator

__all__ = ["MultiMaxLoggingCallback", "attention_sharpness", "multimax_scalars"]

SM_EPS, SM_REF_PROB = math.log(0.05), 0.01  # S/M threshold on log p - log p_max, and S's reference probability


def multimax_scalars(model: torch.nn.Module) -> dict[str, float]:
    """`{"multimax/<module path>/<name>": value}`; per-head scalars are averaged over heads."""
    out = {}
    for path, module in model.named_modules():
        if isinstance(module, MultiMaxModulator):
            prefix = path.removesuffix(".multimax")
            for name, p in module.named_parameters(recurse=False):
                out[f"multimax/{prefix}/{name}"] = p.detach().float().mean().item()
    return out


@torch.no_grad()
def attention_sharpness(model: torch.nn.Module, inputs: dict) -> dict[str, float]:
    """Per layer, over the probe batch's real query rows: mean normalised entropy of the attention
    rows (1 = uniform, 0 = one-hot), mean top probability and mean selection margin (log-gap between
    the two most attended keys). Uses `output_attentions=True`, which returns MultiMax's
    probabilities after modulation."""
    was_training = model.training
    model.eval()
    try:
        attentions = model(**inputs, output_attentions=True).attentions
    finally:
        model.train(was_training)
    stats = {}
    for i, probs in enumerate(attentions or ()):
        probs = probs.float()
        rows = probs.sum(-1) > 0  # fully padded query rows carry no attention
        margin = selection_margin(probs)[rows]
        stats[f"attention/entropy/layer_{i}"] = entropy(probs)[rows].mean().item()
        stats[f"attention/max_prob/layer_{i}"] = top_k_mass(probs, 1)[rows].mean().item()
        stats[f"attention/selection_margin/layer_{i}"] = margin[torch.isfinite(margin)].mean().item()
        # The MultiMax paper's S and M on x = log p - log p_max (the normaliser's input up to a row shift).
        x = relative_log_scores(probs)
        stats[f"attention/sparsity_S/layer_{i}"] = sparsity(x, probs, eps=SM_EPS, s=SM_REF_PROB)[rows].mean().item()
        stats[f"attention/multimodality_M/layer_{i}"] = multimodality(x, probs, eps=SM_EPS)[rows].mean().item()
    return stats


class MultiMaxLoggingCallback(TrainerCallback):
    """Adds the MultiMax scalars and, given a probe batch, attention sharpness per layer to every
    log entry (and to `trainer_state.json`'s log history).

    Args:
        probe_inputs (`dict`, *optional*): model inputs of a small fixed batch for the sharpness
            statistics. Default: `None` (scalars only).
    """

    def __init__(self, probe_inputs: dict | None = None):
        self.probe_inputs = probe_inputs

    def on_log(self, args, state, control, model=None, logs=None, **kwargs):
        if model is None or logs is None or "loss" not in logs:
            return
        extra = multimax_scalars(model)
        if self.probe_inputs is not None:
            device = next(model.parameters()).device
            probe = {k: v.to(device) if hasattr(v, "to") else v for k, v in self.probe_inputs.items()}
            extra.update(attention_sharpness(model, probe))
        extra = {k: v for k, v in extra.items() if math.isfinite(v)}
        logs.update(extra)
        # Trainer appended its copy of the entry before calling back: keep the history complete.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(extra)
