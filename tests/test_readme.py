"""The Python examples of the README and docs/ run as written (with a tiny local model for `path`)."""

import re
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
# What identifies each example below; every Python block of the pages must be one of them.
MARKERS = ("separate_multimax_group", 'multimax={"order": 1', 'attn_implementation="sparsemix"', "modules_to_save",
           '"multimodal_fusion"')


def python_blocks(page: Path = README) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def block_with(marker: str) -> str:
    (block,) = [b for page in PAGES for b in python_blocks(page) if marker in b]
    return block


def save_tiny_llama(path):
    """The `path` the examples load: a tiny random Llama."""
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)


# Examples that need more than a tiny model: a client of a running server (docs/serving.md).
NOT_RUN_HERE = ("from openai import OpenAI",)


def test_every_example_is_run_here():
    blocks = [b for page in PAGES for b in python_blocks(page) if not any(m in b for m in NOT_RUN_HERE)]
    assert len(blocks) >= len(MARKERS)
    assert all(sum(marker in b for marker in MARKERS) == 1 for b in blocks), "a new example needs a test here"


def test_readme_examples_run(tmp_path):
    path, out = tmp_path / "base", tmp_path / "out"
    save_tiny_llama(path)
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(block_with(MARKERS[0]), "README: convert, train, save, reload", "exec"), namespace)
    model = namespace["model"]
    assert (out / "model.safetensors").exists() and model.config._attn_implementation == "multimax"
    trained = {n: p for n, p in model.named_parameters() if ".multimax." in n}
    assert trained and any(p.abs().max() > 0 for p in trained.values()), "the optimizer step moved the scalars"
    reloaded = dict(AutoModelForCausalLM.from_pretrained(out).named_parameters())
    assert all(torch.equal(reloaded[n], p) for n, p in trained.items())
    exec(compile(block_with(MARKERS[1]), "README: settings, switching", "exec"), namespace)
    model = namespace["model"]
    assert model.config.multimax["order"] == 1 and model.model.layers[0].self_attn.multimax.num_heads == 4
    assert model(torch.randint(0, 100, (1, 5))).logits.shape == (1, 5, 100)


def test_readme_sparsemix_example_runs(tmp_path):
    path, out = tmp_path / "base", tmp_path / "sparse"
    save_tiny_llama(path)
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(block_with(MARKERS[2]), "README SparseMix block", "exec"), namespace)
    assert namespace["aux"].terms["sparsemix_kl"], "1024 tokens in blocks of 32 take the sparse path"
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert reloaded.config._attn_implementation == "sparsemix" and reloaded.config.sparsemix["top_k"] == 18


def test_peft_example_runs(tmp_path):
    path, out = tmp_path / "base", tmp_path / "adapter"
    save_tiny_llama(path)
    namespace = {"path": str(path), "out": str(out)}
    exec(compile(block_with(MARKERS[3]), "docs/integrations.md PEFT block", "exec"), namespace)
    ids = torch.randint(0, 100, (1, 6))
    with torch.no_grad():
        assert torch.equal(namespace["restored"](input_ids=ids).logits, namespace["peft_model"](input_ids=ids).logits)
    assert (out / "adapter_model.safetensors").exists()
    assert namespace["merged"].config._attn_implementation == "multimax"


def test_fusion_example_runs():
    namespace = {}
    exec(compile(block_with(MARKERS[4]), "docs/fusion.md block", "exec"), namespace)
    out = namespace["out"]
    assert torch.isfinite(out.loss) and out.attribution_shares.shape == out.modality_attention_mass.shape == (4, 2)
    assert torch.allclose(out.attribution_shares.sum(-1), torch.ones(4))
