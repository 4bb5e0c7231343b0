"""The method registry: every attention method the plugin adds, declared once.

A method is its attention implementation name (also its config key), its HF-signature attention
function and the mask function registered beside it, its settings class, its backends, and the
learnable layers it attaches to each attention module (which can depend on its settings: SparseMix
with the MultiMax normalizer also needs MultiMax scalars), and the layer it may put on the model's
output head. The integration code (`register()`
in `__init__`, `attach`) is generic over this table; adding a method is one entry here plus its ops, layer and
attention-function files.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

from ..layers.base import MethodLayer
from ..layers.multimax import MultiMaxModulator, MultiMaxSettings
from ..layers.settings import ConfigSettings
from ..layers.sparsemix import SparseMixScorer, SparseMixSettings
from ..ops.backends import BackendRegistry
from ..ops.entmax import ENTMAX_NORMALIZERS
from ..ops.multimax import BACKENDS as MULTIMAX_BACKENDS
from ..ops.sparsemix import BACKENDS as SPARSEMIX_BACKENDS
from .attention_utils import plugin_mask
from .entmax_attention import entmax_attention_forward
from .multimax_attention import multimax_attention_forward
from .sparsemix_attention import sparsemix_attention_forward
from .sparsemix_decoding import note_cache_keys

__all__ = ["HEAD_LAYER_CLASSES", "LAYER_CLASSES", "METHODS", "Method", "method_of"]


@dataclasses.dataclass(frozen=True)
class Method:
    """One attention method.

    Args:
        name (`str`): the `attn_implementation` name and the config key of its settings.
        attention (`Callable`): the HF-signature attention function.
        mask (`Callable`): the mask function registered under the same names (without one,
            transformers passes no mask at all, even to causal models).
        settings (`type[ConfigSettings]`, *optional*): its settings dataclass.
        backends (`BackendRegistry`, *optional*): its kernels; `"<name>:<backend>"` names one at load time.
        layers (`Callable`): settings -> the `MethodLayer` classes each attention module needs.
        host_hook (`Callable`, *optional*): a forward pre-hook (with kwargs) on each attention module
            the method runs in, for what the attention function is not handed (SparseMix: which
            KV-cache keys the module held before this call's update).
        output_head (`type[MethodLayer]`, *optional*): the layer (one of `layers(settings)`) it also
            attaches to the model's output head (LM head, `classifier` or `score`) when that layer's
            settings say `output_head=True`, as a forward hook on the logits. None: never the head.
    """

    name: str
    attention: Callable
    mask: Callable = plugin_mask
    settings: type[ConfigSettings] | None = None
    backends: BackendRegistry | None = None
    layers: Callable[[ConfigSettings], tuple[type[MethodLayer], ...]] = lambda settings: ()
    host_hook: Callable | None = None
    output_head: type[MethodLayer] | None = None

    @property
    def names(self) -> tuple[str, ...]:
        """Every registered implementation name: the method, and one per backend choice."""
        if self.backends is None:
            return (self.name,)
        return (self.name, *(f"{self.name}:{b}" for b in ("auto", *self.backends)))

    def owns(self, name) -> bool:
        return name in self.names


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("multimax", multimax_attention_forward, settings=MultiMaxSettings, backends=MULTIMAX_BACKENDS,
               layers=lambda s: (MultiMaxModulator,), output_head=MultiMaxModulator),
        Method("sparsemix", sparsemix_attention_forward, settings=SparseMixSettings, backends=SPARSEMIX_BACKENDS,
               layers=lambda s: (SparseMixScorer, MultiMaxModulator) if s.normalizer == "multimax" else (SparseMixScorer,),
               host_hook=note_cache_keys, output_head=MultiMaxModulator),  # with the MultiMax normalizer
        # Baselines for MultiMax (need the entmax extra at call time); no learnable state.
        *(Method(n, functools.partial(entmax_attention_forward, normalizer=n)) for n in ENTMAX_NORMALIZERS),
    )
}

# Every learnable layer class a method attaches (each method's default settings name all of its own).
LAYER_CLASSES: tuple[type[MethodLayer], ...] = tuple(
    dict.fromkeys(cls for m in METHODS.values() if m.settings is not None for cls in m.layers(m.settings()))
)

# Every layer class a method may put on the output head.
HEAD_LAYER_CLASSES: tuple[type[MethodLayer], ...] = tuple(
    dict.fromkeys(m.output_head for m in METHODS.values() if m.output_head is not None)
)


def method_of(name) -> Method | None:
    """The plugin method an attention implementation name belongs to, or None."""
    method = METHODS.get(name.split(":", 1)[0]) if isinstance(name, str) else None
    return method if method is not None and method.owns(name) else None
