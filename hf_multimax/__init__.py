"""hf-multimax: learnable attention mechanisms for Hugging Face Transformers.

`import hf_multimax` registers `attn_implementation="multimax"` and `"sparsemix"` (and
`"<name>:<backend>"`) with transformers, once. Nothing else happens at import: no compilation, no
threads, no downloads.
"""

from .integrations import ATTENTION_NAMES, SPARSEMIX_NAMES, freeze_all_but_scorers, register, sparsemix_kl_loss
from .layers import MultiMaxModulator, MultiMaxSettings, SparseMixScorer, SparseMixSettings

__version__ = "0.1.0"
__all__ = [
    "ATTENTION_NAMES",
    "SPARSEMIX_NAMES",
    "MultiMaxModulator",
    "MultiMaxSettings",
    "SparseMixScorer",
    "SparseMixSettings",
    "freeze_all_but_scorers",
    "register",
    "sparsemix_kl_loss",
    "__version__",
]

register()
