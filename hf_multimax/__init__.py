"""hf-multimax: learnable attention mechanisms for Hugging Face Transformers.

`import hf_multimax` registers `attn_implementation="multimax"` (and `"multimax:<backend>"`) with
transformers, once. Nothing else happens at import: no compilation, no threads, no downloads.
"""

from .integrations import ATTENTION_NAMES, register
from .layers import MultiMaxModulator, MultiMaxSettings

__version__ = "0.1.0"
__all__ = ["ATTENTION_NAMES", "MultiMaxModulator", "MultiMaxSettings", "register", "__version__"]

register()
