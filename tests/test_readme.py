"""The README's Python examples run as written (with a tiny local model for `path`)."""

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def save_tiny_llama(path):
    """The `path` the README's examples load: a tiny random Llama."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


def test_readme_examples_run(tmp_path):
    path, out = tmp_path / "base", tmp_path / "out"
    save_tiny_llama(path)
    blocks = python_blocks()
    assert len(blocks) >= 2
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(blocks[0], "README block 1", "exec"), namespace)  # convert, save, reload
    assert (out / "model.safetensors").exists() and namespace["model"].config._attn_implementation == "multimax"
    exec(compile(blocks[1], "README block 2", "exec"), namespace)  # settings, switching
    model = namespace["model"]
    assert model.config.multimax["order"] == 1 and model.model.layers[0].self_attn.multimax.num_heads == 4
    assert model(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


def test_readme_sparsemix_example_runs(tmp_path):
    path, out = tmp_path / "base", tmp_path / "sparse"
    save_tiny_llama(path)
    block = next(b for b in python_blocks() if 'attn_implementation="sparsemix"' in b)
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(block, "README SparseMix block", "exec"), namespace)
    assert namespace["aux"].terms["sparsemix_kl"], "1024 tokens in blocks of 32 take the sparse path"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config._attn_implementation == "sparsemix" and reloaded.config.sparsemix["top_k"] == 18


def test_readme_peft_example_runs(tmp_path):
    path, out = tmp_path / "base", tmp_path / "adapter"
    save_tiny_llama(path)
    block = next(b for b in python_blocks() if "modules_to_save" in b)
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(block, "README PEFT block", "exec"), namespace)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(namespace["restored"](input_ids=ids).logits, namespace["peft_model"](input_ids=ids).logits)
    assert (out / "adapter_model.safetensors").exists()
    assert namespace["merged"].config._attn_implementation == "multimax"
