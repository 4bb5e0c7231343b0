"""SparseMix kernels with attention sinks (gpt-oss's `s_aux` as `sink_logits`) and selections under a
sliding window, against dense attention with the selection as a mask: outputs and every gradient
(q, k, v, the sinks, MultiMax's scalars where the backend trains them)."""

import pytest
import torch

from hf_multimax.ops.backends import AttentionCall
from hf_multimax.ops.multimax import naive_multimax_attention
from hf_multimax.ops.naive_attention import naive_attention
from hf_multimax.ops.sparsemix import (
    BACKENDS,
    block_geometry,
    candidate_blocks,
    flex_sparsemix_attention,
    naive_sparsemix_attention,
    select_blocks,
    select_sparsemix_blocks,
    selection_mask,
)
from hf_multimax.ops.sparsemix.fused import fused_select_blocks
from tests.conftest import assert_close

BS = 8
# (id, B, H, Hkv, Q, K, causal, mask kind)
CASES = [
    ("causal_gqa", 2, 4, 2, 45, 45, True, None),
    ("causal_left_padded", 2, 4, 2, 45, 45, True, "left_padded"),  # row 1's first 12 queries see no key
    ("bidirectional_padded", 2, 4, 4, 38, 38, False, "padded"),
    ("decode_step", 2, 4, 2, 1, 50, True, None),
    ("cache_chunk", 1, 4, 1, 11, 43, True, None),
]


def _inputs(case, dtype, multimax):
    _, B, H, Hkv, Q, K, causal, mask_kind = case
    g = torch.Generator().manual_seed(42)
    q = torch.randn(B, H, Q, 12, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, Hkv, K, 12, generator=g).to(dtype).requires_grad_() for _ in range(2))
    sink = (torch.randn(H, generator=g) * 2).requires_grad_()  # far from zero: a dropped sink shows
    theta = (torch.randn(8, H, generator=g) * 0.3).requires_grad_() if multimax else None
    mask = None
    if mask_kind == "padded":
        mask = torch.ones(B, 1, Q, K, dtype=torch.bool)
        mask[1, :, :, K - 9:] = False
    if mask_kind == "left_padded":
        mask = torch.ones(Q, K, dtype=torch.bool).tril(K - Q).repeat(B, 1, 1, 1)
        mask[1, :, :, :12] = False
    geometry = block_geometry(Q, K, BS, causal)
    idx, valid = select_blocks(torch.randn(B, Hkv, geometry.n_q_blocks, geometry.n_k_blocks, generator=g), geometry,
                               top_k=2)
    return q, k, v, sink, theta, mask, geometry, idx, valid


def _dense(q, k, v, mask, theta, causal, sink=None):
    """Dense attention in fp32 (the sink as gpt-oss's eager function adds it)."""
    q, k, v = q.float(), k.float(), v.float()
    if theta is None:
        return naive_attention(q, k, v, mask=mask, is_causal=causal, sink_logits=sink)[0]
    return naive_multimax_attention(q, k, v, theta[:, :, None, None], mask=mask, is_causal=causal, sink_logits=sink)[0]


def _grads(out, leaves, grad_out):
    return torch.autograd.grad((out.float() * grad_out).sum(), leaves)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("multimax", [False, True], ids=["softmax", "multimax"])
def test_reference_with_sinks_is_dense_attention_over_the_selection(case, multimax):
    """The naive kernel with sinks is dense attention with the selection as a mask and the sink in the
    softmax denominator: outputs and the gradients of q, k, v, the sinks (and the scalars)."""
    q, k, v, sink, theta, mask, g, idx, valid = _inputs(case, torch.float32, multimax)
    out, _ = naive_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta,
                                       sink_logits=sink)
    keep = selection_mask(idx, valid, g, q.shape[1])
    keep = keep if mask is None else keep & mask
    ref = _dense(q, k, v, keep, theta, g.causal, sink)
    assert_close(out, ref, what="output")
    without = naive_sparsemix_attention(q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal,
                                        theta=theta)[0]
    assert (without - out).abs().max() > 1e-2, "the sinks must change the output"
    leaves = [t for t in (q, k, v, sink, theta) if t is not None]
    grad_out = torch.randn_like(ref)
    for name, got, want in zip(("q", "k", "v", "sink", "theta"), _grads(out, leaves, grad_out),
                               _grads(ref, leaves, grad_out)):
        assert_close(got, want, what=f"grad {name}")


# (backend, normaliser, dtype): blocked runs torch's flash kernels with softmax, explicit tiles with
# MultiMax; fused runs its own C++ backward for both.
KERNELS = [
    ("blocked", False, torch.float32), ("blocked", False, torch.bfloat16), ("blocked", True, torch.float32),
    ("fused", False, torch.float32), ("fused", False, torch.bfloat16), ("fused", True, torch.float32),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
@pytest.mark.parametrize("backend, multimax, dtype", KERNELS, ids=lambda x: str(x).replace("torch.", ""))
def test_backends_with_sinks_match_reference(case, backend, multimax, dtype):
    q, k, v, sink, theta, mask, g, idx, valid = _inputs(case, dtype, multimax)
    args = dict(block_size=BS, mask=mask, is_causal=g.causal, sink_logits=sink)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, _ = naive_sparsemix_attention(*leaves, idx, valid, theta=theta, **args)
    out, _ = BACKENDS[backend](q, k, v, idx, valid, theta=theta, **args)
    assert out.dtype == dtype
    assert_close(out.float(), ref, dtype, "output")
    if case[-1] == "left_padded":  # rows that see no key put all their mass on the sink: zeros, not NaN
        assert (out[1, :, :12] == 0).all()
    grad_out = torch.randn_like(ref)
    names = ("q", "k", "v", "sink", "theta")
    got = _grads(out, [t for t in (q, k, v, sink, theta) if t is not None], grad_out)
    want = _grads(ref, [t for t in (*leaves, sink, theta) if t is not None], grad_out)
    for name, a, b in zip(names, got, want):
        scale = b.abs().max().clamp_min(1.0)  # sums over every row (the sink's, the scalars'): relative to size
        assert_close(a.float() / scale, b / scale, dtype, f"grad {name}")
    without = BACKENDS[backend](q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=g.causal, theta=theta)[0]
    assert (without.float() - out.float()).abs().max() > 1e-2, "the sinks must change the output"


def test_no_grad_paths_with_sinks():
    """Inference: fused's one-call path (a decoding step) and blocked's flash path fold the sink too."""
    q, k, v, sink, _, _, g, idx, valid = _inputs(CASES[3], torch.float32, False)
    ref, _ = naive_sparsemix_attention(q, k, v, idx, valid, block_size=BS, is_causal=True, sink_logits=sink)
    with torch.no_grad():
        for backend in ("fused", "blocked"):
            out, _ = BACKENDS[backend](q, k, v, idx, valid, block_size=BS, is_causal=True, sink_logits=sink)
            assert_close(out, ref, what=backend)


def test_flex_refuses_sinks():
    q, k, v, sink, _, _, g, idx, valid = _inputs(CASES[0], torch.float32, False)
    with pytest.raises(ValueError, match="no attention sinks"):
        flex_sparsemix_attention(q, k, v, idx, valid, block_size=BS, is_causal=True, sink_logits=sink)
    ok, reason = BACKENDS._backends["flex"].supports(AttentionCall("cuda", 45, 45, sink_logits=True))
    assert not ok and "sinks" in reason and "'blocked'" in reason
    assert BACKENDS.resolve("auto", AttentionCall("cuda", 45, 45, sink_logits=True)).name != "flex"
    with pytest.raises(ValueError, match="backend='flex' cannot run this call: it has no attention sinks"):
        BACKENDS.resolve("flex", AttentionCall("cuda", 45, 45, sink_logits=True))
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        naive_sparsemix_attention(q, k, v, idx, valid, block_size=BS, is_causal=True, sink_logits=sink[:2])


# Sliding windows: (id, Q, K, window). Blocks of 8: a window of 20 spans at most 4 blocks, so the local
# block and top_k=3 others hold all of it: the sparse output is then dense windowed attention.
WINDOWS = [
    ("prefill", 70, 70, 20),
    ("prefill_window_on_a_block_edge", 70, 70, 17),
    ("cache_chunk", 13, 77, 20),
    ("decode_step", 1, 90, 20),
    ("decode_step_on_a_block_edge", 1, 89, 9),
]


def _window_mask(Q, K, window):
    """transformers' sliding-window causal mask (`sliding_window_overlay`: key > query - window)."""
    q_pos = torch.arange(K - Q, K)[:, None]
    kv = torch.arange(K)[None, :]
    return (kv <= q_pos) & (kv > q_pos - window)


@pytest.mark.parametrize("case", WINDOWS, ids=[c[0] for c in WINDOWS])
@pytest.mark.parametrize("select", [select_blocks, fused_select_blocks], ids=["reference", "fused"])
def test_selection_keeps_no_block_outside_the_window(case, select):
    """Every kept block holds a key some query of the block sees; the sink block is kept only while the
    window reaches it; top-k fills its slots from blocks inside the window."""
    _, Q, K, window = case
    g = torch.Generator().manual_seed(42)
    geometry = block_geometry(Q, K, BS, True, window)
    scores = torch.randn(2, 2, geometry.n_q_blocks, geometry.n_k_blocks, generator=g)
    # Blocks outside the window score highest: a selection that ignored the window would take them.
    visible = selection_mask(*select_blocks(scores, block_geometry(Q, K, BS, True), top_k=99), geometry, 2)
    visible &= _window_mask(Q, K, window)
    idx, valid = select(scores + 100 * torch.arange(geometry.n_k_blocks).flip(0), geometry, top_k=3)
    kept = selection_mask(idx, valid, geometry, 2)  # [B, H, Q, K]
    assert (kept & visible).sum(-1).eq(visible.sum(-1)).all(), "the window fits the slots: every seen key is kept"

    def per_block(rows_by_keys):  # [B, H, Q, K] -> [B, H, nQB, nKB]: any row of the query block, key of the block
        x = torch.nn.functional.pad(rows_by_keys, (0, geometry.n_k_blocks * BS - K, geometry.front_pad,
                                                   geometry.n_q_blocks * BS - geometry.front_pad - Q))
        return x.unflatten(-1, (-1, BS)).any(-1).unflatten(-2, (-1, BS)).any(-2)

    assert not (per_block(kept) & ~per_block(visible)).any(), "a kept block holds no key its queries see"
    allowed, forced = candidate_blocks(geometry, sink=True, local=True)
    assert not (forced & ~allowed).any()


@pytest.mark.parametrize("case", WINDOWS, ids=[c[0] for c in WINDOWS])
@pytest.mark.parametrize("backend", ["eager", "blocked", "fused"])
@pytest.mark.parametrize("multimax", [False, True], ids=["softmax", "multimax"])
def test_windowed_selection_equals_dense_windowed_attention(case, backend, multimax):
    """The pipeline with the model's window: when its blocks fit the slots, the sparse output and every
    gradient equal dense attention under the windowed mask (a sink or top-k slot spent outside the
    window would drop a block inside it)."""
    _, Q, K, window = case
    g = torch.Generator().manual_seed(42)
    q = torch.randn(2, 4, Q, 12, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, K, 12, generator=g).requires_grad_() for _ in range(2))
    theta = (torch.randn(8, 4, generator=g) * 0.3).requires_grad_() if multimax else None
    weights = tuple(torch.randn(2, 24, 4, generator=g) for _ in range(2))
    mask = _window_mask(Q, K, window).expand(2, 1, Q, K)
    geometry, idx, valid = select_sparsemix_blocks(q, k, weights, block_size=BS, top_k=3, mask=mask, window=window)
    leaves = [t for t in (q, k, v, theta) if t is not None]
    out, _ = BACKENDS[backend](q, k, v, idx, valid, block_size=BS, mask=mask, is_causal=True, theta=theta)
    ref = _dense(q, k, v, mask, theta, True)
    assert_close(out, ref, what="output")
    grad_out = torch.randn_like(ref)
    for name, got, want in zip("qkvt", _grads(out, leaves, grad_out), _grads(ref, leaves, grad_out)):
        scale = want.abs().max().clamp_min(1.0)
        assert_close(got / scale, want / scale, what=f"grad {name}")


def test_window_needs_a_causal_call():
    with pytest.raises(ValueError, match="window=4 must be a positive int of a causal call"):
        block_geometry(10, 10, BS, False, 4)
    with pytest.raises(ValueError, match="window=0"):
        block_geometry(10, 10, BS, True, 0)
