"""hf-multimax: learnable attention mechanisms for Hugging Face Transformers.

`import hf_multimax` registers `attn_implementation="multimax"`, `"sparsemix"` (and
`"<name>:<backend>"`), `"sparsemax"` and `"entmax15"` with transformers, wraps five
`PreTrainedModel` methods so those names attach their learnable layers and get helpful errors (a
model whose config names none of them is built exactly as without the plugin), and registers the
fusion model's Auto classes.
`hf_multimax.uninstall()` undoes all of it. No compilation, threads or downloads at import.
"""

from .integrations import ATTENTION_NAMES, AuxLosses, collect_aux_losses, register, reset_to_identity, uninstall
from .layers import MultiMaxModulator, MultiMaxSettings, SparseMixScorer, SparseMixSettings
from .layers.sparsemix import freeze_all_but_scorers

__version__ = "0.1.0"
__all__ = [
    "ATTENTION_NAMES",
    "AuxLosses",
    "MultiMaxModulator",
    "MultiMaxSettings",
    "SparseMixScorer",
    "SparseMixSettings",
    "collect_aux_losses",
    "freeze_all_but_scorers",
    "register",
    "reset_to_identity",
    "uninstall",
    "__version__",
]

register()
