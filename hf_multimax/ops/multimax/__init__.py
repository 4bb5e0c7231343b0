"""MultiMax attention kernels. Pure tensor maths: no transformers import here.

Every backend has the signature of `naive_multimax_attention` and matches it in outputs and
gradients (including the MultiMax scalars) within dtype tolerance.
"""

import importlib.util

from ..backends import AttentionCall, Backend, BackendRegistry
from .chunked import chunked_multimax_attention
from .flex import flex_is_available, flex_multimax_attention
from .fused import fused_is_available, fused_multimax_attention, prepare_fused_inference
from .triton_kernel import triton_is_available, triton_multimax_attention
from .naive import THETA_NAMES, naive_multimax_attention, naive_multimax_modulate

# Without the fused kernel: below this many scores per (batch, head) materialising them is cheap and
# eager beats chunked; measured crossover on a 2-core CPU with experiments/bench_attention.py.
AUTO_MIN_SCORES = 512 * 512


def _fused_supports(call: AttentionCall) -> tuple[bool, str]:
    # The fused kernels keep no probabilities (they never materialise them) and apply no dropout.
    if call.want_probs:
        return False, "output_attentions=True needs the attention probabilities, which it does not materialise"
    if call.dropout > 0.0:
        return False, f"it applies no attention dropout (got dropout={call.dropout})"
    return True, ""


def fused_supports(call: AttentionCall) -> tuple[bool, str]:
    if call.device != "cpu":
        return False, f"it is a CPU kernel (the call is on {call.device})"
    return _fused_supports(call)


def _no_sink(call: AttentionCall) -> tuple[bool, str]:
    if call.sink_logits:
        return False, "it has no attention sinks (s_aux) yet: 'fused' (CPU), 'chunked' and 'eager' have"
    return _fused_supports(call)


def triton_supports(call: AttentionCall) -> tuple[bool, str]:
    if call.device != "cuda":  # TRITON_INTERPRET=1 runs the kernel function on CPU, for tests only
        return False, f"it is a GPU kernel (the call is on {call.device})"
    if not call.same_head_dims:
        return False, "it needs query and value heads of the same size"
    return _no_sink(call)


def flex_supports(call: AttentionCall) -> tuple[bool, str]:
    """Shared by both methods' flex backends."""
    if call.device == "cuda" and importlib.util.find_spec("triton") is None:
        return False, "FlexAttention on GPU compiles through Triton, which is not installed"
    if call.needs_grad and call.device == "cpu":
        return False, "torch implements FlexAttention's backward for GPU only (use 'chunked' to train on CPU)"
    return _no_sink(call)


BACKENDS = BackendRegistry(
    "multimax",
    [
        # The reference: serves every call (probabilities, dropout); fastest on short inputs.
        Backend("eager", naive_multimax_attention, priority=10),
        Backend("chunked", chunked_multimax_attention, priority=20, supports=_fused_supports,
                preferred=lambda call: call.q_len * call.k_len >= AUTO_MIN_SCORES, reads_lengths=True),
        # One C++ call per layer, forward and backward; measured faster than eager and chunked at every
        # length from 1 (decoding) to 4096 (docs/benchmarks.md), so `auto` takes it on CPU whenever
        # it can serve the call and could be built.
        Backend("fused", fused_multimax_attention, priority=25, supports=fused_supports, available=fused_is_available,
                prepare_inference=prepare_fused_inference),
        # Forward and backward fused by torch.compile on GPU; `auto` takes it there only.
        Backend("flex", flex_multimax_attention, priority=30, supports=flex_supports, available=flex_is_available,
                preferred=lambda call: call.device == "cuda"),
        # FlashAttention-2 in Triton with the modulator in the tile, forward and backward. Taken on CUDA
        # for training, where flex's backward with learnable scalars has open torch issues
        # (pytorch#145208); not yet measured against flex (no GPU was available).
        Backend("triton", triton_multimax_attention, priority=35, supports=triton_supports,
                available=triton_is_available, preferred=lambda call: call.device == "cuda" and call.needs_grad),
    ],
)

__all__ = [
    "AUTO_MIN_SCORES",
    "BACKENDS",
    "THETA_NAMES",
    "chunked_multimax_attention",
    "flex_supports",
    "fused_multimax_attention",
    "fused_supports",
    "triton_multimax_attention",
    "triton_supports",
    "flex_multimax_attention",
    "naive_multimax_attention",
    "naive_multimax_modulate",
]
