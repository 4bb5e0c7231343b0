"""The eager MultiMax kernel against a plain reference written here, outputs and all gradients."""

import pytest
import torch

from hf_multimax.ops.multimax import THETA_NAMES, naive_multimax_attention, naive_multimax_modulate
from tests.conftest import assert_close


def plain_sigma(x, t1, t2, t3, t4, b1, d1, b2, d2):
    # Written piece by piece with torch.where, unlike the kernel's relu form.
    out = x.clone()
    out = out + torch.where(x < b1, t1 * (b1 - x), torch.zeros_like(x))
    out = out + torch.where(x > d1, t2 * (x - d1), torch.zeros_like(x))
    out = out + torch.where(x < b2, t3 * (b2 - x) ** 2, torch.zeros_like(x))
    out = out + torch.where(x > d2, t4 * (x - d2) ** 2, torch.zeros_like(x))
    return out


def plain_attention(q, k, v, theta, mask, scale):
    """Per (batch, head) loop; theta [8] or [8, H]; mask [B, Q, K] bool or None."""
    B, H, Q, _ = q.shape
    groups = H // k.shape[1]
    out = torch.zeros(B, H, Q, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            th = theta if theta.dim() == 1 else theta[:, h]
            s = (q[b, h].double() @ k[b, h // groups].double().T) * scale
            s = plain_sigma(s, *th.double())
            keep = torch.ones(Q, k.shape[2], dtype=torch.bool) if mask is None else mask[b]
            for i in range(Q):
                if keep[i].any():
                    p = torch.softmax(s[i][keep[i]], dim=-1)
                    out[b, h, i] = p @ v[b, h // groups].double()[keep[i]]
    return out


def make_mask(kind, B, Q, K):
    if kind == "bidirectional":
        return None
    causal = torch.ones(Q, K, dtype=torch.bool).tril(K - Q)
    if kind == "causal":
        return causal.expand(B, Q, K).clone()
    lengths = torch.tensor([K, K - 3, 2])[:B]
    pad = torch.arange(K)[None, :] < lengths[:, None]  # right padding
    if kind == "padded":
        return pad[:, None, :].expand(B, Q, K) & causal
    if kind == "left_padded":
        return pad.flip(-1)[:, None, :].expand(B, Q, K) & causal
    raise ValueError(kind)


def random_theta(per_head, H, scale=0.3):
    shape = (8, H) if per_head else (8,)
    theta = torch.randn(shape) * scale
    return theta


def test_modulate_identity_at_zero():
    x = torch.randn(3, 4, 5, 6) * 10
    assert torch.equal(naive_multimax_modulate(x, torch.zeros(8)), x)


def test_modulate_hand_computed():
    # t1=0.5 below b1=-1; t2=2 above d1=1; t3=0.25 below b2=0; t4=1 above d2=2.
    theta = torch.tensor([0.5, 2.0, 0.25, 1.0, -1.0, 1.0, 0.0, 2.0])
    x = torch.tensor([-3.0, -0.5, 0.5, 1.5, 3.0])
    expected = torch.tensor(
        [
            -3.0 + 0.5 * 2.0 + 0.25 * 9.0,  # below b1 and below b2
            -0.5 + 0.25 * 0.25,  # below b2 only
            0.5,  # inside every threshold: unchanged
            1.5 + 2.0 * 0.5,  # above d1
            3.0 + 2.0 * 2.0 + 1.0 * 1.0,  # above d1 and d2
        ]
    )
    assert torch.allclose(naive_multimax_modulate(x, theta), expected)


def test_modulate_affine():
    x = torch.randn(10)
    affine = torch.tensor([1.0, 0.5])  # scale 2, shift 0.5
    assert torch.allclose(naive_multimax_modulate(x, torch.zeros(8), affine), 2 * x + 0.5)


@pytest.mark.parametrize("mask_kind", ["causal", "padded", "left_padded", "bidirectional"])
@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_attention_matches_plain_reference_fp32(mask_kind, per_head, kv_heads):
    B, H, Q, K, D = 3, 4, 7, 7, 6
    q = torch.randn(B, H, Q, D, requires_grad=True)
    k = torch.randn(B, kv_heads, K, D, requires_grad=True)
    v = torch.randn(B, kv_heads, K, D, requires_grad=True)
    theta = random_theta(per_head, H).requires_grad_()
    mask = make_mask(mask_kind, B, Q, K)
    th = theta[:, :, None, None] if per_head else theta
    out, _ = naive_multimax_attention(q, k, v, th, scale=D**-0.5, mask=None if mask is None else mask[:, None])
    expected = plain_attention(q, k, v, theta, mask, D**-0.5)
    assert_close(out, expected, what="output")

    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, theta), grad_out)
    expected_grads = torch.autograd.grad(expected, (q, k, v, theta), grad_out.double())
    for name, g, e in zip(("q", "k", "v", "theta"), grads, expected_grads):
        assert_close(g, e, what=f"grad {name}")
    assert grads[3].abs().sum() > 0, "the MultiMax scalars must receive gradient"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_low_precision_against_fp32(dtype):
    B, H, Q, D = 2, 4, 9, 8
    q, k, v = (torch.randn(B, H, Q, D) for _ in range(3))
    theta = random_theta(False, H)
    mask = make_mask("padded", B, Q, Q)[:, None]
    ref, _ = naive_multimax_attention(q, k, v, theta, mask=mask)
    leaves = [t.to(dtype).requires_grad_() for t in (q, k, v)]
    out, probs = naive_multimax_attention(*leaves, theta, mask=mask)
    assert out.dtype == dtype and probs.dtype == torch.float32
    assert_close(out.float(), ref, dtype=dtype, what=f"{dtype} output")
    out.float().sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)


def test_theta_gradcheck_float64():
    q, k, v = (torch.randn(1, 2, 5, 3, dtype=torch.float64) for _ in range(3))
    theta = (torch.randn(8, dtype=torch.float64) * 0.5).requires_grad_()
    mask = make_mask("causal", 1, 5, 5)[:, None]
    assert torch.autograd.gradcheck(lambda t: naive_multimax_attention(q, k, v, t, mask=mask)[0], (theta,))


def test_fully_masked_rows_give_zeros_not_nan():
    q, k, v = (torch.randn(2, 2, 4, 8, requires_grad=True) for _ in range(3))
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, 1] = False  # query 1 of batch 0 sees nothing
    mask[1] = False  # batch 1 sees nothing at all
    theta = random_theta(False, 2)
    out, probs = naive_multimax_attention(q, k, v, theta, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :, 1], torch.zeros_like(out[0, :, 1])) and torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(probs[1], torch.zeros_like(probs[1]))
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_modulate_then_mask_with_quadratic_term():
    # A quadratic piece below b2 would turn an additive finfo.min mask into +inf; the kernel masks
    # after the modulator so masked keys get exactly zero weight.
    q, k, v = (torch.randn(1, 1, 4, 8) for _ in range(3))
    theta = torch.zeros(8)
    theta[2] = 1.0  # t3
    theta[6] = 5.0  # b2
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool).tril()
    out, probs = naive_multimax_attention(q, k, v, theta, mask=mask)
    assert torch.isfinite(out).all()
    assert torch.equal(probs[..., ~mask[0, 0]], torch.zeros_like(probs[..., ~mask[0, 0]]))


def test_fp16_large_scores_stay_finite():
    q = torch.randn(1, 2, 16, 64, dtype=torch.float16) * 30  # scores in the thousands
    k = torch.randn(1, 2, 16, 64, dtype=torch.float16) * 30
    v = torch.randn(1, 2, 16, 64, dtype=torch.float16)
    theta = torch.tensor([0.5, 0.5, 0.1, 0.1, -1.0, 1.0, -1.0, 1.0])
    out, probs = naive_multimax_attention(q, k, v, theta, is_causal=True)
    assert torch.isfinite(out).all() and torch.isfinite(probs).all()


def test_causal_alignment_for_decoding():
    # One query against 6 cached keys sees all of them; 2 queries see 5 and 6.
    q, k, v = torch.randn(1, 1, 2, 4), torch.randn(1, 1, 6, 4), torch.randn(1, 1, 6, 4)
    _, probs = naive_multimax_attention(q, k, v, torch.zeros(8), is_causal=True)
    assert (probs[0, 0, 0, 5] == 0) and (probs[0, 0, 0, :5] > 0).all() and (probs[0, 0, 1] > 0).all()


@pytest.mark.parametrize(
    "bad, message",
    [
        (dict(theta=torch.zeros(7)), "8 rows"),
        (dict(key=torch.randn(1, 3, 5, 4)), "multiple of key/value heads"),
        (dict(query=torch.randn(4, 5, 4)), "4-D"),
    ],
)
def test_bad_shapes_raise(bad, message):
    args = dict(query=torch.randn(1, 4, 5, 4), key=torch.randn(1, 2, 5, 4), value=torch.randn(1, 2, 5, 4), theta=torch.zeros(8))
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        naive_multimax_attention(args["query"], args["key"], args["value"], args["theta"])


def test_theta_names_order():
    assert THETA_NAMES == ("t1", "t2", "t3", "t4", "b1", "d1", "b2", "d2")
