"""The plugin's layers stay fp32 under `from_pretrained(dtype=float16 or bfloat16)`, declared the way
transformers expects: its `test_keep_in_fp32_modules` (tests/test_modeling_common.py) reloads a saved
model in each half dtype and requires every tensor the keep-in-fp32 lists name to be fp32 and every
other one to be in the requested dtype."""

import re

import pytest
import torch
import transformers as tf

T5 = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0)
LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)

MODELS = {
    # T5 declares _keep_in_fp32_modules = ["wo"]: the model transformers' test runs on.
    "t5": (lambda: tf.T5Config(**T5), tf.T5ForConditionalGeneration, "multimax", {}),
    # No list of its own (transformers' test skips it): the scalars must stay fp32 all the same.
    "llama": (lambda: tf.LlamaConfig(**LLAMA), tf.LlamaForCausalLM, "multimax", {"output_head": True}),
    # Two layers per attention module: the scorer and the MultiMax scalars of its normalizer.
    "llama_sparsemix": (lambda: tf.LlamaConfig(**LLAMA), tf.LlamaForCausalLM, "sparsemix", {"normalizer": "multimax"}),
}


def _listed(name, names):
    """transformers' test's rule: a tensor is listed when one of its dotted name's parts is in `names`."""
    return any(re.search(rf"(?:^|\.){k}(?:\.|$)", name) for k in names)


@pytest.mark.parametrize("name", list(MODELS))
def test_reload_in_half_precision_keeps_exactly_the_listed_tensors_fp32(name, tmp_path):
    make_config, cls, method, settings = MODELS[name]
    torch.manual_seed(42)
    config = make_config()
    setattr(config, method, settings)
    model = cls._from_config(config, attn_implementation=method)
    model.save_pretrained(tmp_path)
    plugin = {"multimax"} | ({"sparsemix"} if method == "sparsemix" else set())
    for dtype in (torch.float16, torch.bfloat16):
        model = cls.from_pretrained(tmp_path, dtype=dtype)  # the plugin method comes back from config.json
        assert not model._keep_in_fp32_modules & model._keep_in_fp32_modules_strict
        # fp16 upcasts both lists, bf16 the strict one only (transformers' _get_dtype_plan).
        fp32 = model._keep_in_fp32_modules_strict | (model._keep_in_fp32_modules if dtype == torch.float16 else set())
        state = model.state_dict()
        assert any(_listed(key, plugin) for key in state)
        for key, tensor in state.items():
            want = torch.float32 if _listed(key, fp32) else dtype
            assert tensor.dtype == want, f"{key}: {tensor.dtype}, expected {want} for dtype={dtype}"
        assert plugin <= model._keep_in_fp32_modules_strict


def test_declared_per_instance_and_withdrawn_with_the_layers():
    """The class keeps its own list (another T5 without the plugin loads as before); switching away
    from the plugin drops the name with the layers."""
    mm = tf.T5Model._from_config(tf.T5Config(**T5), attn_implementation="multimax")
    plain = tf.T5Model._from_config(tf.T5Config(**T5), attn_implementation="sdpa")
    assert "multimax" in mm._keep_in_fp32_modules_strict
    assert "multimax" not in plain._keep_in_fp32_modules_strict
    assert tf.T5Model._keep_in_fp32_modules_strict is None and tf.T5Model._keep_in_fp32_modules == ["wo"]
    mm.set_attn_implementation("sdpa")
    assert "multimax" not in mm._keep_in_fp32_modules_strict
    assert mm._keep_in_fp32_modules == {"wo"}
