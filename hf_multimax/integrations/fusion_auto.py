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

    # save_pretrained then copies the modeling files next to the weights and writes `auto_map`, so a
    # published checkpoint also loads without the plugin (trust_remote_code=True).
    MultimodalFusionConfig.register_for_auto_class()
    MultimodalFusionModel.register_for_auto_class("AutoModel")
    MultimodalFusionForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")
    AutoConfig.register(MODEL_TYPE, MultimodalFusionConfig, exist_ok=True)
    AutoModel.register(MultimodalFusionConfig, MultimodalFusionModel, exist_ok=True)
    AutoModelForSequenceClassification.register(
        MultimodalFusionConfig, MultimodalFusionForSequenceClassification, exist_ok=True
    )
