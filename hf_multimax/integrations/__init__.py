"""The one place that touches transformers' internals: registration, the model hooks, attaching
the methods' layers. `register()` puts it all in, `uninstall()` takes it all out."""

from __future__ import annotations

from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .attach import reset_to_identity, sync_model
from .aux_losses import AuxLosses, collect_aux_losses
from .fusion_auto import register_fusion_auto_classes, unregister_fusion_auto_classes
from .hooks import check_transformers, install_hooks, uninstall_hooks
from .methods import METHODS, Method, method_of
from . import sparsemix_generation

__all__ = [
    "ATTENTION_NAMES",
    "METHODS",
    "AuxLosses",
    "Method",
    "check_transformers",
    "collect_aux_losses",
    "method_of",
    "register",
    "reset_to_identity",
    "sync_model",
    "uninstall",
]

# Every implementation name the plugin registers.
ATTENTION_NAMES = tuple(name for method in METHODS.values() for name in method.names)


def register() -> None:
    """Register every method's attention and mask functions under each of its names, wrap the model
    hooks and register the fusion model's Auto classes. Idempotent (the registries are process-global)."""
    install_hooks()  # first: it checks the installed transformers
    for method in METHODS.values():
        for name in method.names:
            AttentionInterface.register(name, method.attention)
            # Without a mask function of the same name transformers passes mask=None, even for causal models.
            AttentionMaskInterface.register(name, method.mask)
    register_fusion_auto_classes()
    sparsemix_generation.install()  # generate()'s default cache for SparseMix models


def uninstall() -> None:
    """Restore transformers as it was before `register()`: the wrapped methods, the attention and mask
    registries, the Auto classes. Models built with a plugin method keep their layers but can no
    longer run (their attention name is unknown again)."""
    for name in ATTENTION_NAMES:
        AttentionInterface._global_mapping.pop(name, None)
        AttentionMaskInterface._global_mapping.pop(name, None)
    unregister_fusion_auto_classes()
    sparsemix_generation.uninstall()
    uninstall_hooks()
