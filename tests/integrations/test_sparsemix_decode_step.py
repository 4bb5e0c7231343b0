"""generate() through SparseMix's one-call decoding step (`fused_sparsemix_decode`) decodes the same
tokens, with the same logits, as the unfused path (scorer, `fused_select_blocks`, fused kernel), with a
static cache and with generate()'s own cache, for each block scorer and GQA; and the step runs."""

import copy

import pytest
import torch
import transformers as tf

import hf_multimax  # noqa: F401
from hf_multimax.integrations import sparsemix_attention
from tests.conftest import assert_close

# Heads of 64 (the step's register path) in GQA groups of 2; blocks of 16, 70 + 10 tokens: sparse.
CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=256, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
IDS = torch.randint(0, 100, (2, 70), generator=torch.Generator().manual_seed(1))


def _model(selector):
    torch.manual_seed(0)
    config = copy.deepcopy(CONFIG)
    config.sparsemix = {"block_size": 16, "top_k": 2, "selector": selector}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix").eval()
    with torch.no_grad():
        for layer in model.model.layers:  # trained-looking: away from the zero start
            layer.self_attn.sparsemix.w_key.normal_()
    return model


def _generate(model, cache, attention_mask):
    kwargs = {} if cache is None else {"cache": tf.StaticCache(config=model.config, max_cache_len=96)}
    with torch.no_grad():
        return model.generate(IDS, attention_mask=attention_mask, max_new_tokens=10, min_new_tokens=10,
                              do_sample=False, output_logits=True, return_dict_in_generate=True, **kwargs)


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "left_padded"])
@pytest.mark.parametrize("cache", [None, "static"], ids=["default", "static"])
@pytest.mark.parametrize("selector", ["block", "block_norms", "block_rotary"])
def test_generate_fused_step_matches_unfused(selector, cache, padded, monkeypatch):
    model = _model(selector)
    attention_mask = torch.ones_like(IDS)
    if padded:
        attention_mask[1, :9] = 0
    calls = []
    step = sparsemix_attention.fused_sparsemix_decode
    monkeypatch.setattr(sparsemix_attention, "fused_sparsemix_decode", lambda *a, **k: calls.append(1) or step(*a, **k))
    fused = _generate(model, cache, attention_mask)
    assert len(calls) == 2 * 9, "every decoding step of both layers ran the fused step"
    monkeypatch.setattr(sparsemix_attention, "DECODE_FEATURES", {})  # the unfused path
    calls.clear()
    unfused = _generate(model, cache, attention_mask)
    assert not calls
    assert torch.equal(fused.sequences, unfused.sequences)
    for a, b in zip(fused.logits, unfused.logits):
        assert_close(a, b, what=f"{selector} {cache}")


def test_deep_copied_cache_keeps_the_key_summary():
    """transformers' way to reuse a prefilled prompt cache, `copy.deepcopy(prompt_cache)`, takes the
    summary along (valid for the copied keys: no recomputation from every key at the first step), and
    decodes what a freshly prefilled cache decodes; a summary gone stale before the copy is not taken."""
    from hf_multimax.integrations.sparsemix_decoding import key_summary

    model = _model("block_rotary")
    prompt = IDS[:1, :69]  # 5 blocks of 16: the sparse path, which keeps a summary
    with torch.no_grad():
        cache = tf.StaticCache(config=model.config, max_cache_len=96)
        model(prompt, cache=cache, use_cache=True)
        copied = copy.deepcopy(cache)
        for original, layer in zip(cache.layers, copied.layers):
            kept, taken = key_summary(original), key_summary(layer)
            assert kept is not None and taken is not None
            assert taken.data.data_ptr() != kept.data.data_ptr() and torch.equal(taken.data, kept.data)

        def continuation(c):
            return model.generate(IDS[:1, :70], attention_mask=torch.ones_like(IDS[:1, :70]), cache=c, max_new_tokens=8,
                                  do_sample=False, output_logits=True, return_dict_in_generate=True)

        fresh = tf.StaticCache(config=model.config, max_cache_len=96)
        model(prompt, cache=fresh, use_cache=True)
        got, want = continuation(copied), continuation(fresh)
        assert torch.equal(got.sequences, want.sequences)
        for a, b in zip(got.logits, want.logits):
            assert_close(a, b, what="deep-copied cache")
        cache.layers[0].keys.add_(0)  # an in-place edit: the summary is stale, the copy must not take it
        stale = copy.deepcopy(cache)
        assert key_summary(stale.layers[0]) is None and key_summary(stale.layers[1]) is not None
