"""gpt-oss's attention sinks (`s_aux`) through the MultiMax attention function, on a tiny gpt-oss:
at identity it computes what transformers' eager gpt-oss computes, forward, backward (the sinks'
gradient included) and in generation. SparseMix computes them too: test_sparsemix_sinks_windows.py."""

import pytest
import torch
import transformers as tf

from tests.conftest import assert_close


def tiny_gpt_oss():
    return tf.GptOssConfig(vocab_size=100, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=4,
                           num_experts_per_tok=2, sliding_window=4, layer_types=["sliding_attention", "full_attention"])


def build(impl):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_gpt_oss(), attn_implementation=impl)
    with torch.no_grad():  # sinks far from zero, so a dropped sink shows
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0.0, 2.0)
    return model


@pytest.mark.parametrize("impl", ["multimax", "multimax:chunked", "multimax:eager"])
def test_gpt_oss_sinks_at_identity_equal_eager(impl):
    ids = torch.randint(0, 100, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, :3] = 0  # left padding
    grads, logits = {}, {}
    for name in ("eager", impl):
        model = build(name).train()
        out = model(ids, attention_mask=mask, labels=ids)
        out.loss.backward()
        logits[name] = out.logits
        grads[name] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert_close(logits[impl], logits["eager"], what="logits")
    sink_grads = [n for n in grads["eager"] if n.endswith("sinks")]
    assert sink_grads and all(grads["eager"][n].abs().sum() > 0 for n in sink_grads)
    for name, grad in grads["eager"].items():
        assert_close(grads[impl][name], grad, what=f"grad {name}")


def test_gpt_oss_generation_with_sinks_equals_eager():
    ids = torch.randint(0, 100, (1, 7))
    tokens = {name: build(name).eval().generate(ids, max_new_tokens=6, do_sample=False)
              for name in ("eager", "multimax")}
    assert torch.equal(tokens["multimax"], tokens["eager"])


def test_backends_without_sinks_refuse():
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad(), pytest.raises(ValueError, match="no attention sinks"):
        build("multimax:flex").eval()(ids)
