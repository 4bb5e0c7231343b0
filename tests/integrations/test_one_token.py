"""One-token inputs on the default backend (`auto`, which picks the fused kernel on CPU).

A one-token key/value made by `.transpose(1, 2)` of `[B, 1, H, D]` keeps a non-canonical stride on its
size-1 dimension; torch calls it contiguous, so `.contiguous()` leaves it, and the kernel must address
it anyway. Models hand such tensors over in a one-token forward without cache, in `generate` from a
one-token prompt, in an encoder-decoder's `generate()` without input ids and in the fusion model.
"""

import pytest
import torch
import transformers as tf

from hf_multimax.modeling.multimodal_fusion import MultimodalFusionConfig
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _pair(make, impls=("sdpa", "multimax")):
    """One model per implementation. `make` must build each from its own config: transformers 5 keeps
    the config object it is given, so a second model built from the same object switches the first."""
    models = {}
    for impl in impls:
        torch.manual_seed(0)
        models[impl] = make(impl)
    return models


def test_one_token_forward_generate_and_training_step_equal_sdpa():
    ids = torch.randint(0, 100, (2, 5))
    models = _pair(lambda impl: tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**LLAMA), attn_implementation=impl))
    logits, tokens, grads = {}, {}, {}
    for impl, model in models.items():
        model.eval()
        with torch.no_grad():
            logits[impl] = model(ids[:, :1], use_cache=False).logits
        tokens[impl] = model.generate(ids[:, :1], attention_mask=torch.ones(2, 1, dtype=torch.long), use_cache=False,
                                      max_new_tokens=4, do_sample=False)
        model.train()
        model(ids[:, :1], labels=ids[:, :1]).loss.backward()
        grads[impl] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_close(logits["multimax"], logits["sdpa"], what="one-token logits")
    assert torch.equal(tokens["multimax"], tokens["sdpa"])
    for name, grad in grads["sdpa"].items():
        assert_close(grads["multimax"][name], grad, what=f"grad {name}")


def test_encoder_decoder_generate_without_input_ids():
    config = lambda: tf.BartConfig(vocab_size=100, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                           decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    models = _pair(lambda impl: tf.AutoModelForSeq2SeqLM.from_config(config(), attn_implementation=impl).eval())
    scores = {impl: m.generate(max_new_tokens=4, do_sample=False, output_scores=True, return_dict_in_generate=True)
              for impl, m in models.items()}
    assert torch.equal(scores["multimax"].sequences, scores["sdpa"].sequences)
    for got, want in zip(scores["multimax"].scores, scores["sdpa"].scores):
        assert_close(got, want, what="generation scores")


def test_gradient_checkpointing_with_input_require_grads():
    # transformers' test_enable_input_require_grads_with_gradient_checkpointing, on Gemma 3's text model.
    config = lambda: tf.Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=1, head_dim=8, sliding_window=4)
    ids = torch.randint(0, 100, (1, 1))
    grads = {}
    for impl, model in _pair(lambda impl: tf.AutoModelForCausalLM.from_config(config(), attn_implementation=impl)).items():
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        model.enable_input_require_grads()
        model.train()
        model(ids, labels=ids).loss.backward()
        grads[impl] = model.get_input_embeddings().weight.grad
    assert grads["multimax"] is not None
    assert_close(grads["multimax"], grads["sdpa"], what="embedding grad")


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_fusion_model_default_backend_equals_eager(grad):
    config = lambda: MultimodalFusionConfig(modality_names=["a", "b"], modality_input_sizes=[5, 7], num_labels=3, hidden_size=12,
                                    num_attention_heads=2, projection_hidden_size=8, attention_logit_scale=2.0)
    x = {"a": torch.randn(4, 3, 5), "b": torch.randn(4, 6, 7)}
    models = _pair(lambda impl: tf.AutoModelForSequenceClassification.from_config(config(), attn_implementation=impl).eval(),
                   ("multimax:eager", "multimax"))
    logits = {}
    with torch.set_grad_enabled(grad):
        for impl, model in models.items():
            logits[impl] = model(modality_inputs=x).logits
    assert_close(logits["multimax"], logits["multimax:eager"], what="fusion logits")
