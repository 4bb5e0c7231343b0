import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# No GPU here: Triton kernels run in Triton's interpreter, which reads this before triton is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

import hf_multimax  # noqa: E402,F401  (registers the attention implementations)

# One tolerance table, keyed by dtype of the inputs: (atol, rtol) against an fp32 reference.
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float64: (1e-10, 1e-10),
    torch.bfloat16: (2e-2, 2e-2),
    torch.float16: (2e-3, 2e-3),
}


def assert_close(actual, expected, dtype=torch.float32, what=""):
    atol, rtol = TOLERANCES[dtype]
    actual, expected = actual.double(), expected.double()
    diff = (actual - expected).abs()
    rel_rms = (diff.square().mean().sqrt() / expected.square().mean().sqrt().clamp_min(1e-30)).item()
    assert torch.allclose(actual, expected, atol=atol, rtol=rtol), (
        f"{what}: max abs diff {diff.max().item():.3e}, relative RMS {rel_rms:.3e} (atol {atol}, rtol {rtol})"
    )


# Gradients that add a term per score (the MultiMax scalars': one term per score of a head, millions
# in a long call) are checked element by element against a float64 reference, within the first-order
# rounding bound of such a sum (Higham, Accuracy and Stability of Numerical Algorithms, ch. 4):
#     |error| <= (SUM_CHAIN + d + TERM_ROUNDINGS) * u * M
# u    the unit roundoff of fp32, which the kernels compute in (bf16 cases round dO to bf16 on the way in,
#      which no fp32 bound covers: they keep the relative TOLERANCES above);
# SUM_CHAIN  the longest chain of fp32 additions a kernel makes for one gradient: the fused kernels sum a
#      tile row of at most 1024 keys (dense: 512; SparseMix: a run of selected blocks) over 8 (AVX2) or 16
#      (AVX-512) lanes, then the lanes and a short tail (1024 / 8 + 2 * 8 = 144), and add rows in
#      float64; chunked and triton add their tiles in float64;
# d    the head dim: each term holds dP = dO.V and delta = dO.O, dot products of length d;
# TERM_ROUNDINGS  the few roundings inside one term (score, exp, modulator, products);
# M    sum over scores of P * (|dO|.|V| + |dO|.|O|) * |d term / d scalar| in float64 (`scalar_grad_bounds`),
#      so the bound holds wherever the terms cancel. It does not grow with the number of scores faster
#      than M itself: a kernel whose error did (a plain fp32 running sum) fails it at ~1k x 1k scores.
UNIT_ROUNDOFF = 2.0**-24
SUM_CHAIN = 1024 // 8 + 2 * 8
TERM_ROUNDINGS = 16


def scalar_grad_bounds(q, k, v, theta, affine, grad_out, **kw):
    """`(theta_grad, affine_grad, theta_bound, affine_bound)`: the float64 reference gradients of the
    MultiMax scalars for upstream gradient `grad_out`, and the rounding bound above for each element
    (affine ones None without affine). `kw` as for `naive_attention` (mask, is_causal, bias, softcap)."""
    from hf_multimax.ops.multimax.naive import naive_multimax_modulate, naive_multimax_modulate_backward
    from hf_multimax.ops.naive_attention import naive_attention

    q64, k64, v64 = (t.detach().double() for t in (q, k, v))
    th = theta.detach().double().requires_grad_()
    af = None if affine is None else affine.detach().double().requires_grad_()
    seen = {}

    def score_mod(s):  # keeps the scores the modulator reads
        seen["s"] = s.detach()
        return naive_multimax_modulate(s, th, af)

    out, _ = naive_attention(q64, k64, v64, score_mod=score_mod, **kw)
    grads = torch.autograd.grad(out, [th] + ([af] if af is not None else []), grad_out.double())
    s = seen["s"]
    # The magnitudes the terms' dot products carry: the same attention with |V| and |dO|.
    out_abs, probs = naive_attention(q64.requires_grad_(), k64, v64.abs(), score_mod=lambda x: naive_multimax_modulate(x, th.detach(),
                                     None if af is None else af.detach()), **kw)
    probs.retain_grad()
    (out_abs * grad_out.double().abs()).sum().backward()
    dp_abs = probs.grad  # |dO| . |V|^T per score
    delta_abs = (grad_out.double().abs() * out_abs).sum(-1, keepdim=True)
    mag = probs.detach() * (dp_abs + delta_abs)
    factor = (SUM_CHAIN + q.shape[-1] + TERM_ROUNDINGS) * UNIT_ROUNDOFF
    th_abs = th.detach().clone()
    th_abs[:4] = th_abs[:4].abs()  # |t1..t4|; the breakpoints stay where they are
    _, theta_mag, _ = naive_multimax_modulate_backward(mag, s, th_abs, None if af is None else af.detach())
    theta_bound = factor * theta_mag.abs()
    affine_bound = None
    if af is not None:
        slope = naive_multimax_modulate_backward(torch.ones_like(s), s, th.detach(), af.detach())[0].abs()
        slope = slope / (1 + af.detach()[0]).abs()  # |sigma'(x)|

        def reduce(t):
            return t.sum() if af.dim() == 1 else t.sum_to_size(af.shape[1:])

        affine_bound = factor * torch.stack([reduce(mag * slope * s.abs()), reduce(mag * slope)])
    return grads[0], grads[1] if af is not None else None, theta_bound, affine_bound


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(42)
