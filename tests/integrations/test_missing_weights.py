"""Plugin weights missing from a checkpoint that holds plugin weights are reported as transformers
reports missing weights; a checkpoint the plugin saved (its settings in config.json) whose weights lost
all of them is reported too, with a warning saying what it means; converting a plain checkpoint
(which never had them) reports nothing; a checkpoint written when the shared scalars were 0-dim
still loads (they are 1-D now)."""

import logging

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def test_converting_a_plain_checkpoint_reports_nothing(tmp_path):
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="sdpa").save_pretrained(tmp_path)
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="multimax", output_loading_info=True)
    assert info["missing_keys"] == set()
    assert model.model.layers[0].self_attn.multimax.is_identity()


def test_plugin_weights_missing_from_a_plugin_checkpoint_are_reported(tmp_path):
    config = LlamaConfig(**LLAMA)
    config.multimax = {"output_head": True}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".multimax." in name:
                p.fill_(0.25)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(k for k in weights if k.startswith("model.layers.1.self_attn.multimax."))
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == dropped and len(dropped) == 8
    assert reloaded.model.layers[0].self_attn.multimax.t1.item() == 0.25, "what is there still loads"


@pytest.mark.parametrize("method", ["multimax", "sparsemix"])
def test_a_plugin_checkpoint_that_lost_all_plugin_weights_is_reported(method, tmp_path, caplog):
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation=method)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if f".{method}." in name:
                p.fill_(0.25)  # trained: what the filtered file below loses
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    dropped = sorted(k for k in weights if f".{method}." in k)
    save_file({k: v for k, v in weights.items() if k not in dropped}, tmp_path / "model.safetensors",
              metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="hf_multimax"):
        reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert sorted(info["missing_keys"]) == dropped and len(dropped) >= 2
    assert reloaded.model.layers[0].self_attn.get_submodule(method).is_identity()
    lost = [r.getMessage() for r in caplog.records if "weights hold none of them" in r.getMessage()]
    assert len(lost) == 1, "one warning, though the inner LlamaModel's post_init sees the checkpoint too"
    assert f"config.json holds the plugin's {method!r} settings" in lost[0] and "2 layers" in lost[0]
    assert f"layers.0.self_attn.{method}" in lost[0]


def test_checkpoint_with_0dim_scalars_loads_into_1d_parameters(tmp_path):
    config = LlamaConfig(**LLAMA)
    config.multimax = {"output_head": True, "affine": True}
    model = AutoModelForCausalLM.from_config(config, attn_implementation="multimax").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".multimax." in name:
                assert p.shape == (1,), name  # FSDP2 and ZeRO-3 refuse 0-dim parameters
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    old = {k: v.reshape(()) if ".multimax." in k else v for k, v in weights.items()}  # as written before
    assert sum(v.dim() == 0 for v in old.values()) == 3 * 10
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"]
    for name, p in reloaded.named_parameters():
        if ".multimax." in name:
            assert p.shape == (1,) and p.item() == weights[name].item(), name
    ids = torch.randint(0, 100, (1, 7))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)


def test_a_folder_saved_again_is_read_again(tmp_path):
    """The checkpoint's shapes are read at each load, not remembered: an old folder saved over loads."""
    test_checkpoint_with_0dim_scalars_loads_into_1d_parameters(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    model.save_pretrained(tmp_path)  # now with 1-D scalars
    again, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["mismatched_keys"] and again.model.layers[0].self_attn.multimax.t1.shape == (1,)
