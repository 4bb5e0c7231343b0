"""Attention sinks (gpt-oss's `s_aux`): a per-head logit in the softmax denominator, no value.

The reference (`naive_attention(..., sink=)`) is checked against the formula written out, then every
backend that supports sinks against it, for outputs and the gradients of q, k, v, the scalars and the
sink; those that do not support them refuse.
"""

import pytest
import torch

from hf_multimax.ops.backends import AttentionCall
from hf_multimax.ops.multimax import (
    BACKENDS,
    chunked_multimax_attention,
    flex_multimax_attention,
    fused_multimax_attention,
    naive_multimax_attention,
    naive_multimax_modulate,
    triton_multimax_attention,
)
from tests.conftest import assert_close

B, H, HKV, L, D = 2, 4, 2, 37, 12


def _inputs(dtype, length=L):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, length, D, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(B, HKV, length, D, generator=g).to(dtype).requires_grad_() for _ in range(2))
    theta = (torch.randn(8, generator=g) * 0.3).requires_grad_()
    sink = (torch.randn(H, generator=g) * 2).requires_grad_()
    return q, k, v, theta, sink


def _mask(kind):
    if kind == "causal":
        return None, True
    keep = torch.ones(B, 1, L, L, dtype=torch.bool).tril()
    if kind == "padded":
        keep[1, :, :, :9] = False  # left padding: rows 0..8 of batch 1 see no key
    return keep, False


def test_reference_is_the_written_out_formula():
    q, k, v, theta, sink = _inputs(torch.float64)
    out, probs = naive_multimax_attention(q, k, v, theta, is_causal=True, sink_logits=sink)
    kk, vv = (t.repeat_interleave(H // HKV, dim=1) for t in (k, v))
    y = naive_multimax_modulate(q @ kk.transpose(-1, -2) * D**-0.5, theta)
    y = y.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    logits = torch.cat([y, sink.view(1, H, 1, 1).expand(B, H, L, 1)], dim=-1)  # as gpt-oss's eager path
    want = torch.softmax(logits, dim=-1)[..., :-1]
    assert_close(probs, want, dtype=torch.float64, what="probs")
    assert_close(out, want @ vv, dtype=torch.float64, what="out")
    assert (probs.sum(-1) < 1).all()  # the sink keeps some mass


@pytest.mark.parametrize("mask_kind", ["causal", "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("fn", [fused_multimax_attention, chunked_multimax_attention], ids=["fused", "chunked"])
def test_backends_with_sinks_match_reference(fn, dtype, mask_kind, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    q, k, v, theta, sink = _inputs(dtype)
    mask, causal = _mask(mask_kind)
    out, _ = fn(q, k, v, theta, mask=mask, is_causal=causal, sink_logits=sink)
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    ref, _ = naive_multimax_attention(*leaves, theta, mask=mask, is_causal=causal, sink_logits=sink)
    assert out.dtype == dtype
    assert_close(out.float(), ref, dtype=dtype, what="out")
    if mask_kind == "padded":  # rows that see no key give zeros, not NaN
        assert (out[1, :, :9] == 0).all()
    grad = torch.randn_like(ref)
    got = torch.autograd.grad(out.float(), [q, k, v, theta, sink], grad)
    want = torch.autograd.grad(ref, [*leaves, theta, sink], grad)
    for name, g, w in zip(("q", "k", "v", "theta", "sink"), got, want):
        scale = w.abs().max().clamp_min(1.0)
        assert_close(g.float() / scale, w / scale, dtype=dtype, what=f"grad {name}")


def test_no_grad_fused_path_with_sinks():
    q, k, v, theta, sink = _inputs(torch.float32)
    with torch.no_grad():
        out, _ = fused_multimax_attention(q[:, :, -1:], k, v, theta, sink_logits=sink)  # a decoding step
    ref, _ = naive_multimax_attention(q[:, :, -1:], k, v, theta, sink_logits=sink)
    assert_close(out, ref, what="decode step")


def test_backends_without_sinks_refuse():
    q, k, v, theta, sink = _inputs(torch.float32)
    for fn in (flex_multimax_attention, triton_multimax_attention):
        with pytest.raises(ValueError, match="no attention sinks"):
            fn(q, k, v, theta, sink_logits=sink)
    call = AttentionCall("cuda", L, L, sink_logits=True)
    for name in ("flex", "triton"):
        ok, reason = BACKENDS._backends[name].supports(call)
        assert not ok and "sinks" in reason
    with pytest.raises(ValueError, match="shape \\(4,\\)"):
        fused_multimax_attention(q, k, v, theta, sink_logits=sink[:2])
