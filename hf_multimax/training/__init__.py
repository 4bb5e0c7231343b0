"""Trainer glue for every method: `AttentionPluginTrainer` (optimizer groups for the MultiMax scalars,
auxiliary losses, the method's model card), logging callback, fine-tuning tasks."""

from .callbacks import MultiMaxLoggingCallback, attention_sharpness, multimax_scalars
from .optim import is_multimax_parameter, separate_multimax_group
from .trainer import (
    AttentionPluginTrainer,
    AttentionPluginTrainingArguments,
    MultiMaxTrainer,
    MultiMaxTrainingArguments,
)

__all__ = [
    "AttentionPluginTrainer",
    "AttentionPluginTrainingArguments",
    "MultiMaxLoggingCallback",
    "MultiMaxTrainer",
    "MultiMaxTrainingArguments",
    "attention_sharpness",
    "is_multimax_parameter",
    "multimax_scalars",
    "separate_multimax_group",
]
