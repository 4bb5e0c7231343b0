"""`generate()` on a SparseMix model with no cache argument builds a `DynamicCache` whose layers grow in
place (`integrations/sparsemix_generation.py`): it decodes what transformers' own layers and a static
cache decode (greedy, beam search, sampling, a left-padded batch, past the first capacity), a user's
choice wins (a cache argument, `cache_implementation` in the call or in the saved generation config),
and dense and MultiMax models, and dense models loaded later, are left alone."""

import copy

import pytest
import torch
import transformers as tf
from transformers.cache_utils import DynamicLayer

import hf_multimax  # noqa: F401
from hf_multimax.integrations import sparsemix_generation
from hf_multimax.integrations.sparsemix_generation import GrowingLayer, SparseMixCache
from tests.conftest import assert_close

CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512)
SETTINGS = {"block_size": 8, "top_k": 2}
IDS = torch.randint(0, 100, (2, 61), generator=torch.Generator().manual_seed(1))  # 8 blocks of 8: the sparse path


def sparse_model(selector="block"):
    torch.manual_seed(0)
    config = copy.deepcopy(CONFIG)
    config.sparsemix = {**SETTINGS, "selector": selector}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix").eval()
    with torch.no_grad():  # trained-looking: away from the zero start
        for layer in model.model.layers:
            scorer = layer.self_attn.sparsemix
            (scorer.w_key if selector != "token" else scorer.w_weight).normal_()
    return model


def dense_model(attn="sdpa"):
    torch.manual_seed(0)
    return tf.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=attn).eval()


def generate(model, ids=IDS, mask=None, **kwargs):
    kwargs = {"max_new_tokens": 12, "do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=torch.ones_like(ids) if mask is None else mask, output_logits=True,
                              return_dict_in_generate=True, **kwargs)


def layer_kinds(out):
    return {type(layer) for layer in out.cache.layers}


def assert_same(got, want, what):
    assert torch.equal(got.sequences, want.sequences), what
    for a, b in zip(got.logits, want.logits):
        assert_close(a, b, what=what)


@pytest.mark.parametrize("selector", ["block", "token"])
def test_no_cache_argument_grows_in_place_and_decodes_as_static_and_dynamic(selector):
    model = sparse_model(selector)
    got = generate(model)
    assert type(got.cache) is tf.DynamicCache and layer_kinds(got) == {GrowingLayer}
    # Sized for the call: no reallocation while generating (61 + 12 tokens, the last never cached).
    assert all(layer._buffers[0].shape[-2] == 61 + 12 for layer in got.cache.layers)
    assert_same(got, generate(model, cache_implementation="dynamic"), f"{selector}: vs transformers' DynamicLayer")
    assert_same(got, generate(model, cache_implementation="static"), f"{selector}: vs static cache")


def test_dense_reference_tokens():
    """On a prompt short enough for SparseMix's dense path, the default equals the SDPA model."""
    ids = IDS[:, :20]  # 20 + 12 tokens: the 4 blocks of 8 SparseMix keeps (sink, local, top-2)
    dense, sparse = dense_model(), sparse_model()
    sparse.load_state_dict(dense.state_dict(), strict=False)
    got = generate(sparse, ids)
    assert layer_kinds(got) == {GrowingLayer}
    assert_same(got, generate(dense, ids), "short prompt: dense path")


def test_beam_search_sampling_and_a_left_padded_batch():
    model = sparse_model()
    for kwargs in ({"num_beams": 3}, {"num_beams": 2, "num_return_sequences": 2}):
        assert_same(generate(model, **kwargs), generate(model, cache_implementation="dynamic", **kwargs), str(kwargs))
    sampled = []
    for extra in ({}, {"cache_implementation": "dynamic"}):
        torch.manual_seed(3)
        sampled.append(generate(model, do_sample=True, top_k=20, **extra))
    assert_same(*sampled, "sampling")
    mask = torch.ones_like(IDS)
    mask[1, :7] = 0
    got = generate(model, mask=mask)
    assert layer_kinds(got) == {GrowingLayer}
    assert_same(got, generate(model, mask=mask, cache_implementation="dynamic"), "left-padded batch")
    assert_same(got, generate(model, mask=mask, cache_implementation="static"), "left-padded batch, static")


def test_past_the_first_capacity():
    model = sparse_model()
    want = generate(model, max_new_tokens=40, cache_implementation="dynamic")
    small = SparseMixCache(config=model.config, capacity=64)  # reallocated after 3 tokens, and again later
    got = generate(model, max_new_tokens=40, cache=small)
    assert_same(got, want, "capacity 64, 61 + 40 tokens")
    assert all(layer._buffers[0].shape[-2] >= 100 for layer in small.layers)
    # A generate() call's own cache, continued past the room it was sized for.
    first = generate(model, max_new_tokens=5)
    room = first.cache.layers[0]._buffers[0].shape[-2]
    more = generate(model, first.sequences, max_new_tokens=20, cache=first.cache)
    assert first.cache.layers[0]._buffers[0].shape[-2] > room
    whole = generate(model, max_new_tokens=25, cache_implementation="dynamic")
    assert torch.equal(more.sequences, whole.sequences)


def test_a_users_choice_wins():
    model = sparse_model()
    assert model.generation_config.cache_implementation is None  # the default is never written to the model
    assert layer_kinds(generate(model, cache_implementation="dynamic")) == {DynamicLayer}
    assert isinstance(generate(model, cache_implementation="static").cache, tf.StaticCache)
    cache = tf.DynamicCache(config=model.config)
    assert generate(model, cache=cache).cache is cache and {type(layer) for layer in cache.layers} == {DynamicLayer}
    model.generation_config.cache_implementation = "static"
    assert isinstance(generate(model).cache, tf.StaticCache)


@pytest.mark.parametrize("attn", ["sdpa", "eager", "multimax"])
def test_dense_and_multimax_models_are_untouched(attn):
    model = dense_model(attn)
    assert layer_kinds(generate(model)) == {DynamicLayer}
    assert model.generation_config.cache_implementation is None


def test_save_and_reload(tmp_path):
    model = sparse_model()
    model.save_pretrained(tmp_path / "default")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "default").eval()
    assert loaded.generation_config.cache_implementation is None  # nothing saved: the choice follows the attention
    assert_same(generate(loaded), generate(model), "reloaded")
    assert layer_kinds(generate(loaded)) == {GrowingLayer}
    # A user's choice in the generation config is saved and wins after the reload.
    model.generation_config.cache_implementation = "dynamic"
    model.save_pretrained(tmp_path / "dynamic")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dynamic").eval()
    assert loaded.generation_config.cache_implementation == "dynamic"
    assert layer_kinds(generate(loaded)) == {DynamicLayer}
    # A dense checkpoint loaded later in the same process keeps transformers' default.
    dense_model().save_pretrained(tmp_path / "dense")
    dense = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense").eval()
    assert layer_kinds(generate(dense)) == {DynamicLayer}
    # The same checkpoint switched to SparseMix at load gets the growing cache, switched back it does not.
    sparse = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "dense", attn_implementation="sparsemix").eval()
    assert layer_kinds(generate(sparse)) == {GrowingLayer}
    sparse.set_attn_implementation("sdpa")
    assert layer_kinds(generate(sparse)) == {DynamicLayer}


def test_layer_edits_keep_dynamic_semantics():
    """crop, beam reordering, batch edits, reset, deepcopy and an outside assignment, against DynamicLayer."""
    torch.manual_seed(0)
    chunks = [torch.randn(3, 2, n, 4) for n in (5, 1, 1, 300, 2)]
    grow, ref = GrowingLayer(capacity=6), DynamicLayer()

    def step(k):
        got, want = grow.update(k, -k), ref.update(k, -k)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])

    for k in chunks[:3]:
        step(k)
    held = grow.keys.clone(), grow.keys  # a view handed out earlier keeps its values after a reorder
    for layer in (grow, ref):
        layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(held[1], held[0])
    step(chunks[3])  # past the capacity
    for layer in (grow, ref):
        layer.crop(-4)
    assert grow.get_seq_length() == ref.get_seq_length() == 303
    step(chunks[4])
    copied, ref_copied = copy.deepcopy(grow), copy.deepcopy(ref)
    for layer in (grow, ref):
        layer.batch_select_indices(torch.tensor([0, 2]))
        layer.batch_repeat_interleave(2)
    step(torch.randn(4, 2, 1, 4))
    grow.keys, grow.values = ref.keys.clone(), ref.values.clone()  # replaced from outside: adopted
    step(torch.randn(4, 2, 3, 4))
    got, want = copied.update(chunks[0][..., :1, :], chunks[0][..., :1, :]), ref_copied.update(
        chunks[0][..., :1, :], chunks[0][..., :1, :])
    assert torch.equal(got[0], want[0])
    for layer in (grow, ref):
        layer.reset()
    step(chunks[1])


def test_uninstall_restores_transformers_default():
    model = sparse_model()
    sparsemix_generation.uninstall()
    try:
        assert layer_kinds(generate(model)) == {DynamicLayer}
    finally:
        assert sparsemix_generation.install()
    assert layer_kinds(generate(model)) == {GrowingLayer}


def test_assisted_decoding_crops_the_growing_cache(monkeypatch):
    """Assisted decoding crops rejected draft tokens from both models' caches (a view shrinks in place)."""
    model, draft = sparse_model(), sparse_model("token")
    with torch.no_grad():
        for layer in draft.model.layers:
            layer.self_attn.sparsemix.w_weight.mul_(-1.0)  # a draft that is often wrong: crops happen
    ids = IDS[:1]
    crops = []
    original = GrowingLayer.crop
    monkeypatch.setattr(GrowingLayer, "crop", lambda self, n: (crops.append(n), original(self, n))[1])
    got = generate(model, ids, assistant_model=draft, max_new_tokens=20)
    assert layer_kinds(got) == {GrowingLayer} and any(n < 0 for n in crops)
    # Verifying several draft tokens in one call selects blocks per query block, so assisted decoding differs
    # from one token at a time; against the same assisted decoding on transformers' own layers:
    want = generate(model, ids, assistant_model=draft, max_new_tokens=20, cache_implementation="dynamic")
    assert layer_kinds(want) == {DynamicLayer}
    assert_same(got, want, "assisted decoding")
