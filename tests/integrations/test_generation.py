"""Generation with every cache transformers offers: MultiMax at identity gives SDPA's greedy tokens
and logits with static and dynamic caches on every backend; SparseMix's short inputs match SDPA with a
static cache (its sparse decoding: tests/integrations/test_sparsemix_decoding.py). Masks SDPA would refuse are refused."""

import copy

import pytest
import torch
import transformers as tf

import hf_multimax  # noqa: F401
from hf_multimax.integrations.attention_utils import PLANS
from hf_multimax.integrations.multimax_attention import multimax_attention_forward
from tests.conftest import assert_close

CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512)


def pair(attn, **settings):
    torch.manual_seed(0)
    ref = tf.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="sdpa").eval()
    config = copy.deepcopy(CONFIG)
    for key, value in settings.items():
        setattr(config, key, value)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=attn).eval()
    model.load_state_dict(ref.state_dict(), strict=False)
    return model, ref


def generate(model, ids, cache):
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **extra)


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("backend", ["auto", "eager", "chunked", "fused", "flex"])
def test_multimax_generate_matches_sdpa(backend, cache, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    model, ref = pair(f"multimax:{backend}")
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    got, want = generate(model, ids, cache), generate(ref, ids, cache)
    assert torch.equal(got.sequences, want.sequences)
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b, what=f"{backend} {cache} logits")


def test_sparsemix_static_cache_short_inputs_match_sdpa():
    model, ref = pair("sparsemix", sparsemix={"block_size": 8, "top_k": 2})
    short = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(generate(model, short, "static").sequences, generate(ref, short, "static").sequences)


def test_sparsemix_dense_path_returns_attention_probabilities():
    model, ref = pair("sparsemix", sparsemix={"block_size": 8, "top_k": 2})
    eager = tf.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation="eager").eval()
    eager.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    got, want = model(ids, output_attentions=True).attentions, eager(ids, output_attentions=True).attentions
    assert len(got) == 2
    for a, b in zip(got, want):
        assert_close(a, b, what="probabilities")


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.ones(1, 1, 5, 7, dtype=torch.bool), r"shape \(1, 1, 5, 7\) does not fit 5 keys"),
        (torch.ones(1, 1, 5, 5, dtype=torch.long), "dtype torch.int64 is not supported"),
    ],
    ids=["wider", "integer"],
)
def test_masks_sdpa_would_refuse_are_refused(mask, message):
    model, _ = pair("multimax")
    attn = model.model.layers[0].self_attn
    q, k = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(ValueError, match=message):
        multimax_attention_forward(attn, q, k, k, mask, scaling=8**-0.5)


def test_decoding_fast_path_follows_every_change():
    """Unmasked no-gradient calls reuse the last call's scalars and kernel; each change below must
    show in the next output, as the full path (backend 'eager', the reference) computes it."""
    model, _ = pair("multimax")
    ref, _ = pair("multimax:eager")
    ids = torch.randint(0, 100, (1, 7), generator=torch.Generator().manual_seed(4))

    def same(step):
        with torch.no_grad():
            for m in (model, ref):
                step(m)
            got, want = model(ids).logits, ref(ids).logits
        assert_close(got, want, what="fast path vs eager")
        return got

    first = same(lambda m: None)
    assert "decoding" in PLANS.held(model.model.layers[0].self_attn), "an unmasked no-gradient call keeps a plan"
    changed = same(lambda m: m.model.layers[0].self_attn.multimax.t1.fill_(0.4))  # in place
    assert not torch.equal(first, changed)
    same(lambda m: m.load_state_dict({**m.state_dict(), "model.layers.1.self_attn.multimax.t3": torch.full((1,), -0.2)}))
    same(lambda m: m.config.multimax.update(affine=False))  # an edit of the settings dict (same structure)
    with pytest.raises(ValueError, match="set_attn_implementation"):  # a shape edit is still refused
        same(lambda m: m.config.multimax.update(order=1))
    model.config.multimax.update(order=2)
    ref.config.multimax.update(order=2)
    same(lambda m: m.to(torch.bfloat16).to(torch.float32))  # `.to()` replaces the storage, not the version
    model.train()
    ref.train()
    with torch.no_grad():  # training mode and masks take the full path
        assert_close(model(ids, attention_mask=torch.ones_like(ids)).logits,
                     ref(ids, attention_mask=torch.ones_like(ids)).logits, what="masked")
