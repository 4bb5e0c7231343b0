"""A method's output-head layer is declared on its `Method` entry; attach reads it from there."""

import dataclasses

import transformers as tf

from hf_multimax.integrations import methods
from hf_multimax.layers.multimax import MultiMaxModulator


def _config(**extra):
    return tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                          num_attention_heads=4, num_key_value_heads=2, **extra)


def test_output_head_layers_are_declared_on_the_entries():
    assert methods.METHODS["multimax"].output_head is MultiMaxModulator
    assert methods.METHODS["sparsemix"].output_head is MultiMaxModulator  # with the MultiMax normalizer
    assert methods.METHODS["sparsemax"].output_head is None
    assert methods.HEAD_LAYER_CLASSES == (MultiMaxModulator,)


def test_attach_follows_the_entry(monkeypatch):
    config = _config(sparsemix={"normalizer": "multimax"}, multimax={"output_head": True})
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    assert isinstance(model.lm_head.multimax, MultiMaxModulator)
    # An entry that declares no output-head layer: the same settings put nothing on the head.
    entry = dataclasses.replace(methods.METHODS["multimax"], output_head=None)
    monkeypatch.setitem(methods.METHODS, "multimax", entry)
    model = tf.AutoModelForCausalLM.from_config(_config(multimax={"output_head": True}), attn_implementation="multimax")
    assert "multimax" not in model.lm_head._modules
    assert model.model.layers[0].self_attn.multimax is not None
