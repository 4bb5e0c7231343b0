"""Multimodal fusion model with RollingQ and attribution regularization."""

from .configuration_multimodal_fusion import MODEL_TYPE, ROLLINGQ_DEFAULTS, MultimodalFusionConfig
from .modeling_multimodal_fusion import (
    MultimodalFusionClassifierOutput,
    MultimodalFusionForSequenceClassification,
    MultimodalFusionModel,
    MultimodalFusionModelOutput,
    MultimodalFusionPreTrainedModel,
    rotation_towards,
)

__all__ = [
    "MODEL_TYPE",
    "ROLLINGQ_DEFAULTS",
    "MultimodalFusionClassifierOutput",
    "MultimodalFusionConfig",
    "MultimodalFusionForSequenceClassification",
    "MultimodalFusionModel",
    "MultimodalFusionModelOutput",
    "MultimodalFusionPreTrainedModel",
    "rotation_towards",
]
