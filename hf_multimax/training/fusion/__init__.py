"""`Trainer` glue for the multimodal fusion model (`hf_multimax.modeling.multimodal_fusion`): the
encoder optimizer group and attribution-share logging (`FusionTrainer`), RollingQ's epoch-end
rotation and per-epoch imbalance monitoring (callbacks), OGM-GE's gradient modulation (`ogm_ge`)."""

from .callbacks import FusionMonitorCallback, RollingQCallback, imbalance_snapshot, rollingq_statistics
from .ogm_ge import OGMGECallback, modality_scores, modulate_gradients, ogm_ge_coefficients
from .trainer import FusionTrainer, FusionTrainingArguments, split_encoder_group

__all__ = [
    "FusionMonitorCallback",
    "FusionTrainer",
    "FusionTrainingArguments",
    "OGMGECallback",
    "RollingQCallback",
    "imbalance_snapshot",
    "modality_scores",
    "modulate_gradients",
    "ogm_ge_coefficients",
    "rollingq_statistics",
    "split_encoder_group",
]
