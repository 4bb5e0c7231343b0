"""Trainer glue: optimizer groups for the MultiMax scalars, logging callback, fine-tuning tasks."""

from .callbacks import MultiMaxLoggingCallback, attention_sharpness, multimax_scalars
from .optim import is_multimax_parameter, separate_multimax_group
from .trainer import MultiMaxTrainer, MultiMaxTrainingArguments

__all__ = [
    "MultiMaxLoggingCallback",
    "MultiMaxTrainer",
    "MultiMaxTrainingArguments",
    "attention_sharpness",
    "is_multimax_parameter",
    "multimax_scalars",
    "separate_multimax_group",
]
