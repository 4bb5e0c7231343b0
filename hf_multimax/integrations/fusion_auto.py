"""Auto-class registration of the multimodal fusion model (`hf_multimax.modeling.multimodal_fusion`)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification

__all__ = ["register_fusion_auto_classes"]


def register_fusion_auto_classes() -> None:
    """`AutoConfig` / `AutoModel` / `AutoModelForSequenceClassification` resolve model_type
    "multimodal_fusion". Idempotent (`exist_ok=True`)."""
    from ..modeling.multimodal_fusion import (
        MODEL_TYPE,
        MultimodalFusionConfig,
        MultimodalFusionForSequenceClassification,
        MultimodalFusionModel,
    )

    AutoConfig.register(MODEL_TYPE, MultimodalFusionConfig, exist_ok=True)
    AutoModel.register(MultimodalFusionConfig, MultimodalFusionModel, exist_ok=True)
    AutoModelForSequenceClassification.register(
        MultimodalFusionConfig, MultimodalFusionForSequenceClassification, exist_ok=True
    )
