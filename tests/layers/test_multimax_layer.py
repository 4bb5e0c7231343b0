import pytest
import torch

from hf_multimax import MultiMaxModulator, MultiMaxSettings
from hf_multimax.ops.multimax import THETA_NAMES


def test_settings_defaults_and_round_trip():
    settings = MultiMaxSettings()
    assert settings.to_dict() == {"order": 2, "per_head": False, "affine": False, "output_head": False, "backend": "auto"}
    assert MultiMaxSettings.from_dict(settings.to_dict()) == settings
    assert MultiMaxSettings.from_dict(None) == settings


@pytest.mark.parametrize(
    "values, message",
    [
        ({"order": 0}, r"multimax.order=0 .*allowed values: \(1, 2\)"),
        ({"order": "2"}, "multimax.order='2'"),
        ({"backend": "xformers"}, r"multimax.backend='xformers' .*allowed values: \('auto', 'eager', 'chunked', 'fused', 'flex', 'triton'\)"),
        ({"affine": 1}, "multimax.affine=1 must be a bool"),
        ({"output_head": None}, "multimax.output_head=None must be a bool"),
        ({"orders": 2}, r"unknown multimax setting\(s\) \['orders'\]; allowed keys"),
        ([("order", 2)], "must be a dict"),
    ],
)
def test_bad_settings(values, message):
    with pytest.raises(ValueError, match=message):
        MultiMaxSettings.from_dict(values)


@pytest.mark.parametrize("order, n_params", [(1, 4), (2, 8)])
def test_modulator_parameters_and_identity(order, n_params):
    m = MultiMaxModulator(order=order)
    assert len(list(m.parameters())) == n_params and m.is_identity()
    x = torch.randn(3, 7) * 5
    assert torch.equal(m(x), x)
    theta = m.theta()
    assert theta.shape == (8,) and not theta.any()


def test_theta_follows_names_and_carries_gradient():
    m = MultiMaxModulator(order=2, num_heads=3, affine=True)
    with torch.no_grad():
        for i, name in enumerate(THETA_NAMES):
            getattr(m, name).fill_(i + 1)
    theta = m.theta()
    assert theta.shape == (8, 3) and torch.equal(theta[:, 0], torch.arange(1.0, 9.0))
    theta.sum().backward()
    assert all(getattr(m, n).grad is not None for n in THETA_NAMES)
    assert m.affine_params().shape == (2, 3)
    with pytest.raises(ValueError, match="per-head"):
        m(torch.randn(2, 2))


def test_reset_parameters_restores_identity():
    m = MultiMaxModulator(affine=True)
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(0.7)
    assert not m.is_identity()
    m.reset_parameters()
    assert m.is_identity()


@pytest.mark.parametrize("kwargs, message", [({"order": 3}, "order=3"), ({"num_heads": 0}, "num_heads=0")])
def test_modulator_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MultiMaxModulator(**kwargs)


def test_params_follow_every_change():
    """The layer keeps no state between calls (reuse without gradient is the attention functions'
    plan cache, `attention_utils.PLANS`): any change shows on the next call."""
    mod = MultiMaxModulator(order=2, num_heads=3, affine=True)
    with torch.no_grad():
        theta, affine = mod()
        assert not theta.any()
        mod.t1.fill_(0.5)  # in place (an optimizer step, a manual edit)
        assert torch.equal(mod()[0][0], torch.full((3,), 0.5))
        mod.load_state_dict({**mod.state_dict(), "affine_shift": torch.ones(3)})  # copied in
        assert torch.equal(mod()[1][1], torch.ones(3))
        mod.t2 = torch.nn.Parameter(torch.full((3,), 2.0))  # replaced
        assert torch.equal(mod()[0][1], torch.full((3,), 2.0))
    theta, _ = mod()  # with gradient: a fresh stack that autograd sees
    assert theta.requires_grad
