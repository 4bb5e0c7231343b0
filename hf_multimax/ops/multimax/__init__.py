"""MultiMax attention kernels. Pure tensor maths: no transformers import here.

Every backend has the signature of `naive_multimax_attention` and must match it in outputs and
gradients (including the MultiMax scalars).
"""

from .naive import THETA_NAMES, naive_multimax_attention, naive_multimax_modulate

# name -> kernel. `auto` is not a kernel: the integration layer resolves it per call.
BACKENDS = {"eager": naive_multimax_attention}

__all__ = ["BACKENDS", "THETA_NAMES", "naive_multimax_attention", "naive_multimax_modulate"]
