"""The fusion benchmark: joint training, RollingQ and attribution regularization compared on the
synthetic imbalance task and digits as two views (`data.py`), one run of the recipe (`recipe.py`),
the imbalance report of a trained model (`report.py`), methods x seeds x tasks with the targets
(`compare.py`) and the training-trace charts (`plots.py`). The Trainer glue they use is the
library's `hf_multimax.training.fusion`."""

from .data import (
    TASKS,
    FusionCollator,
    ModalityWarmupCallback,
    digits_two_view_dataset,
    load_fusion_task,
    synthetic_imbalance_dataset,
)
from .recipe import METHODS, FusionArguments, build_fusion_model, run_fusion
from .report import fusion_report, linear_probe_accuracy

__all__ = [
    "METHODS",
    "TASKS",
    "FusionArguments",
    "FusionCollator",
    "ModalityWarmupCallback",
    "build_fusion_model",
    "digits_two_view_dataset",
    "fusion_report",
    "linear_probe_accuracy",
    "load_fusion_task",
    "run_fusion",
    "synthetic_imbalance_dataset",
]
