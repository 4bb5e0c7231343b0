"""What a user does after `pip install hf-multimax-*.whl`, run by test_wheel.py with the fresh venv's
python from a folder outside the checkout. One process for everything: torch and transformers are
imported once and the fused kernel is built once.

Usage: python wheel_user_session.py WORKDIR. Prints one JSON line of facts for the test to check; any
failure is an uncaught exception (non-zero exit, traceback on stderr).
"""

import json
import sys
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig

import hf_multimax
from hf_multimax.hub import publish, stage_folder
from hf_multimax.ops.multimax import fused
from hf_multimax.training.finetune import main as finetune

work = Path(sys.argv[1])
facts = {}

# Where the code came from: every hf_multimax module must be the installed wheel's, and setuptools'
# editable finder (which maps the package onto the checkout) must not be active in this interpreter.
facts["package_file"] = hf_multimax.__file__
facts["meta_path"] = [type(finder).__module__ for finder in sys.meta_path]

# 1. The fused C++ kernel compiles from the .cpp shipped as package data, and gives eager's logits.
def tiny_llama():  # a new config per model: from_config keeps the object, and the backend lives in it
    return LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2)


torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(tiny_llama(), attn_implementation="multimax:fused").eval()
with torch.no_grad():  # a trained-looking scalar, so a reload that dropped it would change the logits
    model.model.layers[0].self_attn.multimax.t1.fill_(0.25)
ids = torch.randint(0, 100, (2, 9))
with torch.no_grad():
    logits = model(ids).logits
facts["fused_source"] = str(fused.SOURCE)
facts["fused_available"] = list(fused.fused_is_available())
eager = AutoModelForCausalLM.from_config(tiny_llama(), attn_implementation="multimax:eager").eval()
eager.load_state_dict(model.state_dict())
with torch.no_grad():
    facts["fused_vs_eager_max_abs"] = (eager(ids).logits - logits).abs().max().item()

# 2. Save and reload: the settings come back from config.json, the scalar from model.safetensors.
model.save_pretrained(work / "llama")
reloaded = AutoModelForCausalLM.from_pretrained(work / "llama").eval()
with torch.no_grad():
    facts["reload_equal"] = torch.equal(reloaded(ids).logits, logits)
facts["reload_attn"] = [reloaded.config._attn_implementation, reloaded.config.multimax["backend"]]

# 3. The fusion model, installed from the top-level modeling/ folder as hf_multimax.modeling.
fusion_config = AutoConfig.for_model("multimodal_fusion", modality_names=["a", "b"], modality_input_sizes=[5, 7],
                                     hidden_size=12, num_attention_heads=2, projection_hidden_size=8)
fusion = AutoModel.from_config(fusion_config).eval()
features = {"a": torch.randn(2, 3, 5), "b": torch.randn(2, 4, 7)}
with torch.no_grad():
    pooled = fusion(modality_inputs=features).pooler_output
fusion.save_pretrained(work / "fusion")  # copies the remote-code files from the installed package
with torch.no_grad():
    facts["fusion_reload_equal"] = torch.equal(
        AutoModel.from_pretrained(work / "fusion").eval()(modality_inputs=features).pooler_output, pooled)
facts["fusion_module"] = type(fusion).__module__
facts["fusion_folder"] = sorted(p.name for p in (work / "fusion").iterdir())

# 4. Model cards: the staged folder and a dry-run publish both carry README.md rendered from the
# template that ships inside the package.
stage_folder(model, work / "staged", "someone/tiny-multimax", base_model="someone/tiny-llama")
plan = publish(model, "someone/tiny-multimax", local_dir=str(work / "published"), dry_run=True)
facts["publish_files"] = plan["files"]
for name in ("staged", "published"):
    card = ModelCard.load(work / name / "README.md")
    facts[f"{name}_card"] = {"tags": card.data.tags, "multimax": card.data.to_dict().get("multimax"),
                             "has_settings_table": "| `order` | `2` |" in card.text}

# 5. A three-step fine-tune of the packaged MiniLM: trains, evaluates (the accuracy metric script is
# package data too), saves, and writes its model card.
finetune("text_classification", ["--output_dir", str(work / "text"), "--do_train", "--do_eval", "--max_steps", "3",
                                  "--per_device_train_batch_size", "8", "--num_generated_train", "24",
                                  "--num_generated_eval", "8", "--report_to", "none", "--use_cpu"])
card = ModelCard.load(work / "text" / "README.md")
facts["finetune_card"] = {"base_model": card.data.base_model,
                          "metrics": sorted(r.metric_type for r in card.data.eval_results or [])}

# Last, so that everything imported lazily above is included.
facts["hf_multimax_modules"] = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
                                if name == "hf_multimax" or name.startswith("hf_multimax.")}
print(json.dumps(facts))
