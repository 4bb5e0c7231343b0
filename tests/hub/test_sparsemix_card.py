"""Cards for every method's checkpoint: a SparseMix model trained by `AttentionPluginTrainer`, published
(dry run, through scripts/publish.py) with a card that states its settings, its results and the run's
hardware; parsed back with huggingface_hub's `ModelCard`. Baselines without settings get the generic
card; a model without plugin attention is refused by name."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from datasets import Dataset
from huggingface_hub import ModelCard

from hf_multimax.hub import build_model_card, checkpoint_methods, run_hardware
from hf_multimax.layers.sparsemix import SparseMixScorer
from hf_multimax.training import AttentionPluginTrainer, AttentionPluginTrainingArguments

ROOT = Path(__file__).resolve().parents[2]
REPO = "someone/tiny-sparsemix"
SETTINGS = {"block_size": 8, "top_k": 2, "kl_weight": 0.1}
GPU_RUN = "8 x NVIDIA H100 80GB HBM3 (8 processes)"


def tiny_llama_config(**extra):
    return tf.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, **extra)


def copy_task(n, half=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(3, 64, (n, half), generator=g)
    ids = torch.cat([first, first], dim=1)  # 96 keys: more than the 32 SparseMix keeps, so it runs sparse
    labels = ids.clone()
    labels[:, :half] = -100
    return Dataset.from_dict({"input_ids": ids.tolist(), "labels": labels.tolist()})


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished fine-tuning run's folder, as finetune.py leaves it: weights, state, eval results, card."""
    out = tmp_path_factory.mktemp("sparsemix_run")
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tiny_llama_config(sparsemix=dict(SETTINGS)),
                                                attn_implementation="sparsemix")
    args = AttentionPluginTrainingArguments(output_dir=str(out), max_steps=4, per_device_train_batch_size=8,
                                            learning_rate=3e-3, logging_steps=2, report_to=[], save_strategy="no",
                                            disable_tqdm=True, use_cpu=True, seed=0)
    trainer = AttentionPluginTrainer(model=model, args=args, train_dataset=copy_task(64),
                                     eval_dataset=copy_task(16, seed=1))
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)
    trainer.create_model_card(dataset="copy task (48 random tokens, then the same again)")
    return out, trainer


def test_trainer_writes_the_sparsemix_card_with_the_runs_hardware(trained_run):
    out, trainer = trained_run
    card = ModelCard.load(out / "README.md")
    data = card.data.to_dict()
    saved = json.loads((out / "config.json").read_text())
    assert data["attn_implementation"] == "sparsemix" and data["sparsemix"] == saved["sparsemix"]
    assert {k: data["sparsemix"][k] for k in SETTINGS} == SETTINGS
    assert "multimax" not in data  # the softmax normalizer attaches no MultiMax scalars
    assert data["training_hardware"] == run_hardware(trainer.args)
    assert data["training_data"].startswith("copy task")
    last = [h for h in trainer.state.log_history if "loss" in h][-1]
    assert last["sparsemix_kl"] > 0
    assert f"`sparsemix_kl` {last['sparsemix_kl']:.4g}" in card.text
    assert [r.metric_type for r in card.data.eval_results] == ["loss"]


@pytest.mark.slow  # tens of seconds (fresh processes, several processes, a compile or a smoke run): CI runs -m slow
def test_published_sparsemix_card_states_settings_results_and_the_runs_hardware(trained_run, tmp_path):
    out, trainer = trained_run
    # The run's card records where it trained; a run on GPUs published from a laptop keeps its GPUs.
    run_card = ModelCard.load(out / "README.md")
    run_card.data.training_hardware = GPU_RUN
    run_dir = tmp_path / "run"
    subprocess.run(["cp", "-r", str(out), str(run_dir)], check=True)
    run_card.save(run_dir / "README.md")
    staged = tmp_path / "upload"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "scripts/publish.py", str(run_dir), REPO, "--dry-run",
                             "--local-dir", str(staged)], cwd=ROOT, capture_output=True, text=True, env=env,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    plan = json.loads(result.stdout[result.stdout.index("{"):])
    assert plan["calls"][1][1]["commit_message"] == "Upload sparsemix model with hf-multimax"
    assert {"README.md", "config.json", "model.safetensors"} <= set(plan["files"])

    card = ModelCard.load(staged / "README.md")
    data = card.data.to_dict()
    saved = json.loads((staged / "config.json").read_text())
    assert data["library_name"] == "transformers" and data["pipeline_tag"] == "text-generation"
    assert data["attn_implementation"] == "sparsemix" and data["sparsemix"] == saved["sparsemix"]
    assert {"hf-multimax", "sparsemix", "attention"} <= set(data["tags"]) and "multimax" not in data["tags"]
    assert data["training_hardware"] == GPU_RUN and f"- Hardware: {GPU_RUN}" in card.text
    assert data["training_data"].startswith("copy task") and data["training_arguments"].startswith("max_steps=4")
    eval_loss = json.loads((run_dir / "eval_results.json").read_text())["eval_loss"]
    assert [(r.metric_type, r.metric_value) for r in card.data.eval_results] == [("loss", eval_loss)]
    assert f"| loss | {eval_loss:.4f} |" in card.text

    text = card.text
    assert "**SparseMix**" in text and "MultiMax settings" not in text
    for key, value in saved["sparsemix"].items():
        assert f"| `{key}` | `{value}` |" in text
    assert "| selector in use | block_rotary |" in text  # "auto" on a model with RoPE over the whole head
    assert "| kept per query block | 4 blocks, 32 keys |" in text
    model = tf.AutoModelForCausalLM.from_pretrained(staged)
    scorers = [m for m in model.modules() if isinstance(m, SparseMixScorer)]
    n_params = sum(p.numel() for m in scorers for p in m.parameters())
    assert f"| learned SparseMix scorer | {n_params} parameters in {len(scorers)} modules |" in text
    assert "`sparsemix_kl`" in text  # from the run's trainer_state.json
    assert f'AutoModelForCausalLM.from_pretrained("{REPO}")' in text
    # The staged folder is the trained model: it loads as SparseMix with the trained scorers.
    trained = trainer.model.model.layers[0].self_attn.sparsemix.w_key
    assert model.config._attn_implementation == "sparsemix"
    torch.testing.assert_close(model.model.layers[0].self_attn.sparsemix.w_key, trained.detach().cpu())


def test_card_without_a_recorded_run_says_hardware_not_recorded(tmp_path):
    config = tiny_llama_config(sparsemix={"normalizer": "multimax", "block_size": 16})
    model = tf.AutoModelForCausalLM.from_config(config, attn_implementation="sparsemix")
    card = build_model_card(model, REPO, eval_results={"passkey_accuracy_8k": 0.6, "eval_runtime": 3.0})
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    data = loaded.data.to_dict()
    assert "- Hardware: not recorded" in loaded.text and "training_hardware" not in data
    # SparseMix with the MultiMax normalizer: both settings, both layers, MultiMax's paper.
    assert data["sparsemix"]["normalizer"] == "multimax" and data["multimax"] == model.config.multimax
    assert {"sparsemix", "multimax", "arxiv:2406.01189"} <= set(data["tags"])
    assert "## MultiMax settings (the normalizer over the kept keys)" in loaded.text
    assert "| learned MultiMax scalars |" in loaded.text and "exact attention (MultiMax)" in loaded.text
    assert [(r.metric_type, r.metric_value) for r in loaded.data.eval_results] == [("passkey_accuracy_8k", 0.6)]


def test_multimax_card_is_still_the_multimax_one():
    model = tf.AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="multimax")
    assert [m.name for m in checkpoint_methods(model)] == ["multimax"]
    card = build_model_card(model, "someone/tiny-multimax", hardware="CPU (x86_64, 2 threads)")
    assert "**MultiMax**" in card.text and "- Hardware: CPU (x86_64, 2 threads)" in card.text
    assert card.data.attn_implementation == "multimax" and "sparsemix" not in card.data.to_dict()


def test_baseline_without_settings_gets_the_generic_card():
    model = tf.AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="sparsemax")
    card = build_model_card(model, "someone/tiny-sparsemax")
    assert card.data.attn_implementation == "sparsemax" and "sparsemax" in card.data.tags
    assert "`sparsemax` method" in card.text and "no settings and no learned parameters" in card.text


def test_model_without_plugin_attention_is_refused_and_the_trainer_falls_back(tmp_path):
    model = tf.AutoModelForCausalLM.from_config(tiny_llama_config(), attn_implementation="eager")
    with pytest.raises(ValueError, match="uses no hf-multimax attention method .*'eager'"):
        build_model_card(model, REPO)
    args = AttentionPluginTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    AttentionPluginTrainer(model=model, args=args).create_model_card()
    assert "hf-multimax" not in ModelCard.load(tmp_path / "README.md").data.to_dict().get("tags", [])


def test_run_hardware_describes_the_training_processes(monkeypatch):
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=0: f"NVIDIA H100 80GB HBM3 #{index}")
    ddp = SimpleNamespace(device=torch.device("cuda", 3), world_size=8, n_gpu=1)
    assert run_hardware(ddp) == "8 x NVIDIA H100 80GB HBM3 #3 (8 processes)"
    data_parallel = SimpleNamespace(device=torch.device("cuda"), world_size=1, n_gpu=2)
    assert run_hardware(data_parallel) == "2 x NVIDIA H100 80GB HBM3 #0"
    cpu = SimpleNamespace(device=torch.device("cpu"), world_size=2, n_gpu=0)
    assert run_hardware(cpu) == f"CPU ({platform.machine()}, {torch.get_num_threads()} threads) (2 processes)"
