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
