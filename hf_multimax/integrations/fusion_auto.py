"""Auto-class registration of the multimodal fusion model (`hf_multimax.modeling.multimodal_fusion`)."""

from __future__ import annotations

from transformers import AutoConfig, AutoModel, AutoModelForSequenceClassification
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING, MODEL_MAPPING

__all__ = ["register_fusion_auto_classes", "unregister_fusion_auto_classes"]


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


def unregister_fusion_auto_classes() -> None:
    """Undo `register_fusion_auto_classes` (the Auto mappings have no public unregister)."""
    from ..modeling.multimodal_fusion import MODEL_TYPE, MultimodalFusionConfig

    CONFIG_MAPPING._extra_content.pop(MODEL_TYPE, None)
    for mapping in (MODEL_MAPPING, MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING):
        mapping._extra_content.pop(MultimodalFusionConfig, None)
