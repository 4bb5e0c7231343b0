"""Every fast backend against the eager reference: outputs and all gradients (q, k, v, scalars)."""

import os

import pytest
import torch

from hf_multimax.ops.multimax import (
    chunked_multimax_attention,
    flex_multimax_attention,
    fused_multimax_attention,
    naive_multimax_attention,
    triton_multimax_attention,
)
from tests.conftest import assert_close, scalar_grad_bounds

B, H, L, D = 2, 4, 67, 20  # odd length: not a multiple of the block size


def make_mask(kind, q_len=L, k_len=L):
    k_len = q_len if k_len is None else k_len
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


def inputs(dtype, kv_heads, per_head, affine, length=L, smooth=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, H, length, D, generator=g).to(dtype).requires_grad_()
    k = torch.randn(B, kv_heads, length, D, generator=g).to(dtype).requires_grad_()
    v = torch.randn(B, kv_heads, length, D, generator=g).to(dtype).requires_grad_()
    theta = torch.randn((8, H, 1, 1) if per_head else (8,), generator=g) * 0.3
    if smooth:  # no linear pieces: sigma' has no jumps (see test_fused_across_key_blocks)
        theta[:2] = 0
    theta.requires_grad_()
    aff = (torch.randn((2, H, 1, 1) if per_head else (2,), generator=g) * 0.2).requires_grad_() if affine else None
    return q, k, v, theta, aff


def reference(q, k, v, theta, aff, **kw):
    """The eager kernel on fp32 copies of the same leaves."""
    leaves = [t.detach().float().requires_grad_() for t in (q, k, v)]
    out, _ = naive_multimax_attention(*leaves, theta, affine=aff, **kw)
    return out, leaves


def check(backend_fn, dtype, mask_kind, kv_heads, per_head=False, affine=False, softcap=None, grads=True, length=L,
          bias=None, smooth=False, **extra):
    q, k, v, theta, aff = inputs(dtype, kv_heads, per_head, affine, length, smooth)
    mask, is_causal = make_mask(mask_kind, length, length)
    kw = dict(mask=mask, is_causal=is_causal, softcap=softcap, bias=bias)
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
    if dtype == torch.float32:  # the scalars: against float64, within the rounding bound of their sums
        exact = scalar_grad_bounds(q, k, v, theta, aff, grad, **kw)
        for name, g, w, bound in zip(("theta", "affine"), got[3:], exact[:2], exact[2:]):
            err = (g.double() - w).abs()
            assert (err <= bound).all(), f"grad {name}: error {err.max().item():.3e}, bound {bound.min().item():.3e}"
        got, want = got[:3], want[:3]
    for name, g, w in zip(("q", "k", "v", "theta", "affine"), got, want):
        # Relative to the gradient's size (sums over many scores, in each kernel's own order).
        scale = w.abs().max().clamp_min(1.0)
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


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
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


@pytest.mark.parametrize("fn", [chunked_multimax_attention, flex_multimax_attention, fused_multimax_attention,
                                triton_multimax_attention], ids=["chunked", "flex", "fused", "triton"])
def test_fast_backends_refuse_dropout(fn):
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="dropout"):
        fn(q, q, q, torch.zeros(8), dropout_p=0.1)


# The fused C++ kernel: the same cases as chunked, plus lengths that cross its query (64) and key
# (512) blocks, an additive bias, and the no-gradient path (decoding calls the extension directly).
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fused_matches_eager(mask_kind, kv_heads, dtype):
    check(fused_multimax_attention, dtype, mask_kind, kv_heads)


@pytest.mark.parametrize("per_head, affine, softcap", [(True, False, None), (False, True, 2.0), (True, True, 2.0)])
def test_fused_per_head_affine_softcap(per_head, affine, softcap):
    check(fused_multimax_attention, torch.float32, "padded", 2, per_head, affine, softcap)


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "left_padded_window", "padded_bidirectional"])
def test_fused_across_key_blocks(mask_kind):
    # The linear pieces make sigma' jump at b1 and d1: among millions of scores one lands within
    # rounding of a jump, and two correct fp32 kernels that round differently disagree there by the
    # jump (seen: one row of dq off by 2e-3 against fp64, while the eager and chunked kernels flip
    # elsewhere). Jump-free scalars make the long case an exact comparison; short cases keep them.
    check(fused_multimax_attention, torch.float32, mask_kind, 2, per_head=True, affine=True, length=1100, smooth=True)


def test_fused_bias_and_no_grad_path():
    bias = torch.randn(1, H, L, L, generator=torch.Generator().manual_seed(3))
    check(fused_multimax_attention, torch.float32, "padded", 2, per_head=True, affine=True, bias=bias)
    check(fused_multimax_attention, torch.bfloat16, "padded", 2, per_head=True, bias=bias, grads=False)


@pytest.mark.parametrize("kernel", ["fused", "triton"])
def test_fast_kernels_fully_masked_rows_and_decode_alignment(kernel, request):
    if kernel == "triton":
        request.getfixturevalue("triton_interpreter")
    fn = {"fused": fused_multimax_attention, "triton": triton_multimax_attention}[kernel]
    q, k, v = (torch.randn(1, 2, n, 16, requires_grad=True) for n in (3, 40, 40))
    theta = (torch.randn(8) * 0.3).requires_grad_()
    keep = torch.ones(1, 1, 3, 40, dtype=torch.bool)
    keep[..., 1, :] = False
    for kw in (dict(mask=keep), dict(is_causal=True)):
        out, _ = fn(q, k, v, theta, **kw)
        ref, _ = naive_multimax_attention(q, k, v, theta, **kw)
        assert_close(out, ref, what=str(kw))
        grads = torch.autograd.grad(out.sum(), (q, k, v, theta))
        want = torch.autograd.grad(ref.sum(), (q, k, v, theta))
        for g, w in zip(grads, want):
            assert torch.isfinite(g).all()
            assert_close(g, w, what=f"grad {kw}")


# The Triton kernel, run by Triton's interpreter on the CPU (TRITON_INTERPRET=1): the same cases.
@pytest.fixture
def triton_interpreter():
    pytest.importorskip("triton", reason="Triton is part of the dev extra")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("TRITON_INTERPRET=0: the Triton tests need the interpreter or a GPU run")


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("kv_heads, dtype", [(4, torch.float32), (2, torch.bfloat16)], ids=["mha-fp32", "gqa-bf16"])
def test_triton_matches_eager(mask_kind, kv_heads, dtype, triton_interpreter):  # the interpreter is slow: 10 cases
    check(triton_multimax_attention, dtype, mask_kind, kv_heads)


@pytest.mark.parametrize("per_head, affine, softcap", [(True, False, None), (False, True, 2.0), (True, True, 2.0)])
def test_triton_per_head_affine_softcap_bias(per_head, affine, softcap, triton_interpreter):
    bias = torch.randn(1, H, L, L, generator=torch.Generator().manual_seed(3)) if affine else None
    check(triton_multimax_attention, torch.float32, "padded", 2, per_head, affine, softcap, bias=bias)


def test_triton_refuses_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    q = torch.randn(1, 2, 5, 16)
    with pytest.raises(ValueError, match="CUDA tensors"):
        triton_multimax_attention(q, q, q, torch.zeros(8))


@pytest.mark.parametrize("layout, q_len", [
    ("one_token_transposed", 3), ("one_kv_head_of_several", 3), ("static_cache_prefix", 3), ("batch_of_one", 3),
    ("one_kv_head_of_several", 40), ("static_cache_prefix", 40), ("batch_of_one", 40),
], ids=lambda x: x if isinstance(x, str) else ("blas" if x < 32 else "panels"))
def test_fused_addresses_strided_key_value(layout, q_len):
    # Layouts models hand over that torch calls contiguous (or the kernel reads in place): the stride
    # of a size-1 dimension is arbitrary, and a cache buffer is cut along the keys. 40 queries take
    # the forward's path that first copies K transposed into panels (32 queries or more); one key
    # (one_token_transposed) is a decoding layout, and 40 queries on it leave the scalars' gradients
    # pure rounding noise (every probability is 1).
    g = torch.Generator().manual_seed(1)
    B, Hq, D = 2, 4, 8
    K = 9 if q_len == 3 else 45
    if layout == "one_token_transposed":  # k.transpose(1, 2) of [B, 1, Hkv, D]
        k, v = (torch.randn(B, 1, 2, D, generator=g).transpose(1, 2) for _ in range(2))
    elif layout == "one_kv_head_of_several":  # head 0 of [B, 3, K, D]: the batch stride is 3 heads'
        k, v = (torch.randn(B, 3, K, D, generator=g)[:, :1] for _ in range(2))
    elif layout == "static_cache_prefix":  # the first K of K + 7 rows of a buffer
        k, v = (torch.randn(B, 2, K + 7, D, generator=g)[:, :, :K] for _ in range(2))
    else:
        B = 1  # one batch, one key/value head: neither outer stride is read
        k, v = (torch.randn(1, 7, 1, D, generator=g).transpose(1, 2) for _ in range(2))
    q = torch.randn(B, Hq, q_len, D, generator=g).requires_grad_()
    k, v = k.requires_grad_(), v.requires_grad_()
    theta = (torch.randn(8, generator=g) * 0.3).requires_grad_()
    for causal in (False, True):
        out, _ = fused_multimax_attention(q, k, v, theta, is_causal=causal)
        ref, _ = naive_multimax_attention(q, k, v, theta, is_causal=causal)
        assert_close(out, ref, what=f"{layout} causal={causal}")
        for name, got, want in zip("qkvt", torch.autograd.grad(out.sum(), (q, k, v, theta)),
                                   torch.autograd.grad(ref.sum(), (q, k, v, theta))):
            assert_close(got, want, what=f"{layout} causal={causal} grad {name}")
