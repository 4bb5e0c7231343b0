"""Training, data and evaluation for the multimodal fusion model (`hf_multimax.modeling.multimodal_fusion`)."""

from .callbacks import FusionMonitorCallback, ModalityWarmupCallback, RollingQCallback, rollingq_statistics
from .data import TASKS, FusionCollator, digits_two_view_dataset, load_fusion_task, synthetic_imbalance_dataset
from .recipe import METHODS, FusionArguments, build_fusion_model, run_fusion
from .report import fusion_report, linear_probe_accuracy
from .trainer import FusionTrainer, FusionTrainingArguments, split_encoder_group

__all__ = [
    "METHODS",
    "TASKS",
    "FusionArguments",
    "FusionCollator",
    "FusionMonitorCallback",
    "FusionTrainer",
    "FusionTrainingArguments",
    "ModalityWarmupCallback",
    "RollingQCallback",
    "build_fusion_model",
    "digits_two_view_dataset",
    "fusion_report",
    "linear_probe_accuracy",
    "load_fusion_task",
    "rollingq_statistics",
    "run_fusion",
    "split_encoder_group",
    "synthetic_imbalance_dataset",
]
