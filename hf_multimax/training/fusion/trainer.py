"""`Trainer` glue for the fusion model: encoders and fusion in separate optimizer groups, attribution
shares of the training batches in the logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import Trainer, TrainingArguments

__all__ = ["ENCODER_PREFIXES", "FusionTrainer", "FusionTrainingArguments", "split_encoder_group"]

# Per-modality encoders and projections; everything else (modality embeddings, CLS, fusion layers,
# classifier) is the "fusion" part that the attributions depend on.
ENCODER_PREFIXES = ("fusion.encoders.", "fusion.projections.")


@dataclass
class FusionTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the learning rate of the encoder group (every Trainer flag still works)."""

    encoder_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "Learning rate of encoders + projections = learning_rate * this (fusion and classifier "
                  "keep learning_rate). Frozen encoders (config.freeze_encoders) are not optimized at all."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.encoder_lr_multiplier <= 0:
            raise ValueError(f"encoder_lr_multiplier={self.encoder_lr_multiplier} must be > 0")


def split_encoder_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module, lr_multiplier: float) -> dict | None:
    """Move the trainable encoder/projection parameters into a group `"encoders"` with
    `lr = base_lr * lr_multiplier` (keeping each parameter's weight decay). Returns the new group or None."""
    ids = {id(p) for n, p in model.named_parameters() if n.startswith(ENCODER_PREFIXES) and p.requires_grad}
    moved, template = [], None
    for group in optimizer.param_groups:
        keep = [p for p in group["params"] if id(p) not in ids]
        if len(keep) != len(group["params"]):
            moved += [p for p in group["params"] if id(p) in ids]
            template = template or group
            group["params"] = keep
    optimizer.param_groups[:] = [g for g in optimizer.param_groups if g["params"]]
    if not moved:
        return None
    optimizer.add_param_group({**{k: v for k, v in template.items() if k != "params"}, "params": moved,
                               "lr": template["lr"] * lr_multiplier, "name": "encoders"})
    return optimizer.param_groups[-1]


class FusionTrainer(Trainer):
    """A `Trainer` for `MultimodalFusionForSequenceClassification`: encoder group (see
    `split_encoder_group`), and the mean attribution shares of the training batches since the last log
    as `attribution_share/<modality>` (when the model computes them, i.e. with the regularizer on)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._share_sums, self._share_batches = None, 0

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        split_encoder_group(optimizer, self.model if model is None else model,
                            getattr(self.args, "encoder_lr_multiplier", 1.0))
        return optimizer

    def floating_point_ops(self, inputs) -> int:
        # Trainer's estimate (6 * tokens * parameters) with the tokens of every modality counted.
        tokens = 0
        for value in inputs.get("modality_inputs", {}).values():
            if isinstance(value, dict):
                value = next(iter(value.values()))
                tokens += value.numel()
            else:
                tokens += value.shape[:-1].numel()
        return 6 * tokens * self.model.num_parameters(exclude_embeddings=True)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        shares = outputs.get("attribution_shares") if isinstance(outputs, dict) else None
        if shares is not None and model.training:
            mean = shares.detach().float().mean(0)
            self._share_sums = mean if self._share_sums is None else self._share_sums + mean
            self._share_batches += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict, *args, **kwargs):
        if self._share_batches and "loss" in logs:
            names = self.model.config.modality_names
            for name, value in zip(names, (self._share_sums / self._share_batches).tolist()):
                logs[f"attribution_share/{name}"] = value
            self._share_sums, self._share_batches = None, 0
        super().log(logs, *args, **kwargs)
