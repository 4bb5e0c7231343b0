"""sparsemax / entmax15 registered as attention implementations, against a plain reference."""

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

entmax = pytest.importorskip("entmax", reason="the entmax extra")

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


@pytest.mark.parametrize("name, fn", [("sparsemax", entmax.sparsemax), ("entmax15", entmax.entmax15)])
def test_model_uses_the_normaliser(name, fn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation=name)
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    out = model(ids, attention_mask=mask, output_attentions=True)
    probs = out.attentions[0]
    assert torch.isfinite(out.logits).all()
    valid_rows = probs.sum(-1) > 0
    assert torch.allclose(probs.sum(-1)[valid_rows], torch.ones(()), atol=1e-5)
    assert torch.equal(probs[0, :, 0, 1:], torch.zeros(4, 8))  # causal
    assert torch.equal(probs[1, :, 5, :3], torch.zeros(4, 3))  # left padding

    # The first layer's probabilities against the normaliser applied by hand.
    layer = model.model.layers[0].self_attn
    hidden = model.model.layers[0].input_layernorm(model.model.embed_tokens(ids))
    q = layer.q_proj(hidden).view(2, 9, 4, 8).transpose(1, 2)
    k = layer.k_proj(hidden).view(2, 9, 2, 8).transpose(1, 2)
    cos, sin = model.model.rotary_emb(hidden, (mask.cumsum(-1) - 1).clamp_min(0))
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    scores = q @ k.repeat_interleave(2, dim=1).transpose(-1, -2) * 8**-0.5
    keep = torch.ones(9, 9, dtype=torch.bool).tril() & mask.bool()[:, None, None, :]
    expected = fn(scores.masked_fill(~keep, float("-inf"))[:1], dim=-1)  # row 0: no empty rows
    assert torch.allclose(probs[0], expected[0], atol=1e-5)
