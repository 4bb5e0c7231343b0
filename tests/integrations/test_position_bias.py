"""Models that hand the attention function an additive score bias (`position_bias`): at identity every
plugin method computes what SDPA (or eager, where a model has no SDPA path) computes, the bias's
parameters are trained, and what the plugin cannot compute is refused.

transformers 5.25 passes `position_bias=` from T5 and its copies (mt5, umt5, longt5,
switch_transformers, udop, pix2struct, pop2piano), layoutlmv3, pp_doclayout_v2, seamless_m4t(_v2),
wav2vec2_bert, wav2vec2_conformer, inkling and inkling2(_loop). All but two are built here for parity:
inkling2 and inkling2_loop (whose attention classes are generated from inkling2's) also pass attention
sinks (`sinks=`), which the plugin refuses: the refusal is tested on inkling2.
"""

import re

import pytest
import torch
import transformers as tf
from transformers.models.pp_doclayout_v2.configuration_pp_doclayout_v2 import PPDocLayoutV2ReadingOrderConfig
from transformers.models.pp_doclayout_v2.modeling_pp_doclayout_v2 import PPDocLayoutV2ReadingOrder
from transformers.models.seamless_m4t.modeling_seamless_m4t import SeamlessM4TSpeechEncoder
from transformers.models.seamless_m4t_v2.modeling_seamless_m4t_v2 import SeamlessM4Tv2SpeechEncoder

from hf_multimax.layers import MultiMaxModulator
from tests.conftest import assert_close

T5_SIZES = dict(vocab_size=100, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                relative_attention_num_buckets=8, relative_attention_max_distance=16, decoder_start_token_id=0,
                dropout_rate=0.0)
CONFORMER = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, conv_depthwise_kernel_size=3)
SEAMLESS = dict(vocab_size=100, hidden_size=32, speech_encoder_layers=2, speech_encoder_attention_heads=4,
                speech_encoder_intermediate_size=64, feature_projection_input_dim=16, add_adapter=False,
                conv_depthwise_kernel_size=3, speech_encoder_layerdrop=0.0, speech_encoder_dropout=0.0, dropout=0.0,
                attention_dropout=0.0)
INKLING = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               head_dim=8, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=8, sliding_window_size=4,
               d_rel=4, rel_extent=6, intermediate_size=64, moe_intermediate_size=16, n_routed_experts=4,
               num_experts_per_tok=2, n_shared_experts=1)


def _ids(g, length=9):
    return torch.randint(3, 100, (2, length), generator=g)


def _padded(length=9):
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, -3:] = 0  # right padding on the second row: the bias meets a mask
    return mask


def _boxes(g, length=9, scale=1.0):
    return torch.sort(torch.rand(2, length, 4, generator=g), dim=-1).values * scale  # x0 <= y0 <= x1 <= y1


def _seq2seq(g):
    return dict(input_ids=_ids(g), attention_mask=_padded(), decoder_input_ids=_ids(g, 7))


def _speech(g):
    return dict(input_features=torch.randn(2, 9, 16, generator=g), attention_mask=_padded())


# name -> (config, model class, inputs, reference attn_implementation, extra from_pretrained kwargs)
FAMILIES = {
    "t5": (lambda: tf.T5Config(**T5_SIZES), tf.T5Model, _seq2seq, "sdpa", {}),
    "mt5": (lambda: tf.MT5Config(**T5_SIZES), tf.MT5Model, _seq2seq, "sdpa", {}),
    "umt5": (lambda: tf.UMT5Config(**T5_SIZES), tf.UMT5Model, _seq2seq, "sdpa", {}),
    # No SDPA path: eager is the reference. Its encoder's local attention is hand-written (never calls the
    # attention function, whatever attn_implementation says), and LongT5 declares no attention classes, so
    # the decoder's attentions are named; without target_modules the plugin refuses to attach.
    "longt5": (lambda: tf.LongT5Config(**T5_SIZES, local_radius=2, encoder_attention_type="local"), tf.LongT5Model,
               _seq2seq, "eager", {"multimax": {"target_modules": ["SelfAttention", "EncDecAttention"]}}),
    "switch_transformers": (  # no SDPA path: eager is the reference
        lambda: tf.SwitchTransformersConfig(**{k: v for k, v in T5_SIZES.items() if k != "num_decoder_layers"},
                                            num_experts=2, expert_capacity=8, num_sparse_encoder_layers=1,
                                            num_sparse_decoder_layers=1),
        tf.SwitchTransformersModel, _seq2seq, "eager", {}),
    "udop": (lambda: tf.UdopConfig(**T5_SIZES, image_size=32, patch_size=8), tf.UdopModel,
             lambda g: dict(_seq2seq(g), bbox=_boxes(g)), "sdpa", {}),
    "pop2piano": (
        lambda: tf.Pop2PianoConfig(vocab_size=100, composer_vocab_size=3, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                   num_decoder_layers=2, num_heads=4, relative_attention_num_buckets=8,
                                   relative_attention_max_distance=16, dropout_rate=0.0),
        tf.Pop2PianoForConditionalGeneration,
        lambda g: dict(input_features=torch.randn(2, 9, 32, generator=g), attention_mask=_padded(),
                       decoder_input_ids=_ids(g, 7)),
        "sdpa", {}),
    # Declares no attention classes: its attention modules are found by the attach rule's search.
    "pix2struct": (
        lambda: tf.Pix2StructConfig(
            text_config=dict(vocab_size=100, hidden_size=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                             relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0),
            vision_config=dict(hidden_size=32, patch_embed_hidden_size=12, d_kv=8, d_ff=64, num_hidden_layers=2,
                               num_attention_heads=4, dropout_rate=0.0)),
        tf.Pix2StructForConditionalGeneration,
        # Each patch: its row and column (embedding indices), then its 12 pixel values.
        lambda g: dict(flattened_patches=torch.cat([torch.randint(0, 3, (2, 9, 2), generator=g).float(),
                                                    torch.randn(2, 9, 12, generator=g)], dim=-1),
                       attention_mask=_padded().float(), decoder_input_ids=_ids(g, 7)),
        "sdpa", {}),
    "layoutlmv3": (  # 4 * coordinate_size + 2 * shape_size = hidden_size
        lambda: tf.LayoutLMv3Config(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, coordinate_size=4, shape_size=8, rel_pos_bins=8,
                                    max_rel_pos=16, visual_embed=False, hidden_dropout_prob=0.0,
                                    attention_probs_dropout_prob=0.0),
        tf.LayoutLMv3Model,
        lambda g: dict(input_ids=_ids(g), attention_mask=_padded(), bbox=_boxes(g, scale=100).long()),
        "sdpa", {}),
    "pp_doclayout_v2": (  # the reading-order model (LayoutLMv3's attention); the detector around it is not needed
        lambda: PPDocLayoutV2ReadingOrderConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                                num_hidden_layers=2, coordinate_size=4, shape_size=8,
                                                has_relative_attention_bias=True, rel_pos_bins=8, max_rel_pos=16,
                                                global_pointer_head_size=8, hidden_dropout_prob=0.0,
                                                attention_probs_dropout_prob=0.0),
        PPDocLayoutV2ReadingOrder, lambda g: dict(boxes=_boxes(g, 7, scale=1000), mask=_padded(7).bool()), "sdpa", {}),
    # The speech encoders carry the relative position bias (the rest of SeamlessM4T is a plain seq2seq).
    "seamless_m4t": (lambda: tf.SeamlessM4TConfig(**SEAMLESS), SeamlessM4TSpeechEncoder, _speech, "sdpa", {}),
    "seamless_m4t_v2": (
        lambda: tf.SeamlessM4Tv2Config(**SEAMLESS, left_max_position_embeddings=4, right_max_position_embeddings=2),
        SeamlessM4Tv2SpeechEncoder, _speech, "sdpa", {}),
    "wav2vec2_bert": (
        lambda: tf.Wav2Vec2BertConfig(**CONFORMER, num_hidden_layers=2, feature_projection_input_dim=16,
                                      left_max_position_embeddings=4, right_max_position_embeddings=2, layerdrop=0.0,
                                      apply_spec_augment=False),
        tf.Wav2Vec2BertModel, _speech, "sdpa", {}),
    "wav2vec2_conformer": (
        lambda: tf.Wav2Vec2ConformerConfig(**CONFORMER, num_hidden_layers=2, conv_dim=(16, 16), conv_stride=(4, 4),
                                           conv_kernel=(8, 4), num_conv_pos_embeddings=8,
                                           num_conv_pos_embedding_groups=2, layerdrop=0.0, apply_spec_augment=False,
                                           hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
        tf.Wav2Vec2ConformerModel, lambda g: dict(input_values=torch.randn(2, 400, generator=g)), "sdpa", {}),
    "inkling": (  # a sliding-window layer and a full one, grouped-query heads
        lambda: tf.InklingTextConfig(**INKLING, local_layer_ids=[0], mlp_layer_types=["dense", "dense"]),
        tf.InklingTextModel, lambda g: dict(input_ids=_ids(g), attention_mask=_padded()), "sdpa", {}),
}

# The parameters the position biases come from. Random init draws them small (std 0.02), so that a bias
# left out would move the outputs by ~1e-6 in some families: drawn at std 1 it moves them far past the
# tolerance, and the parity below proves the bias is honoured.
BIAS_PARAMS = re.compile(r"relative_attention_bias|rel_pos|rel_bias|rel_logits|pos_bias|linear_pos|distance_embedding")


def _save(name, path, make=None):
    make_config, cls, _, _, _ = FAMILIES[name]
    torch.manual_seed(42)
    model = cls(make_config() if make is None else make)
    with torch.no_grad():
        drawn = [p.normal_(0.0, 1.0) for n, p in model.named_parameters() if BIAS_PARAMS.search(n)]
    assert drawn, f"{name}: no position-bias parameters matched"
    model.save_pretrained(path)
    return cls


def _outputs(output):
    """Every floating tensor of a model output, by field name."""
    if torch.is_tensor(output):
        return {"output": output}
    return {k: v for k, v in output.items() if torch.is_tensor(v) and v.is_floating_point()}


@pytest.mark.parametrize("name", list(FAMILIES))
def test_multimax_at_identity_matches_reference(name, tmp_path):
    _, _, make_inputs, ref_impl, extra = FAMILIES[name]
    cls = _save(name, tmp_path)
    ref = cls.from_pretrained(tmp_path, attn_implementation=ref_impl).eval()
    mm = cls.from_pretrained(tmp_path, attn_implementation="multimax", **extra).eval()
    assert sum(isinstance(m, MultiMaxModulator) for m in mm.modules()) >= 2
    inputs = make_inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, actual = _outputs(ref(**inputs)), _outputs(mm(**inputs))
    assert expected.keys() == actual.keys()
    for field in expected:
        assert_close(actual[field], expected[field], what=f"{name} {field}")


def _t5(path, attn, **settings):
    _save("t5", path)
    return tf.T5Model.from_pretrained(path, attn_implementation=attn, **settings)


def test_t5_gradients_reach_the_position_bias(tmp_path):
    """Training T5: every gradient (q/k/v, the relative_attention_bias embeddings, the rest) equals
    SDPA's at identity, and the MultiMax scalars get one."""
    ref, mm = _t5(tmp_path, "sdpa").train(), _t5(tmp_path, "multimax").train()
    inputs = _seq2seq(torch.Generator().manual_seed(1))
    weights = None
    for model in (ref, mm):
        out = model(**inputs)
        if weights is None:
            g = torch.Generator().manual_seed(2)
            weights = [torch.randn(o.shape, generator=g)
                       for o in (out.last_hidden_state, out.encoder_last_hidden_state)]
        ((out.last_hidden_state * weights[0]).sum() + (out.encoder_last_hidden_state * weights[1]).sum()).backward()
    ref_params = dict(ref.named_parameters())
    checked = set()
    for name, p in mm.named_parameters():
        if ".multimax." in name:
            continue
        expected = ref_params[name].grad
        if expected is None:
            assert p.grad is None or not p.grad.any(), name
            continue
        scale = expected.abs().max().clamp_min(1.0)  # relative to the gradient's size
        assert_close(p.grad / scale, expected / scale, what=f"grad {name}")
        checked.add(name.rsplit(".", 2)[-2])
    assert {"q", "k", "v", "relative_attention_bias"} <= checked
    bias_grads = [p.grad for n, p in mm.named_parameters() if "relative_attention_bias" in n]
    assert len(bias_grads) == 2 and all(g is not None and g.abs().max() > 1e-3 for g in bias_grads)
    modulators = [m for m in mm.modules() if isinstance(m, MultiMaxModulator)]
    assert all(m.t1.grad is not None and m.t1.grad.abs() > 0 for m in modulators), "scalars get no gradient"


def test_backend_without_bias_gradient_is_refused_for_training(tmp_path):
    """chunked takes the bias as a constant: asked for explicitly while the bias trains, it raises
    (naming the bias) rather than leave relative_attention_bias without a gradient; without
    gradients it runs, and matches SDPA."""
    mm = _t5(tmp_path, "multimax", multimax={"backend": "chunked"})
    ref = tf.T5Model.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    inputs = _seq2seq(torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match="backend='chunked' cannot train the additive score bias.*position_bias"):
        mm.train()(**inputs)
    with torch.no_grad():
        assert_close(mm.eval()(**inputs).last_hidden_state, ref(**inputs).last_hidden_state, what="chunked decoder")


@pytest.mark.parametrize("normalizer", ["softmax", "multimax"])
def test_sparsemix_dense_regime_matches_sdpa_on_t5(normalizer, tmp_path):
    ref = _t5(tmp_path, "sdpa").eval()
    sm = tf.T5Model.from_pretrained(tmp_path, attn_implementation="sparsemix",
                                    sparsemix={"block_size": 8, "top_k": 2, "normalizer": normalizer}).eval()
    inputs = _seq2seq(torch.Generator().manual_seed(1))  # 9 and 7 tokens: below (2 + 2) * 8, dense
    with torch.no_grad():
        expected, actual = ref(**inputs), sm(**inputs)
    assert_close(actual.encoder_last_hidden_state, expected.encoder_last_hidden_state, what="encoder")
    assert_close(actual.last_hidden_state, expected.last_hidden_state, what="decoder")


def test_sparsemix_sparse_path_refuses_position_bias(tmp_path):
    """The block kernels take no bias: a T5 input long enough to go sparse raises, naming it."""
    sm = _t5(tmp_path, "sparsemix", sparsemix={"block_size": 4, "top_k": 1}).eval()
    ids = torch.randint(3, 100, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), pytest.raises(ValueError, match="the position_bias kwarg"):
        sm(input_ids=ids, decoder_input_ids=ids[:, :3])


@pytest.mark.parametrize("method", ["multimax", "sparsemix", "sparsemax"])
def test_attention_sinks_are_refused(method):
    """inkling2 passes attention sinks (`sinks=`) beside its position bias: dropping them would change
    every output, so every plugin method refuses them, naming them."""
    torch.manual_seed(42)
    model = tf.AutoModelForCausalLM.from_config(tf.Inkling2TextConfig(**INKLING), attn_implementation=method)
    with torch.no_grad(), pytest.raises(ValueError, match=f"attn_implementation='{method}' got `sinks`"):
        model(input_ids=torch.randint(3, 100, (1, 6)))


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_t5_generate_matches_sdpa(cache, tmp_path):
    """Decoding with a KV cache: each step's bias covers the new query against every cached key (a
    static cache hands over its whole buffer, masked), as SDPA sees it."""
    _save("t5", tmp_path)
    ref = tf.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    mm = tf.T5ForConditionalGeneration.from_pretrained(tmp_path, attn_implementation="multimax").eval()
    inputs = _seq2seq(torch.Generator().manual_seed(1))
    del inputs["decoder_input_ids"]
    kwargs = dict(max_new_tokens=8, do_sample=False, cache_implementation=cache, output_scores=True,
                  return_dict_in_generate=True)
    expected, actual = ref.generate(**inputs, **kwargs), mm.generate(**inputs, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_close(torch.stack(actual.scores), torch.stack(expected.scores), what=f"{cache} cache scores")


def test_t5_backends_agree_with_trained_scalars(tmp_path):
    """Away from identity the bias goes through the modulator: every CPU backend computes what the
    eager reference computes (the fused kernel in C++, chunked in torch tiles)."""
    _save("t5", tmp_path)
    inputs = _seq2seq(torch.Generator().manual_seed(1))
    outputs = {}
    for backend in ("eager", "chunked", "fused"):
        model = tf.T5Model.from_pretrained(tmp_path, attn_implementation=f"multimax:{backend}").eval()
        g = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, MultiMaxModulator):
                    for p in m.parameters(recurse=False):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            out = model(**inputs)
        outputs[backend] = torch.cat([out.last_hidden_state.flatten(), out.encoder_last_hidden_state.flatten()])
    identity = tf.T5Model.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    with torch.no_grad():
        out = identity(**inputs)
    softmax = torch.cat([out.last_hidden_state.flatten(), out.encoder_last_hidden_state.flatten()])
    assert (outputs["eager"] - softmax).abs().max() > 1e-2, "the trained scalars must change the outputs"
    for backend in ("chunked", "fused"):
        assert_close(outputs[backend], outputs["eager"], what=backend)
