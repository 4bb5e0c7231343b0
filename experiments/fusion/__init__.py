"""The fusion benchmark: joint training, OGM-GE, RollingQ, attribution regularization, both together
and the unimodal ensemble, on the constructed complementary task, the synthetic imbalance task and
digits as two views (`data.py`); one run of the recipe (`recipe.py`); the imbalance report of a
trained model (`report.py`); the study, methods x seeds x tasks with intervals and paired tests
(`compare.py`); its charts (`plots.py`). The Trainer glue they use is the library's
`hf_multimax.training.fusion`."""

from .data import (
    TASKS,
    complementary_bayes_accuracy,
    complementary_dataset,
    split_validation,
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
    "complementary_bayes_accuracy",
    "complementary_dataset",
    "digits_two_view_dataset",
    "fusion_report",
    "linear_probe_accuracy",
    "load_fusion_task",
    "run_fusion",
    "split_validation",
    "synthetic_imbalance_dataset",
]
