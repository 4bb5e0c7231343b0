"""SparseMix kernels against plain dense attention with the selection as a mask: outputs and every
gradient (q, k, v, and MultiMax scalars when MultiMax is the normalizer)."""

import pytest
import torch

from hf_multimax.ops.multimax import naive_multimax_attention
from hf_multimax.ops.naive_attention import naive_attention
from hf_multimax.ops.sparsemix import (
    BACKENDS,
    block_geometry,
    blocked_sparsemix_attention,
    candidate_blocks,
    dense_block_mass,
    flex_sparsemix_attention,
    fused_sparsemix_attention,
    naive_sparsemix_attention,
    block_statistics,
    pool_blocks,
    rotary_norms_and_slow_pairs,
    rotary_pair_norms,
    sample_query_blocks,
    scorer_block_scores,
    scorer_kl,
    select_blocks,
    selection_mask,
)
from hf_multimax.ops.sparsemix.fused import fused_block_statistics, fused_select_blocks
from tests.conftest import assert_close, scalar_grad_bounds

BS = 16
# (id, B, H, Hkv, Q, K, causal, mask kind, top_k)
CASES = [
    ("causal_gqa", 2, 4, 2, 83, 83, True, None, 2),
    ("causal_one_row_block", 1, 2, 2, 65, 65, True, None, 2),  # the last query block holds one row
    ("causal_padded", 2, 4, 4, 83, 83, True, "padded", 2),
    ("causal_left_padded", 2, 4, 2, 83, 83, True, "left_padded", 2),
    ("bidirectional", 2, 4, 4, 70, 70, False, None, 2),
    ("bidirectional_padded", 2, 4, 2, 70, 70, False, "padded", 1),
    ("decode_step", 2, 4, 2, 1, 90, True, None, 2),
    ("decode_left_padded", 2, 4, 2, 1, 90, True, "left_padded", 3),
    ("cache_chunk", 2, 4, 1, 13, 77, True, "padded", 2),
]


def _inputs(case, dtype, multimax):
    _, B, H, Hkv, Q, K, causal, mask_kind, top_k = case
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, Q, 12, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, Hkv, K, 12, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, Hkv, K, 12, generator=g).to(dtype).requires_grad_()
    mask = None
    if mask_kind == "padded":  # row 1 has 20 padded keys at the end
        mask = torch.ones(B, 1, Q, K, dtype=torch.bool)
        mask[1, :, :, K - 20 :] = False
        if causal:
            mask &= torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    if mask_kind == "left_padded":  # row 1 has 20 padded keys in front: its first 20 queries see no key
        mask = torch.ones(Q, K, dtype=torch.bool).tril(K - Q).repeat(B, 1, 1, 1)
        mask[1, :, :, :20] = False
    theta = (torch.randn(8, H, generator=g) * 0.3).requires_grad_() if multimax else None
    geometry = block_geometry(Q, K, BS, causal)
    scores = torch.randn(B, Hkv, geometry.n_q_blocks, geometry.n_k_blocks, generator=g)
    idx, valid = select_blocks(scores, geometry, top_k=top_k)
    return q, k, v, mask, theta, geometry, idx, valid


def _dense_reference(q, k, v, mask, theta, geometry, idx, valid, affine=None):
    keep = selection_mask(idx, valid, geometry, q.shape[1])
    keep = keep if mask is None else keep & mask
    q, k, v = q.float(), k.float(), v.float()
    if theta is None:
        return naive_attention(q, k, v, mask=keep, is_causal=geometry.causal)[0]
    affine = None if affine is None else affine[:, :, None, None]
    return naive_multimax_attention(q, k, v, theta[:, :, None, None], mask=keep, is_causal=geometry.causal,
                                    affine=affine)[0]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend", ["eager", "blocked"])
@pytest.mark.parametrize("multimax", [False, True], ids=["softmax", "multimax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_backend_matches_dense_reference(case, backend, multimax, dtype):
    q, k, v, mask, theta, g, idx, valid = _inputs(case, dtype, multimax)
    out, _ = BACKENDS[backend](q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta)
    ref = _dense_reference(q, k, v, mask, theta, g, idx, valid)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output")
    leaves = [t for t in (q, k, v, theta) if t is not None]
    grad_out = torch.randn_like(ref)
    grads = torch.autograd.grad((out.float() * grad_out).sum(), leaves)
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), leaves)
    for name, got, want in zip("qkvt", grads, ref_grads):
        if name != "t":
            assert_close(got, want, dtype, f"d{name}")
        else:  # theta's gradient sums over every score: fp32 sums round at ~1e-5, bf16 inputs round each term
            tol = dict(atol=0.2, rtol=0.05) if dtype == torch.bfloat16 else dict(atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(got, want, **tol)


def test_fp64_gradcheck_of_blocked_backend():
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 9, 3, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 1, 40, 3, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    theta = (torch.randn(8, 2, generator=g, dtype=torch.float64) * 0.3).requires_grad_()
    geometry = block_geometry(9, 40, 8, causal=True)
    idx, valid = select_blocks(torch.randn(1, 1, geometry.n_q_blocks, geometry.n_k_blocks, generator=g), geometry, top_k=1)
    mask = torch.ones(1, 1, 9, 40, dtype=torch.bool).tril(31)
    mask[..., 3:6] = False
    fn = lambda q, k, v, t: blocked_sparsemix_attention(  # noqa: E731
        q, k, v, idx, valid, block_size=8, mask=mask, is_causal=True, theta=t
    )[0]
    assert torch.autograd.gradcheck(fn, (q, k, v, theta))


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_all_blocks_kept_is_dense_attention_at_any_length(causal):
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(3))
    geometry = block_geometry(300, 300, BS, causal)
    idx, valid = select_blocks(torch.randn(1, 2, geometry.n_q_blocks, geometry.n_k_blocks), geometry, top_k=100)
    dense = naive_attention(q, k, v, is_causal=causal)[0]
    for backend in ("eager", "blocked"):
        out, _ = BACKENDS[backend](q, k, v, idx, valid, block_size=BS, is_causal=causal)
        assert_close(out, dense, torch.float32, backend)


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["causal_gqa", "causal_padded", "bidirectional_padded"])
@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "eager_flex"])
def test_flex_forward_matches_eager(case, compiled, monkeypatch):
    if not compiled:
        # torch runs flex uncompiled when its compile cache is full: the selection must then come from
        # the mask_mod, since eager flex ignores the BlockMask's block lists.
        from torch.nn.attention.flex_attention import flex_attention

        monkeypatch.setattr("hf_multimax.ops.sparsemix.flex._compiled_flex", lambda: flex_attention)
    q, k, v, mask, theta, g, idx, valid = _inputs(case, torch.float32, True)
    with torch.no_grad():
        out, _ = flex_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta)
        ref, _ = naive_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=2e-5)


def test_flex_refuses_cpu_backward():
    q, k, v, mask, theta, g, idx, valid = _inputs(CASES[0], torch.float32, False)
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex_sparsemix_attention(q, k, v, idx, valid, block_size=BS, is_causal=True)


def test_selection_respects_causality_sink_and_local():
    geometry = block_geometry(200, 200, BS, causal=True)
    scores = torch.randn(2, 3, geometry.n_q_blocks, geometry.n_k_blocks)
    scores[..., -1] = 100.0  # the future last block scores highest: it must never be chosen early
    idx, valid = select_blocks(scores, geometry, top_k=3)
    a = torch.arange(geometry.n_q_blocks)
    assert (idx.masked_fill(~valid, 0) <= a[:, None]).all(), "a query block chose a future block"
    assert (idx[..., 1] == a).all() and valid[..., 1].all(), "the local block is always kept"
    assert (valid[..., 0] == (a > 0)).all() and (idx[..., 0] == 0).all(), "the sink is kept (in the local slot for block 0)"
    kept = [set(idx[0, 0, i][valid[0, 0, i]].tolist()) for i in range(geometry.n_q_blocks)]
    assert all(len(s) == min(i + 1, 5) for i, s in enumerate(kept)), "sink + local + top-3 distinct blocks"
    # the best-scored allowed block is chosen: block i-1 gets a high score
    scores = torch.zeros_like(scores)
    scores[..., torch.arange(1, geometry.n_q_blocks), torch.arange(0, geometry.n_q_blocks - 1)] = 5.0
    idx, valid = select_blocks(scores, geometry, top_k=1)
    assert (idx[:, :, 3:, 2] == torch.arange(2, geometry.n_q_blocks - 1)).all()


def test_selection_of_a_decode_step_aligns_to_absolute_blocks():
    geometry = block_geometry(1, 100, BS, causal=True)  # the 100th token: block 6
    assert (geometry.q_block0, geometry.front_pad, geometry.n_q_blocks) == (6, 3, 1)
    idx, valid = select_blocks(torch.randn(1, 1, 1, geometry.n_k_blocks), geometry, top_k=2)
    assert idx[0, 0, 0, 1] == 6 and valid.sum() == 4



@pytest.mark.parametrize("Q, K, causal", [(1, 1601, True), (1, 100, True), (200, 200, True), (37, 300, True),
                                          (150, 150, False)], ids=["decode_100_blocks", "decode_step", "prefill",
                                                                   "chunk", "bidirectional"])
@pytest.mark.parametrize("sink, local", [(True, True), (False, True), (True, False), (False, False)])
def test_fused_selection_is_select_blocks(Q, K, causal, sink, local):
    """The fused extension's one-call top-k against `select_blocks`: the same blocks in the same slots,
    with top_k below and above the number of candidates, ties, -inf scores (never kept) and a strided
    score tensor."""
    geometry = block_geometry(Q, K, BS, causal=causal)
    scores = torch.randn(2, 3, geometry.n_q_blocks, geometry.n_k_blocks + 1, generator=torch.Generator().manual_seed(K))
    scores = scores[..., 1:]  # rows one element apart from their neighbours' ends
    scores[0, 1] = scores[0, 1].round()  # ties
    scores[1, 2, :, ::3] = float("-inf")
    for top_k in (1, 3, geometry.n_k_blocks + 2):
        want = select_blocks(scores, geometry, top_k=top_k, sink=sink, local=local)
        got = fused_select_blocks(scores, geometry, top_k=top_k, sink=sink, local=local)
        assert torch.equal(got[1], want[1]), f"valid slots, top_k={top_k}"
        assert torch.equal(got[0][..., :2], want[0][..., :2]), "fixed slots"
        # Of tied scores at the cut either block may be taken: rows with ties compare the kept scores.
        kept = [torch.where(ok, idx, -1)[..., 2:].sort(-1).values for idx, ok in (got, want)]
        assert torch.equal(kept[0][1:], kept[1][1:]) and torch.equal(kept[0][0, 0], kept[1][0, 0]), f"top_k={top_k}"
        taken = [scores.gather(-1, idx[..., 2:]).masked_fill(~ok[..., 2:], 0).sort(-1).values for idx, ok in (got, want)]
        assert torch.equal(taken[0], taken[1]), f"kept scores, top_k={top_k}"
        free = ~want[1][..., 2:]
        assert not got[0][..., 2:][free].any(), "empty slots point at block 0"

def test_pool_blocks_ignores_padding_rows():
    x = torch.arange(10.0).view(1, 1, 10, 1)
    pooled = pool_blocks(x, 4, front_pad=2)  # blocks: [pad pad 0 1] [2 3 4 5] [6 7 8 9]
    torch.testing.assert_close(pooled[0, 0, :, 0], torch.tensor([0.5, 3.5, 7.5]))
    torch.testing.assert_close(pooled[0, 0, :, 1], torch.tensor([1.0, 5.0, 9.0]))


def test_untrained_scorer_is_the_mean_pooled_gate():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    geometry = block_geometry(64, 64, BS, causal=True)
    wq, wk = torch.randn(2, 16, 4, generator=g), torch.zeros(2, 16, 4)
    scores = scorer_block_scores(q, k, wq, wk, geometry, scale=0.5)
    mean_q = q.view(1, 2, 2, 4, BS, 8).mean(dim=(2, 4))
    mean_k = k.view(1, 2, 4, BS, 8).mean(dim=3)
    torch.testing.assert_close(scores, mean_q @ mean_k.transpose(-1, -2) * 0.5)
    subset = scorer_block_scores(q, k, wq, wk, geometry, scale=0.5, q_blocks=torch.tensor([3, 1]))
    torch.testing.assert_close(subset, scores[:, :, [3, 1]])


def _rotate(x, positions, theta=10_000.0):
    """Rotary embedding in transformers' rotate_half layout (dims i and i + D/2 rotate together)."""
    half = x.shape[-1] // 2
    angle = positions[:, None].double() * theta ** (-torch.arange(half, dtype=torch.float64) / half)
    cos, sin = angle.cos().float(), angle.sin().float()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def test_block_norms_scorer_pools_rotary_pair_norms_and_ignores_position():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 4, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    geometry = block_geometry(64, 64, BS, causal=True)
    wq, wk = torch.randn(2, 8, 3, generator=g), torch.randn(2, 8, 3, generator=g)
    scores = scorer_block_scores(q, k, wq, wk, geometry, scale=0.5, features=rotary_pair_norms)
    # Reference: the mean-pooled gate plus the learned term on mean+max pooled pair norms.
    mean_q = q.view(1, 2, 2, 4, BS, 8).mean(dim=(2, 4))
    mean_k = k.view(1, 2, 4, BS, 8).mean(dim=3)
    nq = (q[..., :4] ** 2 + q[..., 4:] ** 2).sqrt().view(1, 2, 2, 4, BS, 4)
    nk = (k[..., :4] ** 2 + k[..., 4:] ** 2).sqrt().view(1, 2, 4, BS, 4)
    pq = torch.cat([nq.mean(dim=4), nq.amax(dim=4)], -1).mean(dim=2)
    pk = torch.cat([nk.mean(dim=3), nk.amax(dim=3)], -1)
    want = mean_q @ mean_k.transpose(-1, -2) * 0.5 + (pq @ wq) @ (pk @ wk).transpose(-1, -2)
    torch.testing.assert_close(scores, want)
    # Its learned term reads the same features wherever the tokens sit (here 5000 positions later);
    # the plain block scorer's does not.
    shifted = [torch.arange(64) + offset for offset in (0, 5000)]
    for features, same in ((rotary_pair_norms, True), (None, False)):
        w = wq if features else torch.randn(2, 16, 3, generator=g)
        learned = [scorer_block_scores(_rotate(q, p), _rotate(k, p), w, w, geometry, scale=0.0, features=features)
                   for p in shifted]
        assert torch.allclose(*learned, atol=1e-4) == same


def test_block_rotary_features_keep_the_slow_pairs_whole_and_barely_move_with_position():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 8, generator=g)
    # Head size 8: 4 pair norms, then the last (slowest) n pairs of each half as they are.
    torch.testing.assert_close(rotary_norms_and_slow_pairs(x, 4), rotary_pair_norms(x))
    norms = (x[..., :4] ** 2 + x[..., 4:] ** 2).sqrt()
    torch.testing.assert_close(rotary_norms_and_slow_pairs(x, 8), torch.cat([norms, x[..., 2:4], x[..., 6:8]], -1))
    # Pair frequencies 1, 1e-3, 1e-6, 1e-9 (theta 1e12): moved 5000 positions, the slowest pair turns
    # 5e-6 radians. With it whole the learned term is still (nearly) the same; with the next pair,
    # which turns 5e-3 radians, too, it moves visibly; with all pairs whole (the plain scorer), a lot.
    q, k = torch.randn(1, 2, 64, 8, generator=g), torch.randn(1, 2, 64, 8, generator=g)
    geometry = block_geometry(64, 64, BS, causal=True)
    shifted = [torch.arange(64) + offset for offset in (0, 5000)]

    def learned_change(features, width):
        w = torch.randn(2, 2 * width, 3, generator=g)
        a, b = (scorer_block_scores(_rotate(q, p, 1e12), _rotate(k, p, 1e12), w, w, geometry, scale=0.0,
                                    features=features) for p in shifted)
        return ((a - b).abs().max() / a.abs().max()).item()

    one_slow, two_slow = learned_change(rotary_norms_and_slow_pairs, 6), learned_change(rotary_norms_and_slow_pairs, 8)
    assert one_slow < 1e-4 < two_slow
    assert learned_change(None, 8) > 100 * two_slow


def test_block_mass_and_kl():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(1, 2, 96, 8, generator=g), torch.randn(1, 2, 96, 8, generator=g)
    geometry = block_geometry(96, 96, BS, causal=True)
    mean = dense_block_mass(q, k, geometry, 4, scale=8**-0.5, pool="mean")
    torch.testing.assert_close(mean.sum(-1), torch.ones(1, 2))
    assert (mean[..., 5:] == 0).all(), "no mass on future blocks"
    _, probs = naive_attention(q[:, :, 64:80], k, k, mask=torch.ones(16, 96, dtype=torch.bool).tril(64))
    per_row = probs[0, 0, :, 32:48].sum(-1)
    torch.testing.assert_close(mean[0, 0, 2], per_row.mean())
    torch.testing.assert_close(dense_block_mass(q, k, geometry, 4, scale=8**-0.5)[0, 0, 2], per_row.max())

    blocks = sample_query_blocks(geometry, 3, sink=True, local=True)
    assert len(blocks) == 3 and (blocks >= 2).all(), "blocks 0 and 1 have nothing to choose"
    # A scorer whose distribution equals the target has zero KL; anything else is positive.
    target_scores = torch.stack(
        [dense_block_mass(q, k, geometry, a, scale=8**-0.5).clamp_min(1e-30).log() for a in blocks.tolist()], dim=2
    )
    kl = scorer_kl(target_scores, q, k, geometry, blocks, scale=8**-0.5, sink=True, local=True)
    assert abs(kl.item()) < 1e-5
    scores = torch.zeros_like(target_scores, requires_grad=True)
    kl = scorer_kl(scores, q, k, geometry, blocks, scale=8**-0.5, sink=True, local=True)
    assert kl.item() > 0
    kl.backward()
    assert scores.grad.abs().sum() > 0
    # A sharpened target (target_power) is nearly one-hot on each block's best candidate.
    _, forced = candidate_blocks(geometry, sink=True, local=True)
    best = target_scores.masked_fill(forced[blocks], float("-inf")).argmax(-1, keepdim=True)
    one_hot = torch.full_like(target_scores, -1e4).scatter(-1, best, 0.0)
    sharp = scorer_kl(one_hot, q, k, geometry, blocks, scale=8**-0.5, sink=True, local=True, target_power=256.0)
    assert sharp.item() < 1e-3 < scorer_kl(one_hot, q, k, geometry, blocks, scale=8**-0.5, sink=True, local=True).item()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(block_size=0), "block_size=0"),
        (dict(block_idx=torch.zeros(1, 2, 5, 4, dtype=torch.long)), "block_idx/block_valid must be"),
        (dict(mask=torch.ones(1, 1, 40, 40)), "boolean"),
        (dict(theta=torch.zeros(7)), "theta must have 8 rows"),
    ],
)
def test_bad_inputs_raise(kwargs, match):
    q = k = v = torch.randn(1, 2, 40, 8)
    geometry = block_geometry(40, 40, BS, True)
    idx, valid = select_blocks(torch.randn(1, 2, geometry.n_q_blocks, geometry.n_k_blocks), geometry, top_k=1)
    args = dict(block_idx=idx, block_valid=valid, block_size=BS, is_causal=True)
    args.update(kwargs)
    if "block_idx" in kwargs:
        args["block_valid"] = torch.ones_like(kwargs["block_idx"], dtype=torch.bool)
    with pytest.raises(ValueError, match=match):
        naive_sparsemix_attention(q, k, v, **args)


@pytest.mark.parametrize("select", [select_blocks, fused_select_blocks], ids=["reference", "fused"])
@pytest.mark.parametrize("shape", [(5,), (2, 5), (1, 2, 5), (1, 2, 5, 4), (1, 2, 3, 5)], ids=str)
def test_selection_names_the_score_shape_it_needs(select, shape):
    geometry = block_geometry(40, 40, 8, True)  # 5 x 5 blocks
    with pytest.raises(ValueError, match=r"scores must be \[B, Hkv, 5, 5\] for this geometry, got"):
        select(torch.randn(shape), geometry, top_k=1)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("multimax", [False, True], ids=["softmax", "multimax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("onednn", [True, False], ids=["onednn", "blas"])
def test_fused_matches_dense_reference(case, multimax, dtype, onednn):
    """The fused C++ kernel over the selected blocks: outputs, and the gradients of q, k, v and (with
    MultiMax) of its scalars from its own backward. Its products run on oneDNN's brgemm micro-kernel
    where torch has it; with torch.backends.mkldnn switched off, torch's brgemm runs them on BLAS."""
    with torch.backends.mkldnn.flags(enabled=onednn):
        _check_fused_against_reference(case, multimax, dtype)


def _check_fused_against_reference(case, multimax, dtype, affine=False):
    q, k, v, mask, theta, g, idx, valid = _inputs(case, dtype, multimax)
    aff = (torch.randn(2, q.shape[1]) * 0.2).requires_grad_() if affine else None
    with torch.no_grad():
        out, _ = fused_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal,
                                           theta=theta, affine=aff)
    ref = _dense_reference(q, k, v, mask, theta, g, idx, valid, aff)
    assert out.dtype == dtype and out.shape == ref.shape
    assert_close(out, ref, dtype, "output")
    out, _ = fused_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta,
                                       affine=aff)
    assert_close(out, ref, dtype, "output with autograd")
    grad_out = torch.randn_like(ref)
    scalars = [t for t in (theta, aff) if t is not None]
    grads = torch.autograd.grad((out.float() * grad_out).sum(), (q, k, v, *scalars))
    ref_grads = torch.autograd.grad((ref * grad_out).sum(), (q, k, v, *scalars))
    for name, got, want in zip("qkv", grads, ref_grads):
        assert got.dtype == dtype
        assert_close(got, want, dtype, f"d{name}")
    if not scalars:
        return
    if dtype == torch.float32:  # against float64, within the rounding bound of their sums (conftest)
        keep = selection_mask(idx, valid, g, q.shape[1])
        keep = keep if mask is None else keep & mask
        exact = scalar_grad_bounds(q, k, v, theta[:, :, None, None], None if aff is None else aff[:, :, None, None],
                                   grad_out, mask=keep, is_causal=g.causal)
        for name, got, want, bound in zip(("theta", "affine"), grads[3:], exact[:2], exact[2:]):
            err = (got.double() - want.reshape(got.shape)).abs()
            assert (err <= bound.reshape(got.shape)).all(), f"d{name}: error {err.max():.3e}, bound {bound.min():.3e}"
    else:  # bf16 inputs round each term: relative to the gradient's size
        for name, got, want in zip(("theta", "affine"), grads[3:], ref_grads[3:]):
            scale = want.abs().max().clamp_min(1.0)
            assert_close(got.float() / scale, want / scale, dtype, f"d{name}")


@pytest.mark.parametrize("case", [CASES[1], CASES[4]], ids=["causal_padded", "bidirectional_padded"])
def test_fused_trains_multimax_with_affine_scalars(case):
    _check_fused_against_reference(case, True, torch.float32, affine=True)


@pytest.mark.parametrize("case", [c for c in CASES if c[0] in ("decode_step", "cache_chunk")], ids=lambda c: c[0])
def test_fused_reads_a_static_cache_buffer_in_place(case):
    """Keys and values as a static KV cache hands them over, cut at the real length: a prefix view of
    a longer buffer (each head's rows contiguous, heads a buffer apart), read without a copy."""
    q, k, v, mask, theta, g, idx, valid = _inputs(case, torch.float32, True)
    with torch.no_grad():
        buffers = [torch.full((*t.shape[:2], t.shape[2] + 37, t.shape[3]), float("nan")) for t in (k, v)]
        for buf, t in zip(buffers, (k, v)):
            buf[:, :, : t.shape[2]] = t
        k_view, v_view = (buf[:, :, : k.shape[2]] for buf in buffers)
        assert not k_view.is_contiguous()
        out, _ = fused_sparsemix_attention(q, k_view, v_view, idx, valid, block_size=BS, mask=mask, is_causal=g.causal,
                                           theta=theta)
    assert_close(out, _dense_reference(q, k, v, mask, theta, g, idx, valid), torch.float32, "strided cache")


@pytest.mark.parametrize("multimax", [False, True], ids=["softmax", "multimax"])
def test_fused_gathers_long_selections_in_chunks(multimax):
    """More kept keys than one gathered product holds (1024): the online softmax carries over the
    chunks. GQA (two query heads per gathered K/V), a per-head padding mask that hides a whole block
    from one head only, and odd lengths."""
    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 4, 1501, 8, generator=g)
    k, v = (torch.randn(2, 2, 1501, 8, generator=g) for _ in range(2))
    geometry = block_geometry(1501, 1501, BS, True)
    idx, valid = select_blocks(torch.randn(2, 2, geometry.n_q_blocks, geometry.n_k_blocks, generator=g), geometry,
                               top_k=80)
    mask = torch.ones(2, 4, 1501, 1501, dtype=torch.bool).tril()
    mask[1, 3, :, 16:32] = False  # block 1 hidden from head 3 of batch 1 only
    mask[0, :, :, 1400:] = False
    theta = torch.randn(8, 4, generator=g) * 0.3 if multimax else None
    with torch.no_grad():
        out, _ = fused_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=True, theta=theta)
    ref = _dense_reference(q, k, v, mask, theta, geometry, idx, valid)
    assert_close(out, ref, torch.float32, "chunked gather")
    if multimax:
        return
    leaves = [t.requires_grad_() for t in (q, k, v)]
    out, _ = fused_sparsemix_attention(*leaves, idx, valid, block_size=BS, mask=mask, is_causal=True)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad((out * grad_out).sum(), leaves)
    ref_grads = torch.autograd.grad((_dense_reference(*leaves, mask, None, geometry, idx, valid) * grad_out).sum(), leaves)
    for name, got, want in zip("qkv", grads, ref_grads):
        assert_close(got, want, torch.float32, f"d{name}, chunked gather")


def test_fused_all_blocks_kept_is_dense():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 300, 8, generator=g) for _ in range(3))
    geometry = block_geometry(300, 300, BS, True)
    idx, valid = select_blocks(torch.randn(1, 2, geometry.n_q_blocks, geometry.n_k_blocks), geometry, top_k=100)
    with torch.no_grad():
        out, _ = fused_sparsemix_attention(q, k, v, idx, valid, block_size=BS, is_causal=True)
    assert_close(out, naive_attention(q, k, v, is_causal=True)[0], torch.float32, "all kept")


@pytest.mark.parametrize("L, front_pad", [(1, 0), (1, 5), (16, 0), (37, 0), (37, 11), (100, 15)])
@pytest.mark.parametrize("D", [8, 12, 64])
@pytest.mark.parametrize("pair_norms", [False, True], ids=["raw", "pair_norms"])
def test_fused_block_statistics_is_the_reference(L, front_pad, D, pair_norms):
    g = torch.Generator().manual_seed(L + D)
    x = torch.randn(2, L, 3, D, generator=g).transpose(1, 2)  # [B, H, L, D] as attention gets it: strided
    want = block_statistics(x, BS, front_pad, pair_norms)
    got = fused_block_statistics(x, BS, front_pad, pair_norms)
    torch.testing.assert_close(got[0], want[0], rtol=1e-6, atol=1e-6)
    assert (got[1] is None) == (not pair_norms)
    if pair_norms:
        torch.testing.assert_close(got[1], want[1], rtol=1e-6, atol=1e-6)
    # bf16 inputs are pooled in fp32, as the reference does
    got16, want16 = fused_block_statistics(x.bfloat16(), BS, front_pad)[0], block_statistics(x.bfloat16(), BS, front_pad)[0]
    assert got16.dtype == want16.dtype == torch.float32
    torch.testing.assert_close(got16, want16, rtol=1e-6, atol=1e-6)


def test_fused_block_statistics_keeps_a_graph_by_taking_the_reference():
    x = torch.randn(1, 2, 40, 8, requires_grad=True)
    raw, norms = fused_block_statistics(x, BS, 0, True)
    (raw.sum() + norms.sum()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


@pytest.mark.parametrize("statistics", [block_statistics, fused_block_statistics], ids=["reference", "fused"])
@pytest.mark.parametrize("Q, K", [(96, 96), (37, 100), (1, 101)], ids=["prefill", "chunk", "decode_step"])
def test_block_rotary_scores_equal_pooling_the_features_of_every_token(Q, K, statistics):
    # block_rotary pools its slow pairs from the raw tokens' block means and maxima; the reference
    # builds every token's features (norms, then the slow pairs) and pools those.
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, Q, 8, generator=g), torch.randn(2, 2, K, 8, generator=g)
    width = 4 + 2 * 2  # 4 pair norms and 2 slow pairs whole
    wq, wk = torch.randn(2, 2 * width, 3, generator=g), torch.randn(2, 2 * width, 3, generator=g)
    geometry = block_geometry(Q, K, BS, causal=True)
    scores = scorer_block_scores(q, k, wq, wk, geometry, scale=0.5, features=rotary_norms_and_slow_pairs,
                                 statistics=statistics)

    def pooled(x, front_pad=0, with_max=True):  # per block, averaged over the query heads of a group
        p = pool_blocks(x, BS, front_pad, with_max)
        return p.view(2, 2, x.shape[1] // 2, *p.shape[2:]).mean(2)

    pq = pooled(rotary_norms_and_slow_pairs(q, width), geometry.front_pad)
    mean_q = pooled(q, geometry.front_pad, with_max=False)
    pk = pool_blocks(rotary_norms_and_slow_pairs(k, width), BS)
    mean_k = pool_blocks(k, BS, with_max=False)
    want = torch.cat([mean_q * 0.5, pq @ wq], -1) @ torch.cat([mean_k, pk @ wk], -1).transpose(-1, -2)
    torch.testing.assert_close(scores, want)
