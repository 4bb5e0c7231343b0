"""nn.Modules holding the methods' learnable state, attached to HF modules at identity init."""

from .multimax import MultiMaxModulator, MultiMaxSettings
from .sparsemix import SparseMixScorer, SparseMixSettings

__all__ = ["MultiMaxModulator", "MultiMaxSettings", "SparseMixScorer", "SparseMixSettings"]
