"""Optimizer groups for the MultiMax scalars: no weight decay, their own learning rate."""

from __future__ import annotations

import logging

import torch

__all__ = ["MULTIMAX_KEY", "is_multimax_parameter", "separate_multimax_group"]

logger = logging.getLogger(__name__)

MULTIMAX_KEY = ".multimax."


def is_multimax_parameter(name: str) -> bool:
    return MULTIMAX_KEY in f".{name}"


def separate_multimax_group(
    optimizer: torch.optim.Optimizer, model: torch.nn.Module, lr_multiplier: float
) -> dict | None:
    """Move the MultiMax scalars out of `optimizer`'s groups into one group of their own with
    `lr = base_lr * lr_multiplier` and no weight decay. Call it before the LR scheduler is built, so
    the scheduler scales this group like the others. Returns the new group (None if the model has
    no MultiMax scalars).

    The paper's advice: decay would pull the scalars back to softmax, and at an LM head their
    gradients grow like sqrt(vocab), so they want their own step size.
    """
    if lr_multiplier <= 0:
        raise ValueError(f"multimax_lr_multiplier={lr_multiplier} must be > 0")
    if not hasattr(optimizer, "param_groups"):  # a DeepSpeed config's own optimizer (accelerate's DummyOptim)
        logger.warning(
            "The optimizer comes from the DeepSpeed config, so the MultiMax scalars share its learning rate and weight "
            "decay; drop `optimizer` from the DeepSpeed config to give them their own group."
        )
        return None
    existing = next((g for g in optimizer.param_groups if g.get("name") == "multimax"), None)
    if existing is not None:  # Trainer calls create_optimizer again under DeepSpeed: never multiply twice
        return existing
    ids = {id(p) for n, p in model.named_parameters() if is_multimax_parameter(n) and p.requires_grad}
    if not ids:
        return None
    moved, base_lr = [], None
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) not in ids]
        if len(keep) != len(group["params"]):
            moved += [p for p in group["params"] if id(p) in ids]
            base_lr = group["lr"] if base_lr is None else base_lr
            group["params"] = keep
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not moved:
        return None
    optimizer.add_param_group({"params": moved, "lr": base_lr * lr_multiplier, "weight_decay": 0.0,
                               "name": "multimax"})
    return optimizer.param_groups[-1]
