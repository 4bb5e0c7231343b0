"""The benchmark's flop count: the pairs SparseMix attends, as its selection and causality give them."""

import pytest
import torch

from experiments.bench_sparsemix import attended_pairs
from hf_multimax.layers.sparsemix import SparseMixSettings
from hf_multimax.ops.sparsemix import block_geometry, select_blocks, selection_mask


@pytest.mark.parametrize("length", [40, 300, 317])
def test_attended_pairs_counts_the_selection_under_causality(length):
    settings = SparseMixSettings(block_size=16, top_k=3)
    geometry = block_geometry(length, length, 16, causal=True)
    scores = torch.randn(1, 1, geometry.n_q_blocks, geometry.n_k_blocks, generator=torch.Generator().manual_seed(0))
    idx, ok = select_blocks(scores, geometry, top_k=3)
    seen = selection_mask(idx, ok, geometry, 1)[0, 0] & torch.ones(length, length, dtype=torch.bool).tril()
    want = int(seen.sum()) if length > 16 * settings.kept_blocks else length * (length + 1) // 2
    assert attended_pairs("fused", length, settings) == want
    assert attended_pairs("sdpa", length, settings) == length * (length + 1) // 2
