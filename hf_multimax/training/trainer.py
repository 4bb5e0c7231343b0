"""`Trainer` glue: MultiMax scalars in their own optimizer group."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import Trainer, TrainingArguments

from .optim import separate_multimax_group

__all__ = ["MultiMaxTrainer", "MultiMaxTrainingArguments"]


@dataclass
class MultiMaxTrainingArguments(TrainingArguments):
    """`TrainingArguments` plus the MultiMax optimizer settings (every Trainer flag still works)."""

    multimax_lr_multiplier: float = field(
        default=10.0,
        metadata={"help": "Learning rate of the MultiMax scalars = learning_rate * this. They get no weight decay."},
    )

    def __post_init__(self):
        super().__post_init__()
        if self.multimax_lr_multiplier <= 0:
            raise ValueError(f"multimax_lr_multiplier={self.multimax_lr_multiplier} must be > 0")


class MultiMaxTrainer(Trainer):
    """A `Trainer` whose optimizer gives the MultiMax scalars their own group: no weight decay and
    `learning_rate * multimax_lr_multiplier` (10 unless `args` says otherwise)."""

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        multiplier = getattr(self.args, "multimax_lr_multiplier", 10.0)
        separate_multimax_group(optimizer, self.model if model is None else model, multiplier)
        return optimizer
