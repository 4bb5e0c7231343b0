"""SparseMix keeps what the model hands its attention: gpt-oss's attention sinks (`s_aux`) on the dense
and the sparse path, and sliding windows (`sliding_window`), whose out-of-window blocks the selection
never keeps. Tiny real models, against eager/SDPA at identity (dense regime, and windows that fit the
kept blocks) and against the reference kernel with the sink (sparse regime): outputs and gradients,
prefill and decoding with a cache."""

import pytest
import torch
import transformers as tf

from hf_multimax.layers import MultiMaxModulator
from tests.conftest import assert_close

SMALL = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=256)


def _gpt_oss():
    config = {k: v for k, v in SMALL.items() if k != "intermediate_size"}
    return tf.GptOssConfig(**config, intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def build(make_config, impl, settings=None, seed=42):
    torch.manual_seed(seed)
    config = make_config()
    if settings is not None:
        config.sparsemix = dict(settings)
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation=impl)
    if hasattr(model.model.layers[0].self_attn, "sinks"):
        with torch.no_grad():  # sinks far from zero, so a dropped sink shows
            for layer in model.model.layers:
                layer.self_attn.sinks.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(seed))
    return model


def pair(make_config, reference, settings, impl="sparsemix"):
    """(SparseMix model, reference model) with the same weights (the scorer draws from the seed too)."""
    model = build(make_config, impl, settings)
    ref = build(make_config, reference)
    ref.load_state_dict(model.state_dict(), strict=False)
    return model, ref


def ids_and_mask(length, pad=3):
    ids = torch.randint(3, 100, (2, length), generator=torch.Generator().manual_seed(42))
    mask = torch.ones(2, length, dtype=torch.long)
    mask[1, :pad] = 0  # left padding
    return ids, mask


def forward_backward(model, ids, mask):
    """Logits and gradients of the loss over real positions (a padding query sees no key: zeros here,
    a uniform average in eager, so its logits are left out of the loss and the comparison; the label a
    position predicts is the next token's, so the first real token's label goes too)."""
    model.zero_grad()
    out = model(ids, attention_mask=mask, labels=ids.masked_fill((mask == 0) | (mask.roll(1, -1) == 0), -100))
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_training_step(got, want, what, real):
    """Logits at real positions and every gradient the reference computes, the sinks' included."""
    assert_close(got[0][real], want[0][real], what=f"{what} logits")
    for name, grad in want[1].items():
        scale = grad.abs().max().clamp_min(1.0)
        assert_close(got[1][name] / scale, grad / scale, what=f"{what} grad {name}")


@pytest.mark.parametrize("normalizer", ["softmax", "multimax"])
def test_gpt_oss_sinks_dense_regime_equal_eager(normalizer):
    """11 tokens below (2 + 2) * 8: SparseMix's dense path computes what eager gpt-oss computes, the
    sinks in the normaliser, in logits and every gradient (the sinks' too)."""
    model, ref = pair(_gpt_oss, "eager", {"block_size": 8, "top_k": 2, "normalizer": normalizer})
    ids, mask = ids_and_mask(11)
    got, want = forward_backward(model.train(), ids, mask), forward_backward(ref.train(), ids, mask)
    assert any(n.endswith("sinks") and g.abs().sum() > 0 for n, g in want[1].items())
    assert_same_training_step(got, want, normalizer, mask.bool())


@pytest.mark.parametrize("normalizer, backends", [("softmax", ("blocked", "fused")), ("multimax", ("blocked",))])
def test_gpt_oss_sinks_sparse_regime_equal_the_reference_kernel(normalizer, backends):
    """40 tokens in blocks of 4 with top-1: the sparse path with the sinks. Each training backend gives
    the reference kernel's logits and gradients (sinks included); the sinks change the output."""
    settings = {"block_size": 4, "top_k": 1, "normalizer": normalizer}
    ids, mask = ids_and_mask(40)
    results = {}
    for backend in ("eager", *backends):
        model = build(_gpt_oss, f"sparsemix:{backend}", settings).train()
        if normalizer == "multimax":  # away from identity, so the scalars' gradients are checked too
            with torch.no_grad():
                for m in model.modules():
                    if isinstance(m, MultiMaxModulator):
                        for p in m.parameters(recurse=False):
                            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(3)) * 0.3)
        results[backend] = forward_backward(model, ids, mask)
    for backend in backends:
        assert_same_training_step(results[backend], results["eager"], backend, mask.bool())
    sink_grads = [g for n, g in results["eager"][1].items() if n.endswith("sinks")]
    assert len(sink_grads) == 2 and all(g.abs().sum() > 0 for g in sink_grads)
    dense = build(_gpt_oss, "eager")
    dense.load_state_dict(model.state_dict(), strict=False)
    with torch.no_grad():
        assert (dense(ids, attention_mask=mask).logits - results["eager"][0])[mask.bool()].abs().max() > 1e-3, \
            "40 tokens must take the sparse path"
        for layer in model.model.layers:
            layer.self_attn.sinks.zero_()
        assert (model.eval()(ids, attention_mask=mask).logits - results["eager"][0]).abs().max() > 1e-2, \
            "the sinks must change the sparse output"


def test_gpt_oss_sparse_decoding_with_sinks_equals_the_reference_kernel():
    """Decoding past the sparse threshold with a cache that keeps every key: the fused decode step with
    the sinks gives the reference kernel's tokens and logits."""
    settings = {"block_size": 4, "top_k": 1}
    prompt = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(42))
    outs = {}
    for backend in ("eager", "auto"):
        model = build(_gpt_oss, f"sparsemix:{backend}", settings).eval()
        outs[backend] = model.generate(prompt, max_new_tokens=8, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, past_key_values=tf.DynamicCache())
    assert torch.equal(outs["auto"].sequences, outs["eager"].sequences)
    for a, b in zip(outs["auto"].logits, outs["eager"].logits):
        assert_close(a, b, what="decode logits")


# Every layer windowed (8 keys per query). Blocks of 4 with top-2: a window spans at most 3 blocks, the
# query's own and 2 before it, so once the selection keeps no block outside the window the sparse path
# keeps every key the window shows and equals SDPA with the windowed mask; a sink block or a top-k slot
# spent outside the window would drop one inside it. 40 tokens are past the (2 + 2) * 4 dense threshold.
WINDOWED = {
    "mistral": lambda window=8: tf.MistralConfig(**SMALL, sliding_window=window),
    "qwen2": lambda window=8: tf.Qwen2Config(**SMALL, sliding_window=window, use_sliding_window=True,
                                             max_window_layers=0),
    "gemma2": lambda window=8: tf.Gemma2Config(**SMALL, sliding_window=window, attn_logit_softcapping=None,
                                               final_logit_softcapping=None, layer_types=["sliding_attention"] * 2),
    "gemma3": lambda window=8: tf.Gemma3TextConfig(**SMALL, sliding_window=window,
                                                   layer_types=["sliding_attention"] * 2),
}
WINDOW_SETTINGS = {"block_size": 4, "top_k": 2}


@pytest.mark.parametrize("arch", list(WINDOWED))
@pytest.mark.parametrize("normalizer", ["softmax", "multimax"])
def test_windowed_models_sparse_path_equals_dense_windowed_attention(arch, normalizer):
    """Prefill and training on the sparse path: logits and every gradient equal SDPA's (eager for
    Gemma 2, which has no SDPA path)."""
    reference = "eager" if arch == "gemma2" else "sdpa"
    model, ref = pair(WINDOWED[arch], reference, {**WINDOW_SETTINGS, "normalizer": normalizer})
    ids, mask = ids_and_mask(40, pad=5)
    got, want = forward_backward(model.train(), ids, mask), forward_backward(ref.train(), ids, mask)
    assert_same_training_step(got, want, arch, mask.bool())
    # The window matters: without it the model's attention reads more keys than these logits did.
    wide = build(lambda: WINDOWED[arch](window=64), reference)
    wide.load_state_dict(ref.state_dict())
    with torch.no_grad():
        assert (wide(ids, attention_mask=mask).logits - want[0])[mask.bool()].abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_windowed_models_decoding_equals_dense_windowed_attention(arch):
    """Decoding with a cache that keeps every key (the mask windows it): each step's selection stays in
    the window, so tokens and logits are SDPA's."""
    model, ref = pair(WINDOWED[arch], "sdpa", WINDOW_SETTINGS)
    prompt = torch.randint(3, 100, (1, 30), generator=torch.Generator().manual_seed(42))
    outs = {}
    for name, m in (("sparsemix", model), ("sdpa", ref)):
        outs[name] = m.eval().generate(prompt, max_new_tokens=10, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True, past_key_values=tf.DynamicCache())
    assert torch.equal(outs["sparsemix"].sequences, outs["sdpa"].sequences)
    for a, b in zip(outs["sparsemix"].logits, outs["sdpa"].logits):
        assert_close(a, b, what="decode logits")
