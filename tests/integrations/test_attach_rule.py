"""The layers go on the modules that call transformers' attention function (the `module` it is handed),
whatever class the model declares for recording attentions."""

import torch
import transformers as tf

from hf_multimax.layers import MultiMaxModulator

T5_SIZES = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=3, num_heads=4,
                decoder_start_token_id=0)


def hosts(model):
    """The classes of the modules that hold MultiMax scalars, with how many of each."""
    found = {}
    for module in model.modules():
        if isinstance(module._modules.get("multimax"), MultiMaxModulator):
            found[type(module).__name__] = found.get(type(module).__name__, 0) + 1
    return found


def test_t5_scalars_sit_on_t5attention_not_on_the_declared_wrappers():
    """T5 declares T5LayerSelfAttention/T5LayerCrossAttention (a layer norm, a dropout and the
    T5Attention that calls the function): the scalars go on the T5Attention inside, and a forward runs."""
    model = tf.T5Model._from_config(tf.T5Config(**T5_SIZES), attn_implementation="multimax").eval()
    # 2 encoder self-attentions, 3 decoder self- and 3 cross-attentions.
    assert hosts(model) == {"T5Attention": 8}
    ids = torch.randint(3, 100, (1, 6))
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids, decoder_input_ids=ids).last_hidden_state).all()


def test_model_declaring_no_attention_class_is_searched():
    """Pix2Struct records attentions by hand (no `_can_record_outputs`): its callers, the modules that
    hold a config and an `is_causal`, are found in both of its sub-models, the wrappers are not."""
    config = tf.Pix2StructConfig(
        text_config=dict(vocab_size=100, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        vision_config=dict(hidden_size=32, patch_embed_hidden_size=12, d_kv=8, d_ff=64, num_hidden_layers=2,
                           num_attention_heads=4),
    )
    model = tf.Pix2StructForConditionalGeneration._from_config(config, attn_implementation="multimax")
    assert hosts(model) == {"Pix2StructVisionAttention": 2, "Pix2StructTextAttention": 4}


def test_composite_top_level_name_alone_governs_no_module():
    # transformers accepts a composite config naming the plugin at the top level only, its sub-configs
    # (which the attention modules read) another implementation: nothing to attach, nothing to refuse
    # (transformers' test_can_set_attention_dynamically_composite_model, gemma3 image-text).
    import transformers as tf

    text = tf.Gemma3TextConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4)
    vision = tf.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                   image_size=16, patch_size=4)
    config = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=299,
                             boi_token_index=297, eoi_token_index=298)
    model = tf.Gemma3ForConditionalGeneration(config)
    model.set_attn_implementation({"": "multimax", "text_config": "sdpa", "vision_config": "sdpa"})
    assert model.config._attn_implementation == "multimax" and model.config.text_config._attn_implementation == "sdpa"
    assert not [n for n, _ in model.named_modules() if n.endswith(".multimax")]
    model.set_attn_implementation({"": "sdpa"})
    assert model.config._attn_implementation == "sdpa"
