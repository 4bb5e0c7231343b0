"""Every fast backend against the eager reference: outputs and all gradients (q, k, v, scalars)."""

import pytest
import torch

from hf_multimax.ops.multimax import chunked_multimax_attention, flex_multimax_attention, naive_multimax_attention
from tests.conftest import assert_close

B, H, L, D = 2, 4, 67, 20  # odd length: not a multiple of the block size


def make_mask(kind, q_len=L, k_len=L):
    if kind in ("causal", "bidirectional"):
        return None, kind == "causal"
    keep = torch.ones(B, 1, q_len, k_len, dtype=torch.bool)
    if kind == "padded":  # right padding on row 1, combined with causality
        keep[1, :, :, 50:] = False
        return keep, True
    if kind == "left_padded_window":  # left padding + a sliding window of 10, as HF builds it
        window = torch.ones(q_len, k_len, dtype=torch.bool).tril() & ~torch.ones(q_len, k_len, dtype=torch.bool).tril(-10)
        keep = keep & window
        keep[1, :, :, :20] = False
        return keep, False
    if kind == "padded_bidirectional":
        keep[1, :, :, 40:] = False
        return keep, False
    raise ValueError(kind)


def inputs(dtype, kv_heads, per_head, affine):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, L, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, kv_heads, L, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, kv_heads, L, D, generator=g).to(dtype).requires_grad_()
    theta = (torch.randn((8, H, 1, 1) if per_head else (8,), generator=g) * 0.3).requires_grad_()
    aff = (torch.randn((2, H, 1, 1) if per_head else (2,), generator=g) * 0.2).requires_grad_() if affine else None
    return q, k, v, theta, aff


def reference(q, k, v, theta, aff, **kw):
    """The eager kernel on fp32 copies of the same leaves."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, _ = naive_multimax_attention(*leaves, theta, affine=aff, **kw)
    return out, leaves


def check(backend_fn, dtype, mask_kind, kv_heads, per_head=False, affine=False, softcap=None, grads=True, **extra):
    q, k, v, theta, aff = inputs(dtype, kv_heads, per_head, affine)
    mask, is_causal = make_mask(mask_kind)
    kw = dict(mask=mask, is_causal=is_causal, softcap=softcap)
    ref, leaves = reference(q, k, v, theta, aff, **kw)
    if not grads:
        with torch.no_grad():
            out, probs = backend_fn(q, k, v, theta, affine=aff, **kw, **extra)
        assert probs is None and out.dtype == dtype
        assert_close(out.float(), ref, dtype=dtype, what="output")
        return
    out, probs = backend_fn(q, k, v, theta, affine=aff, **kw, **extra)
    assert probs is None and out.dtype == dtype
    assert_close(out.float(), ref, dtype=dtype, what="output")
    grad = torch.randn_like(ref)
    params = [theta] + ([aff] if affine else [])
    got = torch.autograd.grad(out.float(), [q, k, v, *params], grad)
    want = torch.autograd.grad(ref, [*leaves, *params], grad)
    for name, g, w in zip(("q", "k", "v", "theta", "affine"), got, want):
        # The scalars' gradients are sums over all B*H*L*L scores: compare relative to their size.
        scale = w.abs().max().clamp_min(1.0) if name in ("theta", "affine") else 1.0
        assert_close(g.float() / scale, w / scale, dtype=dtype, what=f"grad {name}")


MASKS = ["causal", "padded", "bidirectional", "left_padded_window", "padded_bidirectional"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_chunked_matches_eager(mask_kind, kv_heads, dtype, monkeypatch):
    # The tile code run eagerly (compiling every variant would take minutes on 2 cores); the
    # compiled tiles are checked below on the configurations transformers models hit.
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    check(chunked_multimax_attention, dtype, mask_kind, kv_heads, block_size=16)


@pytest.mark.parametrize("per_head, affine, softcap", [(True, False, None), (False, True, 2.0), (True, True, 2.0)])
def test_chunked_per_head_affine_softcap(per_head, affine, softcap, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    check(chunked_multimax_attention, torch.float32, "padded", 2, per_head, affine, softcap, block_size=32)


@pytest.mark.parametrize("mask_kind, dtype", [("causal", torch.float32), ("padded", torch.bfloat16)])
def test_chunked_compiled_matches_eager(mask_kind, dtype, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "1")
    check(chunked_multimax_attention, dtype, mask_kind, 2, block_size=32)


def test_chunked_fully_masked_rows_and_decode_alignment(monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    q, k, v = (torch.randn(1, 2, n, 8, requires_grad=True) for n in (3, 9, 9))
    theta = torch.randn(8) * 0.3
    keep = torch.ones(1, 1, 3, 9, dtype=torch.bool)
    keep[..., 1, :] = False
    for kw in (dict(mask=keep), dict(is_causal=True)):
        out, _ = chunked_multimax_attention(q, k, v, theta, block_size=2, **kw)
        ref, _ = naive_multimax_attention(q, k, v, theta, **kw)
        assert_close(out, ref, what=str(kw))
        out.sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "left_padded_window", "padded_bidirectional"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_flex_forward_matches_eager_on_cpu(mask_kind, per_head):
    check(flex_multimax_attention, torch.float32, mask_kind, 2, per_head, affine=per_head, grads=False)


def test_flex_refuses_backward_on_cpu():
    q, k, v, theta, _ = inputs(torch.float32, 4, False, False)
    with pytest.raises(ValueError, match="no backward on CPU"):
        flex_multimax_attention(q, k, v, theta, is_causal=True)


@pytest.mark.parametrize("fn", [chunked_multimax_attention, flex_multimax_attention], ids=["chunked", "flex"])
def test_fast_backends_refuse_dropout(fn):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="dropout"):
        fn(q, q, q, torch.zeros(8), dropout_p=0.1)
