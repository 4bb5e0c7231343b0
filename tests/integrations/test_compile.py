"""`torch.compile(model, fullgraph=True)` works with MultiMax and matches eager on every backend
`auto` can pick on CPU (the fused C++ kernel as one custom op in the graph; chunked where it cannot be
built), padded and unpadded; compiled generation with a static cache gives SDPA's tokens."""

import copy

import pytest
import torch
import transformers as tf

import hf_multimax  # noqa: F401
from tests.conftest import assert_close

CONFIG = tf.LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=1024)


def model(attn="multimax"):
    torch.manual_seed(0)
    m = tf.AutoModelForCausalLM.from_config(copy.deepcopy(CONFIG), attn_implementation=attn).eval()
    if attn == "multimax":
        with torch.no_grad():
            m.model.layers[0].self_attn.multimax.t1.fill_(0.3)
            m.model.layers[0].self_attn.multimax.t3.fill_(0.1)
    return m


@pytest.mark.parametrize("length, padded, backend", [(40, False, "fused"), (600, True, "fused"), (600, True, "chunked")])
def test_fullgraph_compiled_forward_matches_eager(length, padded, backend, monkeypatch):
    if backend == "chunked":
        monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "fused")
    torch._dynamo.reset()
    m = model()
    ids = torch.randint(0, 100, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    if padded:
        mask[1, : length // 10] = 0
    with torch.no_grad():
        want = m(ids, attention_mask=mask).logits
        got = torch.compile(m, fullgraph=True)(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert_close(got[keep], want[keep], what=f"compiled L={length}")


def test_compiled_generate_with_static_cache_matches_sdpa():
    torch._dynamo.reset()
    m, ref = model(), model("sdpa")
    with torch.no_grad():
        for p in m.model.layers[0].self_attn.multimax.parameters():
            p.zero_()  # identity: the same tokens as SDPA
    m.forward = torch.compile(m.forward, fullgraph=True)
    ids = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(2))
    kwargs = dict(max_new_tokens=6, do_sample=False, cache_implementation="static")
    with torch.no_grad():
        got = m.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        want = ref.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
    assert torch.equal(got, want)
