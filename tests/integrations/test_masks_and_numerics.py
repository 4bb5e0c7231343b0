"""Masks through real models with trained (non-identity) scalars: causality, padding, dtypes."""

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

from hf_multimax import MultiMaxModulator
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
BERT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def perturb_scalars(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiMaxModulator):
                for p in m.parameters(recurse=False):
                    p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model


@pytest.fixture
def llama():
    return perturb_scalars(AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax").eval())


@pytest.fixture
def bert():
    return perturb_scalars(AutoModel.from_config(BertConfig(**BERT), attn_implementation="multimax").eval())


def test_future_tokens_do_not_change_the_past(llama):
    ids = torch.randint(0, 100, (1, 10))
    changed = ids.clone()
    changed[0, 6:] = (changed[0, 6:] + 7) % 100
    a, b = llama(ids).logits, llama(changed).logits
    assert_close(a[:, :6], b[:, :6], what="prefix logits")
    assert (a[:, 6:] - b[:, 6:]).abs().max() > 1e-3  # and the perturbed suffix does change


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_matches_unpadded_sequences_causal(llama, side):
    seqs = [torch.randint(0, 100, (n,)) for n in (9, 5)]
    ids = torch.zeros(2, 9, dtype=torch.long)
    mask = torch.zeros(2, 9, dtype=torch.long)
    for i, s in enumerate(seqs):
        sl = slice(9 - len(s), 9) if side == "left" else slice(0, len(s))
        ids[i, sl], mask[i, sl] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    batched = llama(ids, attention_mask=mask, position_ids=position_ids).logits
    for i, s in enumerate(seqs):
        alone = llama(s[None]).logits[0]
        assert_close(batched[i][mask[i].bool()], alone, what=f"{side}-padded row {i}")


def test_padded_batch_matches_unpadded_sequences_bidirectional(bert):
    seqs = [torch.randint(0, 100, (n,)) for n in (8, 3)]
    ids = torch.zeros(2, 8, dtype=torch.long)
    mask = torch.zeros(2, 8, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    batched = bert(ids, attention_mask=mask).last_hidden_state
    for i, s in enumerate(seqs):
        alone = bert(s[None]).last_hidden_state[0]
        assert_close(batched[i, : len(s)], alone, what=f"bidirectional row {i}")


def test_fully_masked_sequence_is_finite(bert):
    ids = torch.randint(0, 100, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1] = 0
    out = bert(ids, attention_mask=mask).last_hidden_state
    assert torch.isfinite(out).all()
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in bert.parameters() if p.grad is not None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_close_to_fp32(llama, dtype):
    ids = torch.randint(0, 100, (2, 12))
    ref = llama(ids).logits
    low = llama.to(dtype)
    out = low(ids).logits
    assert torch.isfinite(out).all()
    assert all(m.t1.dtype == dtype for m in low.modules() if isinstance(m, MultiMaxModulator))
    assert (out.float() - ref).abs().max() < 0.1


def test_output_attentions_returns_modulated_probabilities(llama):
    ids = torch.randint(0, 100, (1, 7))
    out = llama(ids, output_attentions=True)
    probs = out.attentions[0]
    assert probs.shape == (1, 4, 7, 7)
    assert_close(probs.sum(-1), torch.ones(1, 4, 7), what="rows sum to 1")
    assert torch.equal(probs[0, :, 0, 1:], torch.zeros(4, 6))  # causal: nothing above the diagonal


def test_attentions_requested_by_the_config_are_returned():
    # transformers records attentions asked for by config.output_attentions as well as by the forward's
    # kwarg (transformers' test_retain_grad_hidden_states_attentions); the flag is allowed on an eager
    # config, which a model then switches to multimax.
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=99, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, attn_implementation="eager")
    config.output_attentions = True
    model = tf.LlamaForCausalLM(config).eval()
    model.set_attn_implementation("multimax")
    ids = torch.randint(3, 99, (2, 7))
    with torch.no_grad():
        attentions = model(ids).attentions
    assert len(attentions) == 2 and attentions[0].shape == (2, 4, 7, 7)
