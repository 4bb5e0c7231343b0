"""Continuous batching (`generate_batch`, the engine behind `transformers serve`) with trained plugin
attention: every request gets exactly the tokens its own greedy `generate` gives, whether the requests
arrive together or one after another, and the switch to a batching-friendly attention keeps the
trained layers."""

import time

import pytest
import torch
import transformers as tf
from transformers import GenerationConfig

from hf_multimax import MultiMaxModulator

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, eos_token_id=None)
GREEDY = dict(max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0)


def trained(impl):
    torch.manual_seed(0)
    # SparseMix with blocks of 4 and top-1: prompts past 12 tokens take its sparse path.
    extra = {"sparsemix": {"block_size": 4, "top_k": 1}} if impl.startswith("sparsemix") else {}
    model = tf.AutoModelForCausalLM.from_config(tf.LlamaConfig(**LLAMA, **extra), attn_implementation=impl).eval()
    with torch.no_grad():  # far from identity: a dropped modulator or a cross-request leak changes tokens
        for name, p in model.named_parameters():
            if ".multimax." in name or ".sparsemix." in name:
                p.normal_(0.0, 0.5 if ".multimax." in name else 1.0)
    return model


def alone(model, prompt):
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         generation_config=GenerationConfig(**GREEDY))
    return out[0, len(prompt):].tolist()


PROMPTS = [[5, 17, 3, 99, 42], [8, 1, 64, 23, 7, 7, 30, 11, 2], [71, 9, 4]]
# Past SparseMix's dense threshold at blocks of 4, top-1 (12 keys): its sparse path runs, per request.
LONG_PROMPTS = [list(range(1, 26)), [(7 * i) % 97 + 1 for i in range(31)], [(3 * i) % 89 + 2 for i in range(18)]]


@pytest.mark.parametrize("impl, prompts", [("multimax", PROMPTS), ("multimax:eager", PROMPTS),
                                           ("multimax:chunked", PROMPTS), ("sparsemix", LONG_PROMPTS),
                                           ("sparsemix", PROMPTS)],
                         ids=["multimax", "multimax-eager", "multimax-chunked", "sparsemix-sparse", "sparsemix-dense"])
@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_generate_batch_gives_each_request_its_own_tokens(impl, prompts):
    model = trained(impl)
    outputs = model.generate_batch(prompts, generation_config=GenerationConfig(**GREEDY))
    got = sorted((o.prompt_ids, o.generated_tokens) for o in outputs.values())
    want = sorted((p, alone(model, p)) for p in prompts)
    assert got == want
    method = impl.split(":")[0]
    assert model.config._attn_implementation == method  # not switched (no trained layer dropped)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if f".{method}." in n)


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_requests_arriving_one_after_another():
    model = trained("multimax")
    with model.continuous_batching_context_manager(generation_config=GenerationConfig(**GREEDY), block=True,
                                                   timeout=30) as manager:
        ids = []
        for prompt in PROMPTS:  # each joins while the earlier ones may still decode
            ids.append(manager.add_request(prompt, max_new_tokens=GREEDY["max_new_tokens"]))
            time.sleep(0.05)
        results = {i: manager.get_result(i, timeout=60) for i in ids}
    for prompt, i in zip(PROMPTS, ids):
        assert results[i].generated_tokens == alone(model, prompt)
