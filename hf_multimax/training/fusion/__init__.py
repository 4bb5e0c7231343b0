"""`Trainer` glue for the multimodal fusion model (`hf_multimax.modeling.multimodal_fusion`): the
encoder optimizer group and attribution-share logging (`FusionTrainer`), RollingQ's epoch-end
rotation and per-epoch imbalance monitoring (callbacks)."""

from .callbacks import FusionMonitorCallback, RollingQCallback, imbalance_snapshot, rollingq_statistics
from .trainer import FusionTrainer, FusionTrainingArguments, split_encoder_group

__all__ = [
    "FusionMonitorCallback",
    "FusionTrainer",
    "FusionTrainingArguments",
    "RollingQCallback",
    "imbalance_snapshot",
    "rollingq_statistics",
    "split_encoder_group",
]
