"""PEFT's own way to train extra modules works on the MultiMax scalars: `modules_to_save=["multimax"]`
wraps them, the attention function reaches the live copy through the wrapper, they train beside the
LoRA adapters, live in the adapter file, and base + adapter reload in a fresh process."""

import os
import subprocess
import sys
import textwrap

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, LlamaConfig

from hf_multimax.integrations.multimax_attention import _warn_frozen_at_identity
from tests.conftest import assert_close

LLAMA = dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def test_modules_to_save_trains_the_scalars_and_round_trips(tmp_path):
    torch.manual_seed(0)
    base = tmp_path / "base"
    AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax").save_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base)
    assert model.config._attn_implementation == "multimax"
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], modules_to_save=["multimax"]))
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".multimax.modules_to_save.default.t1" in n for n in trainable)
    assert any("lora_A" in n for n in trainable)

    ids = torch.randint(0, 100, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.Adam([p for p in peft_model.parameters() if p.requires_grad], lr=0.05)
    peft_model.train()
    for _ in range(5):
        opt.zero_grad()
        peft_model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    copy = peft_model.base_model.model.model.layers[0].self_attn.multimax.modules_to_save["default"]
    assert copy.t3.abs() > 0, "the scalars train through the wrapper"
    original = peft_model.base_model.model.model.layers[0].self_attn.multimax.original_module
    assert original.is_identity(), "the base model's scalars stay as loaded"

    peft_model.eval()
    with torch.no_grad():
        logits = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            base_logits = peft_model(input_ids=ids).logits
    assert not torch.allclose(logits, base_logits), "the trained scalars change the outputs"
    adapter = tmp_path / "adapter"
    peft_model.save_pretrained(adapter)
    keys = load_file(adapter / "adapter_model.safetensors").keys()
    assert sum(".multimax." in k for k in keys) == 2 * 8, sorted(keys)
    torch.save({"ids": ids, "logits": logits}, tmp_path / "expected.pt")

    code = f"""
        import torch, hf_multimax
        from peft import PeftModel
        from transformers import AutoModelForCausalLM
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained({str(base)!r}), {str(adapter)!r}).eval()
        with torch.no_grad():
            logits = model(input_ids=expected["ids"]).logits
        assert torch.equal(logits, expected["logits"]), (logits - expected["logits"]).abs().max()
        print("OK")
    """
    run = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0 and "OK" in run.stdout, run.stderr[-3000:]

    merged = peft_model.merge_and_unload()  # the trained copy of the scalars replaces the wrapper
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert reloaded.config._attn_implementation == "multimax"
    with torch.no_grad():
        assert_close(reloaded(input_ids=ids).logits, logits, what="merged model reloaded")


def test_lora_with_frozen_scalars_at_identity_says_so_once(caplog):
    _warn_frozen_at_identity.cache_clear()  # once per process: start this process's count here
    model = AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA), attn_implementation="multimax")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert not any(".multimax." in n for n, p in peft_model.named_parameters() if p.requires_grad)
    ids = torch.randint(0, 100, (2, 12))
    peft_model.train()
    with caplog.at_level("WARNING", logger="hf_multimax"):
        for _ in range(2):
            peft_model(input_ids=ids, labels=ids).loss.backward()
    assert caplog.text.count("frozen at identity") == 1 and "modules_to_save=['multimax']" in caplog.text
