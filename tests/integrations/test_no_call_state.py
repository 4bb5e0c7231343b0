"""A forward leaves no state on modules or tensors. What a call derives for later calls lives in
transformers' KV cache layers (SparseMix's key summaries, `sparsemix_decoding`) or in the attention
functions' one plan cache beside the modules (`attention_utils.PLANS`), never in a module's
`__dict__` or as an attribute of a tensor (the cached keys, the mask)."""

import copy

import pytest
import torch
import transformers as tf
from transformers import AttentionInterface

import hf_multimax  # noqa: F401
from hf_multimax.integrations.attention_utils import PLANS
from hf_multimax.integrations.sparsemix_decoding import key_summary

CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=256)
IDS = torch.randint(0, 100, (2, 61), generator=torch.Generator().manual_seed(0))  # 8 blocks of 8: sparse


def _module_state(model):
    return {name: set(module.__dict__) for name, module in model.named_modules()}


@pytest.mark.parametrize("method", ["multimax", "sparsemix"])
@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_a_forward_sets_nothing_on_modules_or_tensors(method, cache, monkeypatch):
    config = copy.deepcopy(CONFIG)
    config.sparsemix = {"block_size": 8, "top_k": 2}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=method).eval()
    masks = []
    function = AttentionInterface._global_mapping[method]

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return function(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, method, spy)
    before = _module_state(model)
    made = tf.StaticCache(config=model.config, max_cache_len=96) if cache == "static" else tf.DynamicCache(config=model.config)
    with torch.no_grad():
        model(IDS, cache=made, use_cache=True)
        for t in range(3):
            model(IDS[:, t : t + 1], cache=made, use_cache=True)
    assert _module_state(model) == before
    for layer in made.layers:  # a static cache marks its buffers for torch.compile itself
        assert set(layer.keys.__dict__) | set(layer.values.__dict__) <= {"_dynamo_static_input_type"}
    assert masks and all(m is None or not m.__dict__ for m in masks)
    attention = model.model.layers[0].self_attn
    if method == "sparsemix":
        assert key_summary(made.layers[0]) is not None, "the summary is kept on the cache layer"
    else:
        assert "fits" in PLANS.held(attention)


def test_the_plan_cache_reuses_layer_outputs_until_a_parameter_changes():
    """Without gradient `layer_outputs` hands out the same outputs while the layer's parameters are
    unchanged; an in-place edit, a copy into them and a replaced parameter each show on the next call."""
    from hf_multimax.integrations.attention_utils import layer_outputs, settings_of
    from hf_multimax.layers.multimax import MultiMaxModulator, MultiMaxSettings

    config = copy.deepcopy(CONFIG)
    config.multimax = {"per_head": True, "affine": True}
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="multimax").eval()
    attention = model.model.layers[0].self_attn
    mod = attention.multimax
    settings = settings_of(attention, MultiMaxSettings)
    with torch.no_grad():
        theta, _ = layer_outputs(attention, MultiMaxModulator, settings)
        assert not theta.any() and layer_outputs(attention, MultiMaxModulator, settings)[0] is theta
        mod.t1.fill_(0.5)  # in place (an optimizer step, a manual edit)
        assert torch.equal(layer_outputs(attention, MultiMaxModulator, settings)[0][0], torch.full((4,), 0.5))
        mod.load_state_dict({**mod.state_dict(), "affine_shift": torch.ones(4)})  # copied in
        assert torch.equal(layer_outputs(attention, MultiMaxModulator, settings)[1][1], torch.ones(4))
        mod.t2 = torch.nn.Parameter(torch.full((4,), 2.0))  # replaced
        assert torch.equal(layer_outputs(attention, MultiMaxModulator, settings)[0][1], torch.full((4,), 2.0))
    theta, _ = layer_outputs(attention, MultiMaxModulator, settings)  # with gradient: what autograd sees
    assert theta.requires_grad
