"""Metrics against hand-computed cases."""

import math

import pytest
import torch

from hf_multimax.analysis.metrics import (
    attention_to_sink,
    entropy,
    multimodality,
    selection_margin,
    sparsity,
    top_k_mass,
)


def test_entropy_uniform_and_one_hot():
    uniform = torch.full((2, 4), 0.25)
    one_hot = torch.tensor([[1.0, 0, 0, 0]])
    assert torch.allclose(entropy(uniform), torch.ones(2))
    assert torch.allclose(entropy(uniform, normalized=False), torch.full((2,), math.log(4)))
    assert entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)


def test_top_k_mass_sink_and_margin():
    p = torch.tensor([[0.1, 0.6, 0.3, 0.0]])
    assert top_k_mass(p, 1).item() == pytest.approx(0.6)
    assert top_k_mass(p, 2).item() == pytest.approx(0.9)
    assert attention_to_sink(p).item() == pytest.approx(0.1)
    assert selection_margin(p).item() == pytest.approx(math.log(2.0))
    x = torch.tensor([[0.5, 2.0, 1.0]])
    assert selection_margin(torch.softmax(x, -1)).item() == pytest.approx(1.0)  # the score gap
    with pytest.raises(ValueError, match="k=5"):
        top_k_mass(p, 5)


def test_multimodality_hand_computed():
    x = torch.tensor([2.0, 1.0, 0.5, -1.0])
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    # entries strictly between eps=0 and x_max: 1.0 and 0.5 -> (0.5-0.3) + (0.5-0.15) = 0.55
    assert multimodality(x, p).item() == pytest.approx(1 - 0.55 / 4)


def test_sparsity_hand_computed():
    x = torch.tensor([2.0, -1.0, -2.0, 0.5])
    p = torch.tensor([0.7, 0.01, 0.0, 0.29])
    # entries below eps=0: p=0.01 and p=0 -> exp(-1) + exp(0)
    assert sparsity(x, p, s=0.01).item() == pytest.approx((math.exp(-1) + 1) / 4)
    with pytest.raises(ValueError, match="s=0"):
        sparsity(x, p, s=0)


def test_batched_shapes():
    scores = torch.randn(2, 3, 5, 7)
    probs = torch.softmax(scores, -1)
    for value in (entropy(probs), top_k_mass(probs, 2), selection_margin(probs), multimodality(scores, probs),
                  sparsity(scores, probs)):
        assert value.shape == (2, 3, 5)
