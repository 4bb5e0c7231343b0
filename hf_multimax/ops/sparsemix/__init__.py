"""SparseMix kernels: exact attention over learned top-k key blocks. Pure tensor maths.

Every backend has the signature of `naive_sparsemix_attention` and matches it in outputs and
gradients (including MultiMax scalars when MultiMax is the normalizer).
"""

from .blocked import blocked_sparsemix_attention
from .distill import dense_block_mass, sample_query_blocks, scorer_kl
from .flex import flex_sparsemix_attention
from .naive import naive_sparsemix_attention
from .pipeline import select_sparsemix_blocks, sparsemix_attention
from .selection import (
    BlockGeometry,
    block_geometry,
    candidate_blocks,
    pool_blocks,
    scorer_block_scores,
    select_blocks,
    selection_mask,
)

# name -> kernel. `auto` is resolved per call by the integration layer.
BACKENDS = {
    "eager": naive_sparsemix_attention,
    "blocked": blocked_sparsemix_attention,
    "flex": flex_sparsemix_attention,
}

__all__ = [
    "BACKENDS",
    "BlockGeometry",
    "block_geometry",
    "blocked_sparsemix_attention",
    "candidate_blocks",
    "dense_block_mass",
    "flex_sparsemix_attention",
    "naive_sparsemix_attention",
    "pool_blocks",
    "sample_query_blocks",
    "scorer_block_scores",
    "scorer_kl",
    "select_blocks",
    "selection_mask",
    "select_sparsemix_blocks",
    "sparsemix_attention",
]
