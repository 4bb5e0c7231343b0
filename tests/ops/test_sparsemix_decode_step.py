"""SparseMix's one-call decoding step (`fused_sparsemix_decode`) against the references it fuses: the
block scorer's scores of the cached summaries ranked by `select_blocks`, and `naive_sparsemix_attention`
over the blocks kept. Same blocks, same output, for each block scorer, GQA groups, odd cache lengths,
padded masks, a static cache's buffer read in place, fp32 and bf16."""

import pytest
import torch

from hf_multimax.layers.sparsemix import block_scorer_inputs
from hf_multimax.ops.sparsemix import naive_sparsemix_attention, select_blocks
from hf_multimax.ops.sparsemix.fused import fused_sparsemix_decode
from hf_multimax.ops.sparsemix.pipeline import SELECTORS, select_sparsemix_blocks
from tests.conftest import assert_close

BS = 16
# (id, B, H, Hkv, K, D, mask kind, top_k, static cache)
CASES = [
    ("mha", 2, 4, 4, 200, 64, None, 3, False),
    ("gqa2_odd_length", 2, 4, 2, 203, 64, None, 3, False),  # the last block holds 11 keys
    ("gqa3_d12", 1, 6, 2, 97, 12, None, 2, False),  # a head size off the register path
    ("gqa4_one_block_past", 1, 8, 2, 177, 32, None, 4, False),
    ("left_padded", 2, 4, 2, 150, 64, "left_padded", 3, False),
    ("right_padded", 2, 4, 4, 150, 64, "padded", 3, False),
    ("static_cache_view", 2, 4, 2, 190, 64, None, 3, True),  # a buffer of 256 cut at 190 keys
    ("top_k_past_candidates", 1, 2, 1, 70, 64, None, 9, False),  # 5 blocks: fewer candidates than top_k
    ("rank_placeholder", 1, 4, 2, 145, 64, None, 3, False),  # last block's summary a zero placeholder
]
SELECTOR_IDS = ["block", "block_norms", "block_rotary"]


def _inputs(case, selector, dtype):
    name, B, H, Hkv, K, D, mask_kind, top_k, static = case
    g = torch.Generator().manual_seed(42)
    room = 256 if static else K
    q = torch.randn(B, H, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, room, D, generator=g).to(dtype)[:, :, :K]
    v = torch.randn(B, Hkv, room, D, generator=g).to(dtype)[:, :, :K]
    slow = 3 if selector == "block_rotary" else 0
    width = block_scorer_inputs(selector, D, slow)
    w = tuple(torch.randn(Hkv, width, 5, generator=g) * width**-0.5 for _ in range(2))
    summary = SELECTORS[selector].summarize(k, w, BS)
    if name == "rank_placeholder":  # what the decoding cache holds for a partial last block
        summary[:, :, -1] = 0
    mask = None
    if mask_kind == "left_padded":  # row 1's first 40 keys are padding
        mask = torch.ones(B, 1, 1, K, dtype=torch.bool)
        mask[1, ..., :40] = False
    if mask_kind == "padded":  # row 1's last 20 keys hidden (a ragged batch's tail)
        mask = torch.ones(B, 1, 1, K, dtype=torch.bool)
        mask[1, ..., K - 20 :] = False
    return q, k, v, w, summary, mask, top_k


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("selector", SELECTOR_IDS)
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_decode_step_matches_reference(case, selector, dtype):
    q, k, v, w, summary, mask, top_k = _inputs(case, selector, dtype)
    _, idx, ok = select_sparsemix_blocks(q, k, w, block_size=BS, top_k=top_k, selector=selector, mask=mask,
                                         key_summary=summary, select=select_blocks)
    want, _ = naive_sparsemix_attention(q.float(), k.float(), v.float(), idx, ok, block_size=BS, mask=mask,
                                        is_causal=True)
    out, got_idx, got_ok = fused_sparsemix_decode(q, k, v, w, summary, selector=selector, block_size=BS, top_k=top_k,
                                                  mask=mask)
    assert torch.equal(got_ok, ok), "the same slots are valid"
    assert torch.equal(got_idx[ok], idx[ok]), "the same blocks, in the same order"
    assert out.dtype == dtype and out.shape == want.shape
    assert_close(out, want.to(dtype), dtype, what=f"{case[0]} {selector}")


def test_decode_step_with_window_matches_reference():
    q, k, v, w, summary, _, top_k = _inputs(CASES[1], "block", torch.float32)
    _, idx, ok = select_sparsemix_blocks(q, k, w, block_size=BS, top_k=top_k, key_summary=summary, window=100,
                                         select=select_blocks)
    window_mask = torch.zeros(1, 1, 1, k.shape[-2], dtype=torch.bool)
    window_mask[..., -100:] = True
    want, _ = naive_sparsemix_attention(q, k, v, idx, ok, block_size=BS, mask=window_mask, is_causal=True)
    out, got_idx, got_ok = fused_sparsemix_decode(q, k, v, w, summary, selector="block", block_size=BS, top_k=top_k,
                                                  mask=window_mask, window=100)
    assert torch.equal(got_ok, ok) and torch.equal(got_idx[ok], idx[ok])
    assert_close(out, want, what="window")


def test_decode_step_refuses_what_it_does_not_compute():
    q, k, v, w, summary, _, top_k = _inputs(CASES[0], "block", torch.float32)
    args = dict(selector="block", block_size=BS, top_k=top_k)
    with pytest.raises(ValueError, match="one query row"):
        fused_sparsemix_decode(q.expand(-1, -1, 2, -1), k, v, w, summary, **args)
    with pytest.raises(ValueError, match="block scorers"):
        fused_sparsemix_decode(q, k, v, w, summary, **{**args, "selector": "token"})
    with pytest.raises(ValueError, match="key_summary must be"):
        fused_sparsemix_decode(q, k, v, w, summary[:, :, :-1], **args)


def test_decode_step_refuses_norms_of_an_odd_head_size():
    """The rotary-pair selectors pair the head's features: an odd head size has no such pairs."""
    g = torch.Generator().manual_seed(42)
    q, k = torch.randn(1, 2, 1, 13, generator=g), torch.randn(1, 2, 100, 13, generator=g)
    w = (torch.randn(2, 13, 4, generator=g),) * 2
    summary = torch.randn(1, 2, 7, 17, generator=g)
    with pytest.raises(ValueError, match="does not fit"):
        fused_sparsemix_decode(q, k, k, w, summary, selector="block_norms", block_size=BS, top_k=2)
