"""SparseMix decoding with a KV cache: the selector's key summary grows step by step
(`integrations/sparsemix_decoding.py`). Every result is compared with the same model recomputing the
summary from all keys at each step (its pre-hook removed), for both selectors, dynamic and static
caches, and after whatever replaces or modifies the cached keys (crop, beam reordering, a reused
static cache, a weight edit)."""

import copy

import pytest
import torch
import transformers as tf

import hf_multimax  # noqa: F401
from hf_multimax.integrations.attach import _set_host_hook
from hf_multimax.integrations.sparsemix_decoding import key_summary
from tests.conftest import assert_close

CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512)
SETTINGS = {"block_size": 8, "top_k": 2}


def models(selector):
    """(model, reference): the same weights, a trained-looking selector; the reference never reuses a
    summary (no pre-hook), so it recomputes the selection from all keys at every step."""
    torch.manual_seed(0)
    config = copy.deepcopy(CONFIG)
    config.sparsemix = {**SETTINGS, "selector": selector}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix").eval()
    with torch.no_grad():
        for layer in model.model.layers:
            scorer = layer.self_attn.sparsemix
            (scorer.w_key if selector != "token" else scorer.w_weight).normal_()
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        _set_host_hook(layer.self_attn, None)
    return model, ref


def generate(model, ids, **kwargs):
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                              output_logits=True, return_dict_in_generate=True, **kwargs)


def assert_same(got, want, what):
    assert torch.equal(got.sequences, want.sequences), what
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b, what=what)


def gen(seed):
    return torch.Generator().manual_seed(seed)


IDS = torch.randint(0, 100, (2, 61), generator=gen(1))  # 8 blocks of 8: sparse
OTHER = torch.randint(0, 100, (2, 61), generator=gen(2))


@pytest.mark.parametrize("selector", ["block", "block_norms", "block_rotary", "token"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_decoding_with_the_growing_summary_matches_recomputing_it(selector, cache):
    model, ref = models(selector)
    extra = {"cache_implementation": "static"} if cache == "static" else {}
    got = generate(model, IDS, **extra)
    assert_same(got, generate(ref, IDS, **extra), f"{selector} {cache}")


@pytest.mark.parametrize("selector", ["block", "token"])
def test_summary_is_kept_on_the_cache_and_extended(selector):
    model, _ = models(selector)
    cache = tf.DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, cache=cache, use_cache=True)
        first = key_summary(cache.layers[0])
        assert first.tokens == IDS.shape[1]
        model(IDS[:, :1], cache=cache, use_cache=True)
    second = key_summary(cache.layers[0])
    assert second.tokens == IDS.shape[1] + 1
    # Extended, not recomputed: the first tokens' summary (per token, or per complete block) is the
    # very same values.
    rows = first.data.shape[2] if selector == "token" else IDS.shape[1] // SETTINGS["block_size"]
    assert torch.equal(second.data[:, :, :rows], first.data[:, :, :rows])


@pytest.mark.parametrize("selector", ["block", "token"])
def test_beam_search_reordering_and_a_reused_static_cache(selector):
    model, ref = models(selector)
    assert_same(generate(model, IDS, num_beams=3), generate(ref, IDS, num_beams=3), "beam search")
    # One static cache object, two prompts: its reset zeroes the buffer in place, which must not leave
    # the first prompt's summary in use.
    other = torch.randint(0, 100, (2, 61), generator=torch.Generator().manual_seed(7))
    cache = tf.StaticCache(config=model.config, max_cache_len=96)
    ref_cache = tf.StaticCache(config=ref.config, max_cache_len=96)
    for prompt in (IDS, other):
        got = generate(model, prompt, cache=cache)
        want = generate(ref, prompt, cache=ref_cache)
        assert_same(got, want, "reused static cache")
        cache.reset()
        ref_cache.reset()


@pytest.mark.parametrize("selector", ["block", "token"])
def test_crop_and_a_weight_edit_between_steps(selector):
    model, ref = models(selector)
    caches = {m: tf.DynamicCache(config=m.config) for m in (model, ref)}
    outs = {}
    with torch.no_grad():
        for m, cache in caches.items():
            m(IDS, cache=cache, use_cache=True)
            cache.crop(-11)  # 61 -> 50 tokens: a crop replaces the keys: the summary of 61 tokens no longer fits
            first = m(IDS[:, 50:53], cache=cache, use_cache=True).logits
            for layer in m.model.layers:  # an in-place edit of the selector's weights
                layer.self_attn.sparsemix.w_key.mul_(-1.0)
            outs[m] = (first, m(IDS[:, 53:54], cache=cache, use_cache=True).logits)
    for a, b in zip(outs[model], outs[ref]):
        assert_close(a, b, what="after crop / weight edit")


@pytest.mark.parametrize("selector", ["block", "token"])
def test_an_in_place_edit_of_the_cache_and_a_cropped_static_cache(selector):
    """What keeps the key tensor but changes what it holds: an in-place edit (its version counter
    moves) and a static cache cropped without touching its buffer (the keys no longer extend the
    summarised ones)."""
    model, ref = models(selector)
    outs = {}
    with torch.no_grad():
        for m in (model, ref):
            cache = tf.DynamicCache(config=m.config)
            m(IDS, cache=cache, use_cache=True)
            for layer in cache.layers:  # blocks 2-4 (not the sink, not the local block) replaced
                layer.keys[:, :, 16:40].copy_(torch.randn(layer.keys[:, :, 16:40].shape, generator=gen(3)) * 5)
            edited = m(IDS[:, :1], cache=cache, use_cache=True).logits
            static = tf.StaticCache(config=m.config, max_cache_len=96)
            m(IDS, cache=static, use_cache=True)
            static.crop(-25)  # 61 -> 36 tokens; the buffer keeps its rows 36..60
            cropped = [m(OTHER[:, 36:39], cache=static, use_cache=True).logits]
            for t in range(39, 52):  # until blocks 4 and 5 (rows 32..47) are candidates, not local
                cropped.append(m(OTHER[:, t : t + 1], cache=static, use_cache=True).logits)
            outs[m] = edited, *cropped
    for a, b in zip(outs[model], outs[ref]):
        assert_close(a, b, what="in-place edit / cropped static cache")


@pytest.mark.parametrize("selector", ["block", "token"])
def test_two_caches_holding_the_same_keys_extend_apart(selector):
    """The summary grows in place, in room left in its storage. Two caches holding the same key
    tensors (so the same summary) and continuing with different tokens must not write over each
    other's entries: only the newest summary of a storage writes in place."""
    model, ref = models(selector)
    outs = {}
    with torch.no_grad():
        for m in (model, ref):
            first = tf.DynamicCache(config=m.config)
            m(IDS, cache=first, use_cache=True)
            m(IDS[:, :1], cache=first, use_cache=True)  # the summary now has room
            second = copy.deepcopy(first)
            for a, b in zip(first.layers, second.layers):
                b.keys, b.values = a.keys, a.values
            logits = []
            for t in range(3):
                logits.append(m(IDS[:, t + 1 : t + 2], cache=first, use_cache=True).logits)
                logits.append(m(OTHER[:, t : t + 1], cache=second, use_cache=True).logits)
            outs[m] = logits
    for a, b in zip(outs[model], outs[ref]):
        assert_close(a, b, what="two caches sharing keys")


@pytest.mark.parametrize("selector", ["block", "token"])
def test_a_static_cache_decodes_as_the_dynamic_one(selector):
    """The static cache hands over its whole buffer and SparseMix cuts it where the mask stops (found
    once per forward and kept on the mask); the dynamic cache holds just the real keys."""
    model, _ = models(selector)
    assert_same(generate(model, IDS, cache_implementation="static"), generate(model, IDS), f"{selector} static")


@pytest.mark.parametrize("selector", ["block", "block_rotary"])
def test_the_last_block_is_a_placeholder_whose_score_is_never_read(selector):
    """Causal attention keeping the local block never ranks the last key block, so the summary leaves
    it a zero placeholder until a block follows it (no summary of a partial block at every step)."""
    from hf_multimax.ops.sparsemix import SELECTORS, select_sparsemix_blocks
    from hf_multimax.ops.sparsemix.fused import fused_block_statistics

    model, _ = models(selector)
    cache = tf.DynamicCache(config=model.config)
    bs = SETTINGS["block_size"]
    with torch.no_grad():
        model(IDS, cache=cache, use_cache=True)  # 61 tokens: blocks 0-6 whole, block 7 holds 5
        summary, key = key_summary(cache.layers[0]), cache.layers[0].keys
        weights = model.model.layers[0].self_attn.sparsemix()
        # The model runs the fused backend, which pools with the extension (the reference's sums round
        # differently in the last bit).
        whole = SELECTORS[selector].summarize(key, weights, bs, statistics=fused_block_statistics)
        torch.testing.assert_close(whole, SELECTORS[selector].summarize(key, weights, bs))
        assert (summary.units, summary.summarised) == (8, 7)
        assert not summary.data[:, :, 7].any() and whole[:, :, 7].any()
        assert torch.equal(summary.data[:, :, :7], whole[:, :, :7])
        # The selection is the same as with the block's real summary: for a decoding step and for a
        # chunk of queries ending there (its earlier query blocks see the last block in their future).
        for q_len in (1, 20):
            query = torch.randn(2, 4, q_len, 8, generator=gen(q_len))
            got, want = (select_sparsemix_blocks(query, key, weights, block_size=bs, top_k=2, selector=selector,
                                                 key_summary=s)[1:] for s in (summary.data, whole))
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), q_len
        model(IDS[:, :3], cache=cache, use_cache=True)  # 64 tokens: block 7 whole, still the last
        model(IDS[:, :1], cache=cache, use_cache=True)  # 65: block 7 is now a candidate
    summary, key = key_summary(cache.layers[0]), cache.layers[0].keys
    assert (summary.units, summary.summarised) == (9, 8)
    assert_close(summary.data[:, :, :8], SELECTORS[selector].summarize(key, weights, bs)[:, :, :8], what="block 7")


@pytest.mark.parametrize("rows", [slice(0, 2), slice(1, 2)])
def test_a_left_padded_batch_decodes_the_same_from_static_and_dynamic_caches(rows):
    """Padding in front: the keys seen are no prefix of the static buffer, which is then cut where the
    last seen key is (a batch of two rows, and one padded row alone)."""
    model, _ = models("block")
    ids = IDS[rows]
    mask = torch.ones_like(ids)
    mask[-1, :5] = 0
    with torch.no_grad():
        got, want = (model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, output_logits=True,
                                    return_dict_in_generate=True, **extra)
                     for extra in ({"cache_implementation": "static"}, {}))
    assert_same(got, want, "left-padded")
