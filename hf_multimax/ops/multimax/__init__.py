"""MultiMax attention kernels. Pure tensor maths: no transformers import here.

Every backend has the signature of `naive_multimax_attention` and matches it in outputs and
gradients (including the MultiMax scalars) within dtype tolerance.
"""

from .chunked import chunked_multimax_attention
from .flex import flex_multimax_attention
from .naive import THETA_NAMES, naive_multimax_attention, naive_multimax_modulate

# name -> kernel. `auto` is not a kernel: the integration layer resolves it per call.
BACKENDS = {
    "eager": naive_multimax_attention,
    "chunked": chunked_multimax_attention,
    "flex": flex_multimax_attention,
}

__all__ = [
    "BACKENDS",
    "THETA_NAMES",
    "chunked_multimax_attention",
    "flex_multimax_attention",
    "naive_multimax_attention",
    "naive_multimax_modulate",
]
