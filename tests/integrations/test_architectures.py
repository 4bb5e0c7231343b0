"""MultiMax at identity init computes what the reference attention computes, on every architecture."""

import pytest
import torch

from hf_multimax.layers import MultiMaxModulator
from tests.conftest import assert_close
from tests.integrations.tiny_models import ARCHITECTURES, CAUSAL_LMS


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One saved random checkpoint per architecture (saved by the reference implementation)."""
    paths = {}
    for name, (make_config, auto, ref_impl, _) in ARCHITECTURES.items():
        torch.manual_seed(0)
        model = auto.from_config(make_config(), attn_implementation=ref_impl)
        path = tmp_path_factory.mktemp(name)
        model.save_pretrained(path)
        paths[name] = path
    return paths


def make_inputs(kind, seq=11, batch=2):
    g = torch.Generator().manual_seed(1)
    if kind == "image":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}, None
    ids = torch.randint(3, 100, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, -4:] = 0  # right padding on the second row
    inputs = {"input_ids": ids, "attention_mask": mask}
    if kind == "cross":
        inputs["encoder_hidden_states"] = torch.randn(batch, 5, 32, generator=g)
        enc_mask = torch.ones(batch, 5, dtype=torch.long)
        enc_mask[1, -2:] = 0
        inputs["encoder_attention_mask"] = enc_mask
    return inputs, mask.bool()


def load(name, path, impl):
    _, auto, _, _ = ARCHITECTURES[name]
    return auto.from_pretrained(path, attn_implementation=impl)


@pytest.mark.parametrize("name", list(ARCHITECTURES))
def test_identity_parity_outputs_and_gradients(name, checkpoints):
    _, _, ref_impl, kind = ARCHITECTURES[name]
    ref = load(name, checkpoints[name], ref_impl)
    mm = load(name, checkpoints[name], "multimax")
    modulators = [m for m in mm.modules() if isinstance(m, MultiMaxModulator)]
    assert len(modulators) >= 2 and all(m.is_identity() for m in modulators)

    inputs, valid = make_inputs(kind)
    out_ref, out_mm = ref(**inputs).logits, mm(**inputs).logits
    if valid is not None and out_ref.dim() == 3:  # per-token logits: compare real tokens only
        out_ref, out_mm = out_ref[valid], out_mm[valid]
    assert_close(out_mm, out_ref, what=f"{name} logits")

    weight = torch.randn_like(out_ref)
    (out_ref * weight).sum().backward()
    (out_mm * weight).sum().backward()
    ref_grads = dict(ref.named_parameters())
    for pname, p in mm.named_parameters():
        if ".multimax." in pname:
            continue
        if ref_grads[pname].grad is None:
            assert p.grad is None or not p.grad.any(), pname
            continue
        # Relative to the gradient's size: the fused kernel sums in another order than eager/SDPA.
        scale = ref_grads[pname].grad.abs().max().clamp_min(1.0)
        assert_close(p.grad / scale, ref_grads[pname].grad / scale, what=f"{name} grad {pname}")
    assert any(m.t1.grad is not None and m.t1.grad.abs() > 0 for m in modulators), "scalars get no gradient"


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_generate_greedy_matches_reference(name, checkpoints):
    _, _, ref_impl, _ = ARCHITECTURES[name]
    ref = load(name, checkpoints[name], ref_impl)
    mm = load(name, checkpoints[name], "multimax")
    ids = torch.randint(3, 100, (2, 6), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding, as for batched generation
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(mm.generate(ids, **kwargs), ref.generate(ids, **kwargs))


@pytest.mark.parametrize("name", CAUSAL_LMS)
def test_decode_with_cache_matches_full_forward_with_trained_scalars(name, checkpoints):
    """With non-identity scalars, step-by-step decoding with the KV cache equals one full forward."""
    mm = load(name, checkpoints[name], "multimax")
    with torch.no_grad():
        for m in mm.modules():
            if isinstance(m, MultiMaxModulator):
                m.t1.fill_(0.3), m.b1.fill_(0.1), m.t4.fill_(0.5), m.d2.fill_(-0.05)
    ids = torch.randint(3, 100, (1, 9), generator=torch.Generator().manual_seed(4))
    full = mm(ids).logits
    out = mm(ids[:, :5], use_cache=True)
    steps = [out.logits]
    cache = out.past_key_values
    for i in range(5, 9):
        out = mm(ids[:, i : i + 1], cache=cache, use_cache=True)
        cache = out.past_key_values
        steps.append(out.logits)
    assert_close(torch.cat(steps, dim=1), full, what=f"{name} cached decode")
