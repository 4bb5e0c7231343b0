"""MultiMax on the real model (`experiments/real_model_multimax.py`): training only the top layers on
cached hidden states computes what the whole model computes, and the quick run writes every field
end to end."""

import copy
import json

import pytest
import torch

from experiments.real_model_multimax import METHODS, bottom_hidden, run, truncate_to_top


def tiny_llama(attn_implementation="sdpa", **kwargs):
    import hf_multimax  # noqa: F401
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn_implementation, **kwargs)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "multimax"])
def test_top_layers_on_cached_hidden_states_match_the_whole_model(attn_implementation):
    model = tiny_llama(attn_implementation).eval()
    if attn_implementation == "multimax":
        with torch.no_grad():  # scalars off identity in every layer: the top ones must still act
            for name, p in model.named_parameters():
                if ".multimax." in name:
                    p.uniform_(-0.2, 0.2)
    ids = torch.randint(0, 100, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        whole = model(input_ids=ids, labels=ids).loss
        hidden = bottom_hidden(model, ids, top=2, batch=2)
        assert len(model.model.layers) == 4, "the model is whole again"
        top = truncate_to_top(model, 2)
        assert len(top.model.layers) == 2
        part = top(inputs_embeds=hidden, labels=ids).loss
    torch.testing.assert_close(part, whole, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~2-3 min on a busy 2-core VM: SmolLM2 loaded 7 times, 6 tiny fine-tunes
def test_quick_run_writes_every_field(tmp_path):
    out = tmp_path / "quick.json"
    run(quick=True, output=str(out))
    result = json.loads(out.read_text())
    assert result["quick"] is True and (tmp_path / "quick.png").exists()
    assert result["budget"]["tokens_per_run"] == 2 * 64 and result["budget"]["trained_layers"] == "top 1 of 30"
    runs = result["runs"]
    assert sorted((r["method"], r["seed"]) for r in runs) == sorted((m, s) for m in METHODS for s in (0, 1))
    for r in runs:
        assert r["heldout_ppl"] > 1 and r["trainable"]["total"] > 0
        assert (r["trainable"]["multimax_scalars"] > 0) == (r["method"] != "lora")
        assert set(r["metrics_after"]) == {"layer_0"}
        assert {"entropy", "top1_mass", "first_token_mass", "sparsity_S", "multimodality_M"} == set(
            r["metrics_after"]["layer_0"])
        if r["method"] != "lora":
            # per-head order-2 scalars of one layer (9 heads x 8), and they moved
            assert r["trainable"]["multimax_scalars"] == 72 and r["scalars"]["max_abs"] > 0
            assert r["scalars"]["max_score_shift"] >= 0 and len(r["scalars"]["attention_tv_per_layer"]) == 1
    s = result["summary"]
    for m in METHODS:
        lo, hi = s[m]["ppl"]["ci95"]
        assert lo <= s[m]["ppl"]["mean"] <= hi and s[m]["ppl"]["n"] == 2
    assert {"multimax_lora_minus_lora_ppl", "multimax_minus_lora_ppl"} <= set(s)
    assert set(result["metrics_before"]) == {"layer_0"}
