"""The one place that touches transformers' internals: registration and model hooks."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from ..ops.multimax import BACKENDS
from ..ops.sparsemix import BACKENDS as SPARSEMIX_BACKENDS
from .entmax_attention import attention_functions as entmax_attention_functions
from .fusion_auto import register_fusion_auto_classes
from .model_hooks import ATTENTION_NAME, install_model_hooks, sync_methods, sync_multimax
from .multimax_attention import multimax_attention_forward, multimax_mask
from .sparsemix_attention import sparsemix_attention_forward
from .sparsemix_hooks import SPARSEMIX_NAME, freeze_all_but_scorers, sparsemix_kl_loss

__all__ = [
    "ATTENTION_NAMES",
    "SPARSEMIX_NAMES",
    "freeze_all_but_scorers",
    "register",
    "sparsemix_kl_loss",
    "sync_methods",
    "sync_multimax",
]

# "multimax" follows config.multimax["backend"]; "multimax:<backend>" picks the backend at load time.
ATTENTION_NAMES = (ATTENTION_NAME, *(f"{ATTENTION_NAME}:{b}" for b in ("auto", *BACKENDS)))
SPARSEMIX_NAMES = (SPARSEMIX_NAME, *(f"{SPARSEMIX_NAME}:{b}" for b in ("auto", *SPARSEMIX_BACKENDS)))


def register() -> None:
    """Register every attention implementation and its mask under the same name. Idempotent: the
    registries are process-global dicts."""
    for name in ATTENTION_NAMES:
        AttentionInterface.register(name, multimax_attention_forward)
        # Without a mask function of the same name transformers passes mask=None, even for causal models.
        AttentionMaskInterface.register(name, multimax_mask)
    for name in SPARSEMIX_NAMES:
        AttentionInterface.register(name, sparsemix_attention_forward)
        AttentionMaskInterface.register(name, multimax_mask)  # boolean masks, as SDPA's dense path wants
    # Baselines: "sparsemax" and "entmax15" (need the entmax extra at call time).
    for name, fn in entmax_attention_functions().items():
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, multimax_mask)
    install_model_hooks()
    register_fusion_auto_classes()
