"""SparseMix kernels: exact attention over learned top-k key blocks. Pure tensor maths.

Every backend has the signature of `naive_sparsemix_attention` and matches it in outputs and in the
gradients it computes (including MultiMax scalars when MultiMax is the normalizer; `flex` has no CPU
backward and no attention sinks yet: its `supports` says so, and `auto` passes it over).
"""

from ..backends import Backend, BackendRegistry
from ..backends import AttentionCall
from ..multimax import flex_supports, fused_supports
from ..multimax.flex import flex_is_available
from ..multimax.fused import fused_is_available
from .blocked import blocked_sparsemix_attention
from .distill import dense_block_mass, sample_query_blocks, scorer_kl
from .flex import NO_SINKS, flex_sparsemix_attention
from .fused import fused_sparsemix_attention
from .naive import naive_sparsemix_attention
from .indexer import indexer_block_scores, indexer_keys, indexer_kl
from .pipeline import SELECTORS, Selector, select_sparsemix_blocks, sparsemix_attention, statistics_for
from .selection import (
    BlockGeometry,
    block_geometry,
    block_key_features,
    block_statistics,
    candidate_blocks,
    pool_blocks,
    rotary_norms_and_slow_pairs,
    rotary_pair_norms,
    scorer_block_scores,
    select_blocks,
    selection_mask,
)

def _flex_sparse_supports(call: AttentionCall) -> tuple[bool, str]:
    if call.sink_logits:
        return False, f"it {NO_SINKS}"
    return flex_supports(call)


BACKENDS = BackendRegistry(
    "sparsemix",
    [
        # The reference: gathers every kept tile and keeps them for autograd.
        Backend("eager", naive_sparsemix_attention, priority=10),
        # Only the output and log-sum-exp kept, tiles recomputed in backward (torch's flash kernels per
        # tile with softmax): trains anything on other devices.
        Backend("blocked", blocked_sparsemix_attention, priority=20),
        # MultiMax's fused C++ kernel over the selected blocks: CPU inference and training, softmax or
        # MultiMax (its own backward, the scalars' gradients included).
        Backend("fused", fused_sparsemix_attention, priority=25, supports=fused_supports,
                available=fused_is_available),
        # Forward and backward on GPU; on this CPU `blocked` beat compiled flex's forward.
        Backend("flex", flex_sparsemix_attention, priority=30, supports=_flex_sparse_supports, available=flex_is_available,
                preferred=lambda call: call.device == "cuda"),
    ],
)

__all__ = [
    "BACKENDS",
    "SELECTORS",
    "Selector",
    "BlockGeometry",
    "block_geometry",
    "block_key_features",
    "block_statistics",
    "blocked_sparsemix_attention",
    "candidate_blocks",
    "dense_block_mass",
    "flex_sparsemix_attention",
    "fused_sparsemix_attention",
    "indexer_block_scores",
    "indexer_keys",
    "indexer_kl",
    "naive_sparsemix_attention",
    "pool_blocks",
    "rotary_norms_and_slow_pairs",
    "rotary_pair_norms",
    "sample_query_blocks",
    "scorer_block_scores",
    "scorer_kl",
    "select_blocks",
    "selection_mask",
    "select_sparsemix_blocks",
    "sparsemix_attention",
    "statistics_for",
]
