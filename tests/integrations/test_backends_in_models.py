"""The backend choice reaches the kernels inside real models, and each backend agrees with eager."""

import importlib.util

import pytest
import torch
from transformers import AutoModel, AutoModelForCausalLM, BertConfig, LlamaConfig

from hf_multimax import MultiMaxModulator
from hf_multimax.ops.backends import AttentionCall
from hf_multimax.ops.multimax import AUTO_MIN_SCORES, BACKENDS
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
BERT = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)


def build(kind, backend, tmp_path):
    torch.manual_seed(0)
    if kind == "llama":
        model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax")
    else:
        model = AutoModel.from_config(BertConfig(**BERT), attn_implementation="multimax")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, MultiMaxModulator):
                for p in m.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    path = tmp_path / kind
    if not path.exists():
        model.save_pretrained(path)
    auto = AutoModelForCausalLM if kind == "llama" else AutoModel
    return auto.from_pretrained(path, attn_implementation=f"multimax:{backend}")


def batch(kind):
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 100, (2, 37), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :9] = 0 if kind == "llama" else 1
    mask[1, -9:] = 1 if kind == "llama" else 0
    return ids, mask


def outputs(model, kind, ids, mask):
    out = model(ids, attention_mask=mask)
    return out.logits if kind == "llama" else out.last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "bert"])
@pytest.mark.parametrize("backend", ["fused", "chunked", "flex"])
def test_backend_matches_eager_in_model(kind, backend, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    eager, fast = build(kind, "eager", tmp_path), build(kind, backend, tmp_path)
    assert fast.config.multimax["backend"] == backend
    ids, mask = batch(kind)
    valid = mask.bool()
    if backend == "flex":  # CPU flex is forward-only
        with torch.no_grad():
            assert_close(outputs(fast, kind, ids, mask)[valid], outputs(eager, kind, ids, mask)[valid], what="flex")
        return
    a, b = outputs(eager, kind, ids, mask), outputs(fast, kind, ids, mask)
    assert_close(b[valid], a[valid], what=f"{backend} output")
    w = torch.randn_like(a) * valid[..., None]
    (a * w).sum().backward()
    (b * w).sum().backward()
    eager_grads = dict(eager.named_parameters())
    for name, p in fast.named_parameters():
        ref = eager_grads[name].grad
        if ref is None:
            continue
        scale = ref.abs().max().clamp_min(1.0)
        assert_close(p.grad / scale, ref / scale, what=f"grad {name}")


def test_training_step_with_compiled_chunked_backend(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "1")
    eager, fast = build("llama", "eager", tmp_path), build("llama", "chunked", tmp_path)
    ids, _ = batch("llama")
    for model in (eager, fast):
        model.train()
        model(ids, labels=ids).loss.backward()
    t1 = {n: p.grad for n, p in eager.named_parameters()}
    for n, p in fast.named_parameters():
        scale = t1[n].abs().max().clamp_min(1.0)
        assert_close(p.grad / scale, t1[n] / scale, what=f"grad {n}")


def resolve_backend(requested, q_len, k_len, **call):
    return BACKENDS.resolve(requested, AttentionCall("cpu", q_len, k_len, **call)).name


def test_auto_decision_table(monkeypatch):
    big, small = (1024, 1024), (8, 8)
    # The fused kernel wherever it can serve the call (measured fastest from decoding to 4k)...
    assert resolve_backend("auto", *big) == "fused"
    assert resolve_backend("auto", *small) == "fused"
    assert resolve_backend("auto", 1, 300, needs_grad=True) == "fused"
    # ...the reference where the call needs what only it does...
    assert resolve_backend("auto", *big, dropout=0.1) == "eager"
    assert resolve_backend("auto", *big, want_probs=True) == "eager"
    assert resolve_backend("flex", *small) == "flex"
    with pytest.raises(ValueError, match="backend='chunked' cannot run this call: output_attentions=True"):
        resolve_backend("chunked", *small, want_probs=True)
    # On a GPU: Triton for training (where installed), flex for inference.
    if importlib.util.find_spec("triton") is not None:
        assert BACKENDS.resolve("auto", AttentionCall("cuda", 1024, 1024, needs_grad=True)).name == "triton"
    assert BACKENDS.resolve("auto", AttentionCall("cuda", 1024, 1024)).name == "flex"
    # ...and without the fused kernel (no compiler), the previous table: eager short, chunked long.
    monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "fused")
    assert resolve_backend("auto", *big) == "chunked"
    assert resolve_backend("auto", *small) == "eager"
    assert resolve_backend("auto", 1, AUTO_MIN_SCORES) == "chunked"


@pytest.mark.parametrize("backend", ["fused", "chunked"])
def test_auto_runs_the_fast_kernel(backend, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MULTIMAX_COMPILE", "0")
    if backend == "chunked":
        monkeypatch.setenv("HF_MULTIMAX_DISABLE_BACKENDS", "fused")
    import hf_multimax.ops.multimax as ops

    calls = []
    original = ops.BACKENDS[backend]
    monkeypatch.setitem(ops.BACKENDS, backend, lambda *a, **k: calls.append(1) or original(*a, **k))
    model = build("llama", "auto", tmp_path)
    with torch.no_grad():
        model(torch.randint(0, 100, (1, 520)))
    assert len(calls) == 2  # one per layer


def test_explicit_fast_backend_with_output_attentions_is_refused(tmp_path):
    model = build("llama", "chunked", tmp_path)
    with pytest.raises(ValueError, match="output_attentions"):
        model(torch.randint(0, 100, (1, 5)), output_attentions=True)
