"""The token-level indexer against a brute-force reference written from its definition, and its KL."""

import pytest
import torch

from hf_multimax.ops.sparsemix import (
    block_geometry,
    indexer_block_scores,
    indexer_kl,
    select_sparsemix_blocks,
)

BS, D, N, DI = 16, 8, 3, 5
# (id, B, H, Hkv, Q, K, causal, padded)
CASES = [
    ("causal_gqa", 2, 4, 2, 83, 83, True, False),
    ("causal_padded", 2, 2, 2, 83, 83, True, True),
    ("bidirectional", 1, 2, 1, 70, 70, False, False),
    ("decode_step", 2, 4, 2, 1, 90, True, False),
    ("cache_chunk", 2, 2, 1, 13, 77, True, True),
]


def _inputs(case, seed=0):
    _, B, H, Hkv, Q, K, causal, padded = case
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(B, H, Q, D, generator=g), torch.randn(B, Hkv, K, D, generator=g)
    G = H // Hkv
    weights = (torch.randn(Hkv, G * D, N * DI, generator=g), torch.randn(Hkv, D, DI, generator=g),
               torch.randn(Hkv, G * D, N, generator=g))
    mask = None
    if padded:  # row 1: the last 20 keys are padding
        mask = torch.ones(B, 1, Q, K, dtype=torch.bool)
        mask[1, ..., K - 20 :] = False
        if causal:
            mask &= torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    return q, k, weights, mask, block_geometry(Q, K, BS, causal)


def _reference_scores(q, k, weights, mask, g):
    """score[h, a, j] = max over the rows t of block a of log sum_{s in j} softmax_s(I_h(t, s)) over
    the keys row t attends, with I_h(t, s) = sum_j w_j(t) ReLU(q_j(t) . k(s)) for key/value head h
    (its group's query heads side by side), written out in float64."""
    wq, wk, ww = (w.double() for w in weights)
    B, H, Q, _ = q.shape
    Hkv, K = k.shape[1], k.shape[2]
    G = H // Hkv
    out = torch.full((B, Hkv, g.n_q_blocks, g.n_k_blocks), float("-inf"), dtype=torch.float64)
    for h in range(Hkv):
        xq = q[:, h * G : (h + 1) * G].double().permute(0, 2, 1, 3).reshape(B, Q, G * D)
        qi = (xq @ wq[h]).view(B, Q, N, DI) / DI**0.5
        wi = (xq @ ww[h]) / N**0.5
        ki = k[:, h].double() @ wk[h]
        index = torch.einsum("bqn,bqns->bqs", wi, torch.einsum("bqnd,bsd->bqns", qi, ki).relu())
        for b in range(B):
            for t in range(Q):
                a = (t + g.front_pad) // BS
                keep = torch.tensor([not g.causal or s <= t + g.q_offset for s in range(K)])
                if mask is not None:
                    keep &= mask[b, 0, t]
                if not keep.any():
                    continue
                p = torch.softmax(index[b, t].masked_fill(~keep, float("-inf")), -1)
                for j in range(g.n_k_blocks):
                    mass = p[j * BS : (j + 1) * BS].sum()
                    if mass > 0:
                        out[b, h, a, j] = max(out[b, h, a, j], mass.log())
    return out


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_scores_match_the_definition(case):
    q, k, weights, mask, g = _inputs(case)
    scores = indexer_block_scores(q, k, weights, g, mask=mask)
    ref = _reference_scores(q, k, weights, mask, g)
    assert scores.shape == ref.shape
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(scores), finite), "a block with attended keys is scored, others are -inf"
    torch.testing.assert_close(scores[finite].double(), ref[finite], rtol=1e-4, atol=1e-4)
    # Chunked over query blocks (a small budget) gives the same scores.
    chunked = indexer_block_scores(q, k, weights, g, mask=mask, row_budget=1)
    torch.testing.assert_close(chunked, scores)


def test_selection_keeps_the_block_one_query_needs():
    """One query whose key matches one far key exactly: that key's block is selected for the query's
    block, although the block's 15 other queries see nothing in particular (the pooled block scorer
    averages that query away; this is what the token indexer is for)."""
    g = torch.Generator().manual_seed(1)
    H, K = 2, 256
    q, k = torch.randn(1, H, K, D, generator=g) * 0.1, torch.randn(1, H, K, D, generator=g) * 0.1
    needle, query = 37, 200  # block 2, query block 12
    k[0, :, needle] = q[0, :, query] = 3 * torch.ones(D)
    eye = torch.eye(D)
    weights = (eye[:, :DI].repeat(H, 1, N) * 4, eye[:, :DI].repeat(H, 1, 1) * 4, torch.ones(H, D, N))
    _, idx, valid = select_sparsemix_blocks(q, k, weights, block_size=BS, top_k=1, selector="token")
    assert idx[0, :, query // BS, 2].tolist() == [needle // BS] * H and bool(valid[0, :, query // BS, 2].all())


def test_kl_is_zero_at_the_target_and_trains_every_weight():
    case = ("causal", 1, 2, 2, 96, 96, True, False)
    q, k, weights, _, g = _inputs(case)
    weights = tuple(w.clone().requires_grad_() for w in weights)
    blocks = torch.tensor([3, 5])
    kl = indexer_kl(q, k, weights, g, blocks, scale=D**-0.5, sink=True, local=True)
    assert kl > 0
    kl.backward()
    assert all(w.grad is not None and w.grad.abs().sum() > 0 for w in weights)

    # An indexer that reproduces dense attention has zero KL: one indexer head of size D, I = q.k *
    # D**-0.5 (positive inputs: ReLU changes nothing), weight 1 read from a constant coordinate.
    q1, k1 = torch.rand(1, 1, 96, D), torch.rand(1, 1, 96, D)
    q1[..., -1] = 1.0
    exact = (torch.eye(D)[None], torch.eye(D)[None], torch.eye(D)[None, :, -1:])
    kl0 = indexer_kl(q1, k1, exact, g, blocks, scale=D**-0.5, sink=True, local=True)
    assert kl0.abs() < 1e-5


def test_kl_training_fits_the_dense_rows():
    """Adam on the KL alone halves it: the gradient points toward the dense rows."""
    case = ("causal", 1, 2, 2, 128, 128, True, False)
    q, k, weights, _, g = _inputs(case, seed=3)
    weights = [w.clone().requires_grad_() for w in weights]
    opt = torch.optim.Adam(weights, lr=3e-2)
    blocks = torch.arange(2, g.n_q_blocks)
    first = None
    for _ in range(60):
        opt.zero_grad()
        kl = indexer_kl(q, k, weights, g, blocks, scale=D**-0.5, sink=True, local=True)
        first = kl.item() if first is None else first
        kl.backward()
        opt.step()
    assert kl.item() < 0.5 * first, (first, kl.item())
